"""What the built-in study must show, checked on a real run of it.

Opt-in (`pytest --runslow`, about 6 minutes on 2 cores): runs `eqntk run` on the built-in
study, or reads an existing run when `EQNTK_BUILTIN_RESULTS` names its directory, and checks
the claims the README makes from its report and tables:
- every verdict answers agrees / differs / inconclusive with a key number;
- every interval comes from the blocks' jackknife (docs/theory.md §5.6), not the worst-case bound;
- each family's positive control (the unaugmented `mlp` against `group_mlp`, the unaugmented
  `cnn` against `gcnn_full`; analytic means 80-110% apart) is resolved at 5 combined standard
  errors or more at the largest width, so an equality of the augmented and the GCNN means
  means something;
- the augmentation theorem (equal means at infinite width) is never contradicted: an
  augmented-vs-GCNN gap resolved at the largest width falls with width (its exponent's 95%
  interval lies below 0), a finite-width difference;
- the conv families at their largest width (16 regular fields) are outside the kernel regime:
  their ensemble mean differs from theory (the bias's 95% interval excludes 0);
- the bias of every family's mean falls with width (negative fitted exponent).
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

from analysis.compare import fit_exponent, pooled_gaps

pytestmark = pytest.mark.slow

ANSWERS = {"agrees", "differs", "inconclusive"}


@pytest.fixture(scope="module")
def results() -> Path:
    given = os.environ.get("EQNTK_BUILTIN_RESULTS")
    if given:
        return Path(given)
    out = Path(os.environ.get("TMPDIR", "/tmp")) / f"eqntk-builtin-claims-{os.getpid()}"
    subprocess.run([sys.executable, "-m", "eqntk.cli", "run", "--out", str(out), "--no-progress"], check=True)
    return out


@pytest.fixture(scope="module")
def verdicts(results) -> list[dict]:
    return json.loads((results / "report" / "verdicts.json").read_text())


def _about(verdicts, question_start: str) -> list[dict]:
    return [v for v in verdicts if v["question"].startswith(question_start)]


def test_every_verdict_answers_with_a_key_number(verdicts):
    assert verdicts
    for v in verdicts:
        assert set(v) == {"question", "answer", "key", "text"}
        assert v["answer"] in ANSWERS, v
        assert re.search(r"\d", v["key"]), v


def test_intervals_from_the_jackknife(results):
    for table in ("agreement", "pairs", "invariance"):
        kinds = pd.read_parquet(results / "analysis" / f"{table}.parquet")["interval"]
        assert kinds.str.startswith("jackknife").all(), kinds.value_counts()


@pytest.mark.parametrize("control,partner", [("mlp", "group_mlp"), ("cnn", "gcnn_full")])
def test_controls_resolved_at_5_se(results, control, partner):
    pairs = pd.read_parquet(results / "analysis" / "pairs.parquet")
    c = pairs[(pairs["kind"] == "control") & (pairs["a"] == control) & (pairs["b"] == partner)]
    assert len(c), f"the unaugmented {control} is not paired with {partner} as a control"
    top = pooled_gaps(c[c["width"] == c["width"].max()], ["a", "b"])
    assert top["gap_se"].iloc[0] >= 5.0, top[["gap_se", "theory_gap_se"]]


def test_theorem_never_contradicted(results, verdicts):
    theorem = _about(verdicts, "Does the augmentation theorem hold")
    assert len(theorem) >= 3  # the MLP pair and the CNN against two canonical GCNNs
    pairs = pd.read_parquet(results / "analysis" / "pairs.parquet")
    gaps = pooled_gaps(pairs[pairs["kind"] == "augmentation"], ["a", "b", "width"])
    for (a, b), g in gaps.groupby(["a", "b"]):
        g = g.sort_values("width")
        if g["rel_gap_lo"].iloc[-1] > 0:  # resolved at the largest width: must be a finite-width gap
            _, _, hi = fit_exponent(g["width"], g["rel_gap_est"] ** 2, g["rel_gap_lo"] ** 2, g["rel_gap_hi"] ** 2)
            assert hi < 0, (a, b, g[["width", "rel_gap_est", "rel_gap_lo", "rel_gap_hi"]])


def test_conv_families_outside_the_kernel_regime(verdicts):
    agreement = _about(verdicts, "Does the finite ensemble agree with theory")
    conv = [v for v in agreement if v["question"].endswith(("(cnn)", "(gcnn)"))]
    assert len(conv) == 2
    assert all(v["answer"] == "differs" for v in conv), [v["text"] for v in conv]


def test_bias_falls_with_width_for_every_family(verdicts):
    fits = _about(verdicts, "Does the finite-width bias of the mean fall")
    assert len(fits) == 4  # mlp, group_mlp, cnn, gcnn
    for v in fits:
        exponent = float(re.match(r"\s*(-?[\d.]+)", v["key"]).group(1))
        assert exponent < 0, v["text"]
