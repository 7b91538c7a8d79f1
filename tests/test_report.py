"""The HTML report: its files, verdicts that follow the numbers, and that a real browser renders it.

Uses the synthetic results directory of conftest's ``make_results`` (closed-form kernels, known offsets).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import verdicts
from analysis.summary import Summary, fmt, summary_table
from eqntk import pipeline
from eqntk.store import ResultStore

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)


@pytest.fixture(scope="module")
def page(tmp_path_factory, make_results, closed_form_kernel_fn) -> Path:
    out = make_results(tmp_path_factory.mktemp("report") / "run")
    return pipeline.report(out, kernel_fn=closed_form_kernel_fn, workers=1, log=lambda *_: None)


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
    assert "within 3 SE in 8 of 8" in verdicts.theorem(s)
    assert "falls for 5 of 5 models" in verdicts.width(s, summary)

    # push the augmented ensemble's mean far from the GCNN's: the theorem verdict must say so
    bad = {k: v.copy() for k, v in tables.items()}
    bad["pairs"]["diff_ss"] *= 1e8  # gaps 1e4 times larger
    bad["pairs"] = bad["pairs"].pipe(lambda d: d.assign(gap_se=np.sqrt(d["diff_ss"] / d["comb_ss"])))
    assert "within 3 SE in 0 of 8" in verdicts.theorem(Summary(bad, resolved))
    # z-scores far beyond the null make the agreement verdict say "deviates"
    bad = {k: v.copy() for k, v in tables.items()}
    bad["points"]["z"] *= 1e3
    assert "deviates from theory" in verdicts.agreement(Summary(bad, resolved))
    assert "deviates" not in verdicts.agreement(s)


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
