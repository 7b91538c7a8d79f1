"""Unit memory predicted before anything is built at size (workers.footprint): the parameter
count from three small builds is exact at other widths, for every architecture."""

from __future__ import annotations

import pytest

from study.spec import ModelSpec
from workers.footprint import CPU_MEMORY_BUDGET, PARAMETER_COPIES, parameter_count, unit_bytes
from workers.models import build_model

IMAGE, SPHERE = (2, 8, 8), (1, 4, 4)
SPECS = [
    (ModelSpec(name="mlp", arch="mlp", depth=3), IMAGE),
    (ModelSpec(name="cnn", arch="cnn", depth=2, readout="flatten"), IMAGE),
    (ModelSpec(name="gcnn", arch="gcnn", depth=3, support="identity", bias=False), IMAGE),
    (ModelSpec(name="gcnn_escnn", arch="gcnn", depth=2, basis="escnn", group="D4"), IMAGE),
    (ModelSpec(name="group_mlp", arch="group_mlp", depth=2), IMAGE),
    (ModelSpec(name="so3", arch="so3_gcnn", group="SO3", depth=2, bands=[2, 2], so3_grid=2), SPHERE),
    (ModelSpec(name="sphere_mlp", arch="sphere_mlp", group="SO3", depth=2), SPHERE),
]


@pytest.mark.parametrize("spec,shape", SPECS, ids=[s.name for s, _ in SPECS])
@pytest.mark.parametrize("width", [5, 12])
def test_parameter_count_is_exact(spec, shape, width):
    built = sum(p.numel() for p in build_model(spec, width, shape, 3).parameters())
    assert parameter_count(spec, width, shape, 3) == built


def test_unit_bytes_counts_members_copies_and_the_working_budget():
    spec, shape = SPECS[0]
    p = parameter_count(spec, 100, shape, 3)
    assert unit_bytes(spec, 100, 10, shape, 3, "float64") == 10 * PARAMETER_COPIES * 8 * p + CPU_MEMORY_BUDGET
    # huge widths are arithmetic, not allocations
    assert unit_bytes(spec, 10**8, 2, shape, 3, "float32") > 10**16
