"""The layer plan's two interpreters cover exactly its layer types, and every architecture
is either planned or one of the SO(3) models built whole (study.architecture)."""

from __future__ import annotations

from typing import get_args

import numpy as np
import pytest

from analysis.stax import RULES, ConvRule, build_rules
from study import architecture as arch
from study.spec import SO3_ARCHS, Arch, ModelSpec, tap_variances
from workers.layers import NTKConv2d
from workers.models import BUILDERS, build_model


@pytest.mark.parametrize("registry,what", [(BUILDERS, "finite builder"), (RULES, "kernel rule")])
def test_every_layer_type_has_exactly_one_entry(registry, what):
    missing = [t.__name__ for t in arch.LAYER_TYPES if t not in registry]
    extra = [getattr(t, "__name__", repr(t)) for t in registry if t not in arch.LAYER_TYPES]
    assert not missing, f"layer types without a {what}: {missing}"
    assert not extra, f"{what}s for types that are not plan layers: {extra}"


def test_layer_types_are_the_plan_union():
    assert set(arch.LAYER_TYPES) == set(get_args(arch.Layer))
    assert len(arch.LAYER_TYPES) == len(set(arch.LAYER_TYPES))


def test_every_architecture_is_planned_or_built_whole():
    assert set(arch.PLANNED_ARCHS).isdisjoint(SO3_ARCHS)
    assert set(arch.PLANNED_ARCHS) | set(SO3_ARCHS) == set(get_args(Arch))


@pytest.mark.parametrize("kw", [dict(arch="sphere_mlp", depth=1), dict(arch="so3_gcnn", depth=1, bands=[2], so3_grid=2)])
def test_so3_models_have_no_layer_plan(kw):
    spec = ModelSpec(name="s", group="SO3", **kw)
    with pytest.raises(ValueError, match=r"^arch: .* has no layer plan; .*sphere_spec"):
        arch.layer_plan(spec, (1, 6, 6), 2)


def test_conv_tap_variances_reach_both_interpreters():
    """``filter_support`` / ``tap_variance`` reach the finite layer and the kernel rule only through
    the plan's ``Conv`` entry, whose array is ``study.spec.tap_variances``."""
    spec = ModelSpec(name="c", arch="cnn", depth=2, filter_support="cross_corner", tap_variance="ramp")
    v = tap_variances(spec)
    plan = arch.layer_plan(spec, (1, 5, 5), 1)
    assert all(np.array_equal(e.variances(), v) for e in plan if isinstance(e, arch.Conv))
    finite = [m for m in build_model(spec, 3, (1, 5, 5), 1).layers if isinstance(m, NTKConv2d)]
    assert len(finite) == 2 and all(np.allclose(m.tap_scale.numpy() ** 2, v, rtol=1e-15, atol=0) for m in finite)
    rules = [r for r in build_rules(plan, (1, 5, 5), spec.group_obj) if isinstance(r, ConvRule)]
    assert len(rules) == 2 and all(np.array_equal(r.v, v) for r in rules)
