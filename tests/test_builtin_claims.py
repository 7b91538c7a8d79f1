"""What the built-in study must show, checked on a real run of it.

Opt-in (`pytest --runslow`, about 7 minutes on 2 cores): runs `eqntk run` on the built-in
study, or reads an existing run when `EQNTK_BUILTIN_RESULTS` names its directory, and checks
the claims from its analysis tables, each with a fixed threshold:
- at the largest width the MLP and group-MLP ensembles agree with their analytic means,
  median |z| <= 2 over all eval sets and logged steps after initialisation;
- the mean error falls with width (negative fitted slope) for every family on every eval
  set, off-manifold sets included;
- the augmented-vs-GCNN gap (in combined SE, pooled over steps) shrinks with width in every
  family, and for the MLP families sits within 3 combined SE at the largest width on every
  eval set;
- the augmented ensembles' orbit spread shrinks with width.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.compare import fit_slope, pooled_errors, pooled_gaps, pooled_spread

pytestmark = pytest.mark.slow

MLP_FAMILIES = ("mlp_aug", "group_mlp")


@pytest.fixture(scope="module")
def tables(tmp_path_factory) -> dict[str, pd.DataFrame]:
    given = os.environ.get("EQNTK_BUILTIN_RESULTS")
    if given:
        out = Path(given)
    else:
        out = tmp_path_factory.mktemp("builtin") / "results"
        subprocess.run([sys.executable, "-m", "eqntk.cli", "run", "--out", str(out), "--no-progress"], check=True)
    d = out / "analysis"
    t = {name: pd.read_parquet(d / f"{name}.parquet") for name in ("agreement", "pairs", "invariance", "models")}
    t["points"] = pd.read_parquet(d / "points.parquet", columns=["model", "width", "step", "z"])
    return t


def _largest(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["width"] == frame.groupby("model")["width"].transform("max")]


def test_mlp_families_agree_with_theory_at_largest_width(tables):
    z = _largest(tables["points"])
    z = z[(z["step"] > 0) & z["model"].isin(MLP_FAMILIES)]
    assert set(z["model"]) == set(MLP_FAMILIES)
    for model, rows in z.groupby("model"):
        median = rows["z"].abs().median()  # over every point: eval sets, orbits, outputs, steps
        assert median <= 2.0, f"{model}: median |z| {median:.3f}"


def test_error_falls_with_width_for_every_family_and_eval_set(tables):
    e = pooled_errors(tables["agreement"], ["model", "eval_set", "width"])
    for (model, eval_set), rows in e.groupby(["model", "eval_set"]):
        slope = fit_slope(rows["width"], rows["rel_err"])
        assert slope < 0, f"{model} on {eval_set}: slope {slope:.3f}"


def test_augmented_gcnn_gap_shrinks_and_mlp_gap_within_3_se(tables):
    p = tables["pairs"]
    p = p[p["kind"] == "augmentation"]
    assert len(p), "no augmented-vs-GCNN pairs"
    # where the analytic means agree (the theorem applies); the escnn basis is another model
    theorem = pooled_gaps(p, ["a", "b"])
    applies = theorem.loc[theorem["theory_rel_gap"] < 1e-6, ["a", "b"]]
    p = p.merge(applies, on=["a", "b"])
    per_width = pooled_gaps(p, ["a", "b", "width"])
    for (a, b), rows in per_width.groupby(["a", "b"]):
        rows = rows.sort_values("width")
        assert rows["gap_se"].iloc[-1] < rows["gap_se"].iloc[0], f"{a} vs {b}: {rows['gap_se'].tolist()}"
    mlp = p[p["a"].isin(MLP_FAMILIES) & p["b"].isin(MLP_FAMILIES)]
    assert len(mlp)
    at_largest = pooled_gaps(mlp[mlp["width"] == mlp["width"].max()], ["eval_set"])
    assert (at_largest["members_a"] >= 64).all() and (at_largest["members_b"] >= 64).all()
    assert set(at_largest["eval_set"]) >= {"train", "digits_test", "noise", "photos"}
    assert (at_largest["gap_se"] <= 3.0).all(), at_largest[["eval_set", "gap_se"]]


def test_augmented_orbit_spread_shrinks_with_width(tables):
    models = tables["models"]
    augmented = models.loc[models["augmentation"] != "none", "model"]
    s = pooled_spread(tables["invariance"], ["model", "width"])
    s = s[s["model"].isin(augmented)]
    assert set(s["model"]) == set(augmented)
    for model, rows in s.groupby("model"):
        slope = fit_slope(rows["width"], rows["spread"])
        assert np.isfinite(slope) and slope < 0, f"{model}: slope {slope}"
