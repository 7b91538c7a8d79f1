"""The HTML report: its files, verdicts that follow the numbers, and that a real browser renders it.

Uses the synthetic results directories of conftest's ``make_results`` (closed-form kernels, known
offsets, members 0.05 apart: too noisy to resolve the biases it was built with) and
``make_quiet_results`` (the same, members 1e-4 apart: every bias resolved).
"""

from __future__ import annotations

import json
import html
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import verdicts
from analysis.summary import Summary, fmt, pct2, summary_table
from eqntk import pipeline
from eqntk.store import ResultStore

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="module")
def page(tmp_path_factory, make_results, closed_form_kernel_fn) -> Path:
    out = make_results(tmp_path_factory.mktemp("report") / "run")
    return pipeline.report(out, kernel_fn=closed_form_kernel_fn, workers=1, log=lambda *_: None)


@pytest.fixture(scope="module")
def quiet(tmp_path_factory, make_quiet_results, closed_form_kernel_fn) -> tuple[dict, dict, Path]:
    """``(tables, resolved, page)`` of the quiet synthetic study."""
    out = make_quiet_results(tmp_path_factory.mktemp("report") / "quiet")
    page = pipeline.report(out, kernel_fn=closed_form_kernel_fn, workers=1, log=lambda *_: None)
    return pipeline.load_tables(out), ResultStore(out).resolved_study(), page


def by_question(vs: list) -> dict:
    return {v.question: v for v in vs}


def img_sources(text: str) -> list[str]:
    return re.findall(r"<img[^>]*\ssrc=['\"]([^'\"]+)['\"]", text)


def test_files_and_no_external_resources(page):
    text = page.read_text()
    srcs = img_sources(text)
    assert len(srcs) >= 6  # trajectories, error, gap vs width, gap vs time, orbit spread, z-scores, ...
    for s in srcs:
        assert not s.startswith(("http:", "https:", "//", "/")), s
        assert (page.parent / s).is_file(), s
    assert not re.search(r"(src|href)=['\"](https?:)?//", text)  # nothing fetched from the network
    assert (page.parent / "summary.csv").is_file()
    summary = pd.read_csv(page.parent / "summary.csv")
    assert list(summary["model"]) == ["mlp_aug", "group_mlp", "group_mlp_full", "mlp_plain", "mlp_random"]
    assert len(summary.columns) <= 8  # the page's summary table fits the page; the rest is in details.csv
    assert (page.parent / "details.csv").is_file() and (page.parent / "width_fit.csv").is_file()
    table = re.search(r"<table[^>]*summary.*?</table>", text, re.S).group(0)
    assert table.count("<th>") <= 8
    # the diverged and the failed unit are listed
    assert text.count("diverged") >= 2 and "synthetic failure" in text


def test_verdicts_follow_the_numbers(page):
    """Each verdict states the measured numbers, and its wording flips when the numbers do."""
    out = page.parent.parent
    tables = pipeline.load_tables(out)
    assert tables is not None  # the report's own tables are current
    resolved = ResultStore(out).resolved_study()
    s = Summary(tables, resolved)
    summary = summary_table(s)
    text = page.read_text()
    for v in summary["median_abs_z"]:
        assert fmt(v) in text
    # members 0.05 apart and 2-4 draws: no bias of 0.4/32 can be resolved, none excluded above 10%
    agr = verdicts.agreement(s)
    assert [v.answer for v in agr] == ["inconclusive", "inconclusive"]  # families mlp, group_mlp
    # the MLP control (mlp_plain vs group_mlp) is not resolved at 5 combined SE: every theorem verdict is inconclusive
    th = verdicts.theorem(s)
    assert len(th) == 4 and {v.answer for v in th} == {"inconclusive"}
    assert all("no positive control is resolved" in v.text and "mlp_plain vs group_mlp" in v.text and "below 5" in v.text
               for v in th)
    # each verdict opens with its answer and key number on the page
    for v in agr + th:
        assert f"<span class='answer {v.answer}'>{v.answer}</span>: {v.key}" in text.replace("&#x27;", "'")


def test_verdicts_json(page):
    records = json.loads((page.parent / "verdicts.json").read_text())
    assert records and all(set(r) == {"question", "answer", "key", "text"} for r in records)
    assert {r["answer"] for r in records} <= {"agrees", "differs", "inconclusive"}
    text = page.read_text()
    # in page order, each with its one-line text on the page
    positions = [text.find(html.escape(r["text"].rstrip("."))) for r in records]
    assert -1 not in positions and positions == sorted(positions)


def test_verdict_words_switch(quiet):
    """On the quiet study every number the verdicts print is known: they say "differs" where
    the construction put a difference, "agrees" where it did not, "inconclusive" without power
    or without a control."""
    tables, resolved, page = quiet
    s = Summary(tables, resolved)
    # the ensemble means sit at mu (1 + b / width): biases 0.4/32 (mlp_aug) and 0.2/32 (group_mlp)
    agr = by_question(verdicts.agreement(s))
    mlp = agr["Does the finite ensemble agree with theory at the largest width? (mlp)"]
    assert mlp.answer == "differs" and mlp.key.startswith(pct2(s.errors_by_step.query(
        "model == 'mlp_aug' and width == 32 and step == 20")["rel_bias"].iloc[0]))
    assert abs(s.errors_by_step.query("model == 'mlp_aug' and width == 32 and step == 20")["rel_bias"].iloc[0] - 0.4 / 32) < 1e-3
    # no excess error at all: the mean equals theory within a small bound
    flat = {k: v.copy() for k, v in tables.items()}
    flat["agreement"]["err_ss"] = flat["agreement"]["se_ss"]
    ok = by_question(verdicts.agreement(Summary(flat, resolved)))["Does the finite ensemble agree with theory at the largest width? (mlp)"]
    assert ok.answer == "agrees" and "equals theory within" in ok.text

    # the bias falls exactly as 1/width: exponent -1; made to fall as 1/sqrt(width), it differs
    wd = by_question(verdicts.width(s))
    assert wd["Does the finite-width bias of the mean fall as 1/width? (mlp)"].answer == "agrees"
    assert wd["Does the finite-width bias of the mean fall as 1/width? (mlp)"].key.startswith("-1 [")
    slow = {k: v.copy() for k, v in tables.items()}
    a = slow["agreement"]
    a.loc[a["width"] == 32, "err_ss"] *= 4  # bias at 32 twice as large: exponent -1/2
    wd = by_question(verdicts.width(Summary(slow, resolved)))
    v = wd["Does the finite-width bias of the mean fall as 1/width? (mlp)"]
    assert v.answer == "differs" and v.key.startswith("-0.5") and "consistent with -1/2" in v.text

    # the theorem: augmented and GCNN means differ by (0.4 - 0.2)/32 at width 32, resolved
    th = by_question(verdicts.theorem(s))
    v = th["Does the augmentation theorem hold at finite width? (mlp_aug vs group_mlp)"]
    assert v.answer == "differs" and "resolved" in v.details
    gap = s.pair_all.query("a == 'mlp_aug' and b == 'group_mlp' and width == 32").iloc[0]
    assert gap["rel_gap_lo"] <= 0.2 / 32 <= gap["rel_gap_hi"]
    # no gap beyond the noise: equal within a stated bound (the upper end of the interval)
    same = {k: v.copy() for k, v in tables.items()}
    p = same["pairs"]
    p.loc[p["kind"] == "augmentation", "diff_ss"] = p.loc[p["kind"] == "augmentation", "comb_ss"]
    v = by_question(verdicts.theorem(Summary(same, resolved)))["Does the augmentation theorem hold at finite width? (mlp_aug vs group_mlp)"]
    assert v.answer == "agrees" and "augmented and GCNN means equal within" in v.text and "(95% CI)" in v.text
    # without its positive control the same numbers are inconclusive, and the verdict names the missing control
    same["pairs"] = p[p["kind"] != "control"]
    v = by_question(verdicts.theorem(Summary(same, resolved)))["Does the augmentation theorem hold at finite width? (mlp_aug vs group_mlp)"]
    assert v.answer == "inconclusive" and "no positive control" in v.text and "non-augmented mlp" in v.text

    # invariance: the augmented means are invariant (to rounding); a 10% orbit spread is not
    inv = by_question(verdicts.invariance(s))
    assert inv["Does invariance emerge in the augmented ensembles' mean? (mlp_aug)"].answer == "agrees"
    spread = {k: v.copy() for k, v in tables.items()}
    i = spread["invariance"]
    i.loc[i["model"] == "mlp_aug", "dev_ss"] = 0.01 * i.loc[i["model"] == "mlp_aug", "mean_ss"]
    v = by_question(verdicts.invariance(Summary(spread, resolved)))["Does invariance emerge in the augmented ensembles' mean? (mlp_aug)"]
    assert v.answer == "differs" and v.key.startswith("10%")

    # no escnn-basis GCNN in this study
    assert [v.answer for v in verdicts.escnn(s)] == ["inconclusive"]
    records = json.loads((page.parent / "verdicts.json").read_text())
    assert [r["answer"] for r in records] == [v.answer for q in verdicts.QUESTIONS.values() for v in q(s)]


def _chromium(args: list[str], tmp: Path) -> subprocess.CompletedProcess:
    profile = tempfile.mkdtemp(dir=tmp)
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
           "--disable-background-networking", "--disable-component-update", "--disable-sync",
           f"--user-data-dir={profile}", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium (/usr/bin/chromium) is not installed")
def test_renders_in_chromium(page, tmp_path):
    import matplotlib.image as mpimg

    shot = tmp_path / "shot.png"
    r = _chromium([f"--screenshot={shot}", "--window-size=1200,2000", page.as_uri()], tmp_path)
    assert shot.is_file(), r.stderr[-2000:]
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (2000, 1200)
    # not blank: a good share of the pixels are not background white, and there is contrast
    assert (img.mean(axis=2) < 0.9).mean() > 0.02
    assert img.std() > 0.05

    dom = _chromium(["--dump-dom", page.as_uri()], tmp_path).stdout
    assert dom.count("<table") >= 3  # summary, convergence, pairs, units
    assert "Verdicts" in dom and "augmentation theorem" in dom
    srcs = img_sources(dom)
    assert len(srcs) >= 6
    for s in srcs:
        assert (page.parent / s).is_file(), s


def test_report_before_any_unit_finished(tmp_path, synthetic_study, closed_form_kernel_fn):
    """A results directory whose units are all pending still gets a page that says so."""
    import textwrap

    from eqntk.kinds.ensemble import resolved_study
    from study.config import parse_study
    from study.data import build_data
    TINY = synthetic_study.text

    cfg = parse_study(textwrap.dedent(TINY))
    data = build_data(cfg.data, cfg.seed)
    out = tmp_path / "run"
    ResultStore(out).initialise(TINY, resolved_study(cfg, data.digest()), data)
    page = pipeline.report(out, kernel_fn=closed_form_kernel_fn, workers=1, log=lambda *_: None)
    text = page.read_text()
    assert text.count("nothing can be measured") == 5
    assert text.count(">pending</td>") == 20
    assert not img_sources(text)
