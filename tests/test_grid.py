"""Grid expansion (``study.grid``): unit ids must never change, because results directories
of earlier runs are keyed by them (a resumed run finds its finished units by id).

``expand`` builds each (model, width, lr) ensemble's id text once and fills in the member
range per unit; ``reference_expand`` below is the expansion as it was before that (one
``json.dumps`` of the whole spec and one validated ``UnitSpec`` per unit), kept verbatim so
that every id and every field can be compared with it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from study import grid
from study.config import load_study, parse_study
from study.grid import UnitSpec, expand
from test_config import GOOD, replace

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = sorted(p for p in (ROOT / "study" / "builtin").glob("*.yaml") if load_study(p).kind == "ensemble")


def reference_unit_id(fields: dict, data_digest: str) -> str:
    text = json.dumps({"spec": fields, "data": data_digest}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def reference_expand(cfg, data_digest: str) -> list[UnitSpec]:
    units = []
    for model in cfg.model_specs:
        for width in cfg.widths_of(model.name):
            for lr in cfg.lrs_of(model.name):
                members = cfg.ensemble_size_of(model.name)
                size = min(cfg.unit_size, members)
                for start in range(0, members, size):
                    fields = dict(study_seed=cfg.seed, model=model, width=width, member_start=start,
                                  member_stop=min(start + size, members), lr=float(lr), steps=cfg.steps,
                                  log_steps=cfg.resolved_log_steps, dtype=cfg.dtype, device=cfg.device,
                                  store_members=cfg.store_members)
                    uid = reference_unit_id({**fields, "model": model.model_dump()}, data_digest)
                    units.append(UnitSpec(unit_id=uid, **fields))
    return units


# Studies that reach every branch: unequal last units, per-model widths, lrs and sizes,
# several lrs, float64, stored members, antithetic pairs, SGD fields, one-member units.
VARIANTS = {
    "tiny": GOOD,
    "uneven units": replace(GOOD, "ensemble_size: 4", "ensemble_size: 10\nmembers_per_unit: 3"),
    "one member a unit": replace(GOOD, "ensemble_size: 4", "ensemble_size: 5\nmembers_per_unit: 1"),
    "per-model fields": replace(GOOD, "{name: mlp, arch: mlp, depth: 1}",
                                "{name: mlp, arch: mlp, depth: 1, widths: [4, 32], lr: [0.1, 0.2], ensemble_size: 6}"),
    "lrs, dtype, stored members": replace(replace(GOOD, "lr: 0.5", "lr: [0.5, 0.25, 1.0]\ndtype: float64\n"
                                                  "store_members: true\nseed: 7"), "seed: 0\n", ""),
    "antithetic sgd": replace(GOOD, "{name: mlp, arch: mlp, depth: 1}",
                              "{name: mlp, arch: mlp, depth: 1, pairing: antithetic, optimizer: sgd, batch_size: 4}"),
    "log-spaced steps": replace(GOOD, "log_steps: [0, 5, 20]", "log_steps: {count: 6}"),
}


def assert_same_units(a: list[UnitSpec], b: list[UnitSpec]) -> None:
    assert [u.unit_id for u in a] == [u.unit_id for u in b]
    assert [u.model_dump() for u in a] == [u.model_dump() for u in b]
    assert a == b


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_ids_and_fields_match_the_reference(name):
    cfg = parse_study(VARIANTS[name])
    for digest in ("0123abcd", "another digest"):
        assert_same_units(expand(cfg, digest), reference_expand(cfg, digest))


@pytest.mark.parametrize("path", BUILTIN, ids=[p.name for p in BUILTIN])
def test_builtin_studies_keep_their_ids(path):
    cfg = load_study(path)
    assert_same_units(expand(cfg, "builtin digest"), reference_expand(cfg, "builtin digest"))


def test_a_large_study_keeps_its_ids():
    """Thousands of units of two models at five widths (the shape of the scale studies)."""
    text = replace(replace(GOOD, "widths: [8, 16]", "widths: [8, 16, 32, 64, 128]"), "ensemble_size: 4",
                   "ensemble_size: 6000\nmembers_per_unit: 7")
    cfg = parse_study(text)
    units = expand(cfg, "d")
    assert len(units) == 2 * 5 * 858 and len({u.unit_id for u in units}) == len(units)
    assert_same_units(units, reference_expand(cfg, "d"))


def test_marker_in_the_spec_falls_back_to_whole_encoding():
    """A spec whose own text held the member-range stand-in would be encoded whole per unit."""
    fields = dict(study_seed=0, model={"name": grid._START}, width=1, member_start=0, member_stop=1)
    ids = grid._id_template(fields, "d")
    for a, b in ((0, 1), (5, 9)):
        assert ids(a, b) == reference_unit_id({**fields, "member_start": a, "member_stop": b}, "d")


def test_units_are_frozen_and_independent():
    cfg = parse_study(replace(GOOD, "ensemble_size: 4", "ensemble_size: 4\nmembers_per_unit: 2"))
    a, b = expand(cfg, "d")[:2]
    assert (a.member_start, a.member_stop, b.member_start, b.member_stop) == (0, 2, 2, 4)
    with pytest.raises(Exception):
        a.member_start = 3  # frozen: copies cannot be changed under each other
