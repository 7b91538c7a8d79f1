"""What the emergent-invariance study (study/builtin/invariance.yaml) must show, on a real run.

Opt-in (`pytest --runslow`, about 15 minutes on 2 cores): runs `eqntk run` on the study, or
reads an existing run when `EQNTK_INVARIANCE_RESULTS` names its directory, and checks the
claims the README makes from its report (`report/invariance_width.csv`, `invariance_fit.csv`,
`invariance.json`; docs/theory.md §3.4):
- symmetric support with invariant initialisation (`plus`, `full`): the analytic mean is invariant to
  round-off, and the ensemble's systematic orbit spread is consistent with zero at every
  width, step and manifold (each 95% interval holds 0);
- asymmetric support (`cross_corner`) and non-invariant initialisation (`ramp`): the analytic
  mean's orbit spread is not small (over 2% of RMS(mu) on and off the data manifold), and the
  ensemble's systematic spread is resolved (its interval excludes 0) at the largest width;
- every verdict answers agrees / differs / inconclusive with a key number, `differs` for the
  non-invariant models, never for the invariant one.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from analysis.verdicts import ROUNDING_SPREAD

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "study" / "builtin" / "invariance.yaml"
SYMMETRIC, ASYMMETRIC = ["plus", "full"], ["cross_corner", "ramp"]


@pytest.fixture(scope="module")
def results() -> Path:
    given = os.environ.get("EQNTK_INVARIANCE_RESULTS")
    if given:
        return Path(given)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"eqntk-invariance-claims-{os.getpid()}"
    subprocess.run([sys.executable, "-m", "eqntk.cli", "run", str(STUDY), "--out", str(out), "--no-progress"], check=True)
    return out


@pytest.fixture(scope="module")
def width(results) -> pd.DataFrame:
    return pd.read_csv(results / "report" / "invariance_width.csv")


def test_the_study_has_the_three_cases_over_a_factor_16_in_width(width):
    assert set(width["model"]) == set(SYMMETRIC + ASYMMETRIC)
    for _, g in width.groupby("model"):
        assert g["width"].max() >= 16 * g["width"].min()
        assert set(g["manifold"]) == {"on", "off"}


def test_symmetric_support_invariant_at_every_width_and_step(width):
    w = width[width["model"].isin(SYMMETRIC)]
    assert w["jointly_invariant"].all() and (w["analytic"] < 1e-9).all()
    per_step = w[w["step"].notna()]
    assert (per_step["sys_lo"] <= ROUNDING_SPREAD).all(), per_step[per_step["sys_lo"] > ROUNDING_SPREAD]


def test_asymmetric_support_and_init_not_invariant(width):
    w = width[width["model"].isin(ASYMMETRIC) & width["step"].isna()]
    assert not w["jointly_invariant"].any()
    assert (w["analytic"] > 0.02).all(), w[["model", "manifold", "analytic"]]
    for model, g in w.groupby("model"):
        top = g[g["width"] == g["width"].max()]
        assert (top["sys_lo"] > 0).any(), (model, top[["manifold", "sys", "sys_lo", "sys_hi"]])


def test_verdicts(results):
    records = json.loads((results / "report" / "invariance.json").read_text())
    answers = {re.search(r"\((\w+)\)$", r["question"]).group(1): r["answer"] for r in records}
    assert set(answers) == set(SYMMETRIC + ASYMMETRIC)
    for r in records:
        assert r["answer"] in {"agrees", "differs", "inconclusive"} and re.search(r"\d", r["key"]), r
    assert all(answers[m] != "differs" for m in SYMMETRIC), answers
    assert all(answers[m] == "differs" for m in ASYMMETRIC), answers
