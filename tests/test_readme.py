"""scripts/readme.py: README blocks rendered from results directories, ``--check`` and the
text outside the markers.

Fast tests render from conftest's synthetic results directory (closed-form kernels, report
written in-process) and from small hand-made kernel-regression tables. The opt-in slow test
(``pytest --runslow``) runs the built-in study afresh, or reads ``EQNTK_BUILTIN_RESULTS=DIR``,
and checks the committed README's built-in blocks against it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eqntk import pipeline

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "readme.py"
_spec = importlib.util.spec_from_file_location("readme_script", SCRIPT)
readme = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme)

BUILTIN_BLOCKS = ["builtin-run", "builtin-figure-trajectories", "builtin-summary", "builtin-verdicts",
                  "builtin-figure-error-vs-width"]
REGRESSION_BLOCKS = ["regression-run", "regression-table", "regression-pairs"]


def markers(name: str, body: str = "hand-copied, stale\n") -> str:
    return f"<!-- generated: {name} -->\n{body}<!-- end generated: {name} -->\n"


def page(names: list[str]) -> str:
    """A README with prose around, between and after the blocks."""
    text = "# Title\n\nProse before, with a | pipe and `code`.\n\n"
    for n in names:
        text += markers(n) + f"\nProse after {n}.\n\n"
    return text + "Last line, no newline at the end"


@pytest.fixture(scope="module")
def builtin(tmp_path_factory, make_results, closed_form_kernel_fn) -> Path:
    """The synthetic study's results directory with its report (summary.csv, PNGs)."""
    out = make_results(tmp_path_factory.mktemp("readme") / "run")
    pipeline.report(out, kernel_fn=closed_form_kernel_fn, workers=1, log=lambda *_: None)
    return out


def regression_dir(root: Path, molecules: bool = False) -> Path:
    """A kernel-regression results directory with small hand-made tables: cnn_aug and gcnn
    coincide; the largest size is one draw."""
    root.mkdir(parents=True)
    metric = "test_mae" if molecules else "test_accuracy"
    models = ["cnn", "cnn_aug", "gcnn"]
    rows, pairs = [], []
    for k, kernel in enumerate(["ntk", "nngp"]):
        for size, draws in ((10, 10), (20, 10), (40, 1)):
            for m in models:
                v = (0.5 if m == "cnn" else 0.3) + 0.01 * k - 0.001 * size
                hw = 0.05 if draws > 1 else float("nan")
                rows.append(dict(model=m, kernel=kernel, time=float("inf"), size=size, draws=draws,
                                 **{metric: v, f"{metric}_lo": v - hw, f"{metric}_hi": v + hw}))
            pairs.append(dict(a_model="cnn", a_kernel=kernel, b_model="cnn_aug", b_kernel=kernel, time=float("inf"),
                              size=size, metric=metric, mean_diff=0.2, ci_lo=0.1, ci_hi=0.3, draws=draws,
                              significant=draws > 1))
    for m in models:
        for size, draws in ((10, 10), (20, 10), (40, 1)):
            pairs.append(dict(a_model=m, a_kernel="ntk", b_model=m, b_kernel="nngp", time=float("inf"), size=size,
                              metric=metric, mean_diff=-0.01, ci_lo=-0.03, ci_hi=0.01, draws=draws, significant=False))
    pd.DataFrame(rows).to_csv(root / "regression_summary.csv", index=False)
    pd.DataFrame(pairs).to_csv(root / "regression_pairs.csv", index=False)
    cfg = dict(kind="kernel_regression", models=[dict(name=m) for m in models], regression=dict(draws=10))
    (root / "study.json").write_text(json.dumps(dict(config=cfg)))
    (root / "kernels").mkdir()
    for i, m in enumerate(models):
        (root / "kernels" / f"{i}.json").write_text(json.dumps(dict(model=m, seconds=10.0 * (i + 1))))
    return root


def script(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *map(str, args)], capture_output=True, text=True)


# ----- rendering ------------------------------------------------------------------------------
def test_summary_table_renders_every_csv_column(builtin):
    csv = pd.read_csv(builtin / "report" / "summary.csv")
    table = readme.summary_block(builtin / "report" / "summary.csv")
    lines = table.splitlines()
    assert lines[0].startswith("| model | width |") and "| median \\|z\\| (null) |" in lines[0]
    assert len(lines) == 2 + len(csv)  # one row per model at its largest width
    assert [line.split(" | ")[0].lstrip("| ") for line in lines[2:]] == list(csv["model"])
    row = csv.iloc[0]
    assert f"{row['median_abs_z']:.2f} ({row['median_abs_z_null']:.2f})" in lines[2]
    # every column is shown (a reference beside its value), none under its raw name when known
    shown = [c for c in csv.columns if c not in readme.SUMMARY_HIDDEN and not (c == "lr" and not csv["model"].duplicated().any())]
    assert len(lines[0].split(" | ")) == len(shown)
    assert not any(f"| {c} |" in lines[0] for c in shown if c in readme.SUMMARY_COLUMNS and readme.SUMMARY_COLUMNS[c][0] != c)
    # an unknown column is rendered under its own name; a known one that is gone is left out
    csv.assign(new_column=1.23456).drop(columns=["median_abs_z_null"]).to_csv(builtin / "extra.csv", index=False)
    table = readme.summary_block(builtin / "extra.csv")
    assert "| new_column |" in table and "1.23 |" in table
    assert "| median \\|z\\| |" in table  # its reference is gone, so no brackets


def test_blocks_of_a_results_directory_are_deterministic(builtin):
    a, images = readme.render({"builtin": builtin})
    b, _ = readme.render({"builtin": builtin})
    strip = lambda blocks: {k: readme.IGNORED.sub("", v) for k, v in blocks.items()}  # noqa: E731
    assert strip(a) == strip(b)
    assert sorted(a) == sorted(BUILTIN_BLOCKS)
    assert set(images) == {"docs/img/builtin_trajectories.png", "docs/img/builtin_error_vs_width.png"}
    run = a["builtin-run"]
    n_units = len(list((builtin / "units").glob("*.json")))
    assert f"training: {n_units} units" in run and "analysis: " in run and "machine: " in run
    assert "peak memory" not in run  # not recorded for this directory
    assert a["builtin-figure-trajectories"] == "![Ensemble means against the analytic NTK prediction over training time]" \
                                               "(docs/img/builtin_trajectories.png)\n"


def test_run_record_gives_end_to_end_time_memory_and_machine(builtin, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "units").symlink_to(builtin / "units")
    (out / "readme_run.json").write_text(json.dumps(dict(
        wall_seconds=199.0, peak_rss_bytes=1.0e9, report_seconds=5.0, training_seconds=176.0, load_average=[0.1, 0.2, 0.3],
        machine=dict(platform="Linux-test", cpus=2, memory_gib=24, gpu=None))))
    text = readme.run_facts(out)
    for words in ("2 min 56 s wall", "report: 5.0 s", "end to end: 3 min 19 s", "peak memory: 1.0 GB",
                  "machine: Linux-test, 2 CPUs, 24 GiB, no GPU; load average before the run 0.1, 0.2, 0.3"):
        assert words in text, (words, text)
    assert "<!--" not in text  # the load average is recorded, so nothing is read from the clock


def test_verdicts_from_verdicts_json_and_without_it(builtin, tmp_path):
    out = tmp_path / "run"
    (out / "report").mkdir(parents=True)
    assert "No verdicts" in readme.verdicts_block(out)
    (out / "report" / "verdicts.json").write_text(json.dumps([
        dict(question="Agreement?", answer="yes", key="0.8", text="median |z| 0.8, |z| &lt; 2 for 86%"),
        dict(question="Width?", answer="", key="width", text="falls\n  everywhere")]))
    assert readme.verdicts_block(out) == ("- **Agreement?** *yes*: median |z| 0.8, |z| < 2 for 86%\n"
                                          "- **Width?** falls everywhere\n")
    (out / "report" / "verdicts.json").write_text(json.dumps([
        dict(question="Q (mlp)", answer="agrees", key="1.2% [0%, 3%]", text="the bias is small")]))
    assert readme.verdicts_block(out) == "- **Q (mlp)** *agrees* (1.2% [0%, 3%]): the bias is small\n"


def test_regression_tables_and_pairs(tmp_path):
    out = regression_dir(tmp_path / "reg")
    table = readme.regression_table(out)
    assert "| n | cnn NTK | cnn_aug = gcnn NTK | cnn NNGP | cnn_aug = gcnn NNGP |" in table
    assert "| 10 | 49.0 ± 5.0 | 29.0 ± 5.0 | 50.0 ± 5.0 | 30.0 ± 5.0 |" in table
    assert "| 40 | 46.0 | 26.0 | 47.0 | 27.0 |" in table  # one draw: no interval
    pairs = readme.regression_pairs(out)
    assert "- cnn - cnn_aug = gcnn, NTK: +20.0 points" in pairs
    assert "excludes 0 at n = 10, 20 (2 of the 2 sizes with 10 draws); +20.0 at n = 40 (one draw)" in pairs
    assert "- cnn_aug = gcnn, NTK - NNGP: -1.0 points" in pairs and "none of the 2 sizes" in pairs
    mol = readme.regression_table(regression_dir(tmp_path / "mol", molecules=True))
    assert "| training molecules |" in mol and "| 10 | 0.490 [0.44, 0.54] |" in mol
    assert "kernels: cnn 10 s, cnn_aug 20 s, gcnn 30 s, 60 s in all" in readme.run_facts(out)


def qm9_dir(root: Path) -> Path:
    """A QM9 results directory with a hand-made table: two per-atom models under NTK and NNGP,
    a descriptor kernel filed under both names, the per-element baseline; size 20 is one draw."""
    (root / "kernels").mkdir(parents=True)
    (root / "report").mkdir()
    rows = []
    for model, arch in (("gcnn", "so3_gcnn"), ("mlp", "sphere_mlp"), ("coulomb", "coulomb_laplacian")):
        for kernel in ("ntk", "nngp"):
            for size, draws in ((10, 3), (20, 1)):
                for d in range(draws):
                    mae = {"gcnn": 0.100, "mlp": 0.200, "coulomb": 0.150}[model] + 0.01 * d + (0.002 if kernel == "nngp" else 0)
                    rows.append(dict(model=model, arch=arch, kernel=kernel, time=float("inf"), size=size, draw=d,
                                     test_mae=mae, test_rmse=2 * mae, baseline_mae=0.5 + 0.01 * d, baseline_rmse=0.7))
    pd.DataFrame(rows).to_parquet(root / "regression.parquet")
    (root / "study.json").write_text(json.dumps(dict(config=dict(models=[dict(name="gcnn"), dict(name="mlp")],
                                                                   regression=dict(draws=3)))))
    (root / "report" / "learning_curves.png").write_bytes(b"png")
    (root / "kernels" / "a.json").write_text(json.dumps(dict(model="gcnn", seconds=100.0, atom_pairs_computed=4.0e7,
                                                             blocks=10, blocks_computed=10, cpu_seconds=160.0)))
    (root / "kernels" / "b.json").write_text(json.dumps(dict(model="coulomb", seconds=1.0)))
    (root / "readme_run.json").write_text(json.dumps(dict(wall_seconds=161.0, load_average=[1.0, 1.0, 1.0],
                                                          machine=dict(platform="Linux-test", cpus=2, memory_gib=24, gpu=None))))
    return root


def test_qm9_blocks_in_mev_with_winners_and_speed(tmp_path):
    blocks, images = readme.render({"qm9": qm9_dir(tmp_path / "qm9")})
    assert sorted(blocks) == ["qm9-figure", "qm9-run", "qm9-speed", "qm9-table", "qm9-wins"]
    assert images == {"docs/img/qm9_learning_curves.png": tmp_path / "qm9" / "report" / "learning_curves.png"}
    table = blocks["qm9-table"]
    assert "| training molecules | per-element linear | gcnn NTK | gcnn NNGP | mlp NTK | mlp NNGP | coulomb |" in table
    # 3 draws of 100, 110, 120 meV: mean 110, t(0.975, 2) * 10 / sqrt(3) = 24.8
    assert "| 10 | 510 [485, 535] | 110 [85.2, 135] | 112 [87.2, 137] |" in table
    assert "| 20 | 500 | 100 | 102 | 200 | 202 | 150 |" in table  # one draw: no interval
    wins = blocks["qm9-wins"]
    assert "- n = 10: **gcnn NTK** 110 meV; significantly behind it" in wins
    assert "gcnn NNGP +2.0 [2.0, 2.0]" in wins and "per-element linear +400" in wins
    assert "- n = 20: **gcnn NTK** 100 meV (one draw, no interval" in wins
    speed = blocks["qm9-speed"]
    # 100 s on 2 CPUs for 4e7 pairs: 5 us of wall time per pair per CPU, 160 CPU seconds: 4 us of CPU time;
    # 161 s end to end, 100 s of atom kernels: 61 s that does not spread, plus 160 / N
    assert "- gcnn: 4e+07 atom pairs computed" in speed and "5.00 us of wall time per atom pair per CPU" in speed
    assert "4.00 us of CPU time" in speed and "2 min 41 s end to end on 2 CPUs" in speed
    assert "1 CPUs ~3 min 41 s, 16 CPUs ~71 s, 64 CPUs ~64 s" in speed and "plus the 61 s that does not spread" in speed


def test_so3_blocks_summary_and_gaps_in_study_order(builtin):
    blocks, images = readme.render({"so3": builtin})
    assert sorted(blocks) == ["so3-gaps", "so3-run", "so3-summary"] and not images
    gaps = blocks["so3-gaps"].splitlines()
    assert "| pair | width | train | noise |" in gaps  # train first, then the study's eval sets
    assert any(line.startswith("| mlp_aug vs group_mlp | 32 |") for line in gaps)


def test_run_records_what_the_directory_lacks(tmp_path, monkeypatch, regression_small_study):
    """``--run`` runs the study into a fresh directory, records the run beside it and renders."""
    study = tmp_path / "regression_small.yaml"
    study.write_text(regression_small_study)
    monkeypatch.setitem(readme.STUDIES, "regression", study)
    monkeypatch.setattr(readme.tempfile, "tempdir", str(tmp_path))
    md = tmp_path / "README.md"
    md.write_text(page(REGRESSION_BLOCKS))
    assert readme.main(["--run", "regression", "--readme", str(md)]) == 0
    (out,) = tmp_path.glob("readme-results-*/regression")
    record = json.loads((out / "readme_run.json").read_text())
    assert record["wall_seconds"] > 0 and record["machine"]["cpus"] == os.cpu_count()
    text = md.read_text()
    assert "end to end: " in text and "load average before the run" in text and "| n | cnn NTK, t = inf |" in text
    assert readme.main(["--check", "--regression", str(out), "--readme", str(md)]) == 0


# ----- the command: write, --check, text outside the markers ---------------------------------
def test_check_fails_on_stale_blocks_and_passes_after_writing(builtin, tmp_path):
    reg = regression_dir(tmp_path / "reg")
    md = tmp_path / "README.md"
    md.write_text(page(BUILTIN_BLOCKS + REGRESSION_BLOCKS))
    before = md.read_text()
    args = ["--builtin", builtin, "--regression", reg, "--readme", md]
    r = script(*args, "--check")
    assert r.returncode == 1, r.stderr
    stale = r.stdout.split()
    assert set(BUILTIN_BLOCKS + REGRESSION_BLOCKS) <= set(stale), r.stdout
    assert md.read_text() == before and not (tmp_path / "docs").exists()  # --check writes nothing
    r = script(*args)
    assert r.returncode == 0, r.stderr
    r = script(*args, "--check")
    assert r.returncode == 0, r.stdout + r.stderr
    for name in ("trajectories", "error_vs_width"):
        assert (tmp_path / "docs" / "img" / f"builtin_{name}.png").read_bytes() == \
               (builtin / "report" / f"{name}.png").read_bytes()
    # the text outside the markers is untouched: blank every block and compare
    assert _blank(md.read_text()) == _blank(before)
    # rewriting from the same directories changes no byte
    written = md.read_text()
    assert script(*args).returncode == 0 and md.read_text() == written
    # one block edited by hand, one image replaced: both named
    md.write_text(written.replace("| model | width |", "| model | size |"))
    (tmp_path / "docs" / "img" / "builtin_trajectories.png").write_bytes(b"not the report's figure")
    r = script(*args, "--check")
    assert r.returncode == 1 and r.stdout.split() == ["stale:", "builtin-summary", "docs/img/builtin_trajectories.png"]
    assert script(*args, "--check", "--ignore", "builtin-summary", "--ignore", "docs/img/builtin_trajectories.png").returncode == 0


def _blank(text: str) -> str:
    for n in BUILTIN_BLOCKS + REGRESSION_BLOCKS:
        text = readme.block_pattern(n).sub(r"\1\3", text)
    return text


def test_load_average_comment_is_not_compared(builtin, tmp_path):
    md = tmp_path / "README.md"
    md.write_text(page(BUILTIN_BLOCKS))
    assert script("--builtin", builtin, "--readme", md).returncode == 0
    text = md.read_text()
    assert "<!-- load average when generated:" in text
    md.write_text(readme.IGNORED.sub("<!-- load average when generated: 99.0, 99.0, 99.0 (1, 5, 15 min) -->\n", text))
    assert script("--builtin", builtin, "--readme", md, "--check").returncode == 0


@pytest.mark.parametrize("case, words", [
    ("no dirs", ["--builtin", "--run"]),
    ("missing dir", ["--builtin", "not a directory"]),
    ("no summary", ["--builtin", "summary.csv", "eqntk report"]),
    ("no markers", ["--readme", "generated: builtin-summary", "add the two marker lines"]),
    ("bad verdicts", ["--builtin", "verdicts.json"]),
])
def test_bad_input_one_line_exit_2_nothing_written(builtin, tmp_path, case, words):
    md = tmp_path / "README.md"
    md.write_text(page(BUILTIN_BLOCKS))
    args = ["--builtin", builtin, "--readme", md]
    if case == "no dirs":
        args = ["--readme", md]
    elif case == "missing dir":
        args = ["--builtin", tmp_path / "nowhere", "--readme", md]
    elif case == "no summary":
        (tmp_path / "run").mkdir()
        (tmp_path / "run" / "study.json").write_text("{}")
        args = ["--builtin", tmp_path / "run", "--readme", md]
    elif case == "no markers":
        md.write_text(page([n for n in BUILTIN_BLOCKS if n != "builtin-summary"]))
    elif case == "bad verdicts":
        copy = tmp_path / "copy"
        for sub in ("units", "analysis", "study.json"):
            (copy / sub).parent.mkdir(parents=True, exist_ok=True)
            (copy / sub).symlink_to(builtin / sub)
        (copy / "report").mkdir()
        for f in (builtin / "report").iterdir():
            (copy / "report" / f.name).symlink_to(f)
        (copy / "report" / "verdicts.json").write_text('{"not": "a list"}')
        args = ["--builtin", copy, "--readme", md]
    before = md.read_text()
    r = script(*args)
    assert r.returncode == 2, r.stdout + r.stderr
    err = r.stderr.strip()
    assert len(err.splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)
    assert md.read_text() == before and not (tmp_path / "docs").exists()


# ----- the committed README against a fresh built-in run -----------------------------------
@pytest.mark.slow
def test_committed_readme_matches_the_builtin_study(tmp_path_factory):
    """The README's built-in blocks are what the study gives. A fresh run's timings are its own,
    so against a fresh run the run facts are not compared; against a given directory they are."""
    given = os.environ.get("EQNTK_BUILTIN_RESULTS")
    ignore = []
    if given:
        out = Path(given)
    else:
        out = tmp_path_factory.mktemp("builtin") / "results"
        subprocess.run([sys.executable, "-m", "eqntk.cli", "run", "--out", str(out), "--no-progress"], check=True)
        ignore = ["--ignore", "builtin-run"]
    r = script("--check", "--builtin", out, *ignore)
    assert r.returncode == 0, r.stdout + r.stderr
    assert np.all([n in (ROOT / "README.md").read_text() for n in BUILTIN_BLOCKS])
