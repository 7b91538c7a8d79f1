"""The runner and the store at many units (benchmarks/scale.py): every unit's part is written
once, nothing is lost or duplicated, the status and the analysis read them all, before and
after ``eqntk compact`` merges them (with the same tables).

The default test runs 200 tiny units on local Ray through the benchmark script itself; the
opt-in slow test (``pytest --runslow``) runs 2,000 on local Ray and on a two-node Ray cluster
on this machine. Speed is measured by the script (README "Beyond one machine"), never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from eqntk.store import read_predictions

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "scale.py"
EQNTK = str(Path(sys.executable).with_name("eqntk"))


def run_scale(tmp_path: Path, units: list[int], clusters: list[str], keep: Path | None = None) -> dict:
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(SCRIPT), "--units", *map(str, units), "--clusters", *clusters, "--out", str(out)]
    if keep:
        cmd += ["--keep", str(keep)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, cwd=ROOT,
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return json.loads(out.read_text())


def check_rows(rec: dict, units: list[int], clusters: list[str]) -> None:
    assert [(r["cluster"], r["units"]) for r in rec["rows"]] == [(c, n) for c in clusters for n in units]
    for r in rec["rows"]:
        assert r["part_files"] == r["units"]  # one part per unit, none lost, none extra
        assert r["part_bytes"] > 0 and r["driver_peak_rss_bytes"] > 0
        assert r["analyze_read_seconds"] >= 0 and r["training_seconds"] > 0
        assert r["nodes"] == (2 if r["cluster"] == "two-node" else 1)
        # one partition (one model, one width): its parts make one compacted file
        assert r["compacted_files"] == 1 and 0 < r["compacted_bytes"] and r["tables_identical"]
        assert r["compacted_analyze_read_seconds"] >= 0 and r["compact_seconds"] >= 0


def test_two_hundred_units_local(tmp_path):
    keep = tmp_path / "kept"
    rec = run_scale(tmp_path, [200], ["local"], keep=keep)
    check_rows(rec, [200], ["local"])
    (out,) = keep.iterdir()
    # every row of every unit is read back once: 2 logs x (4 + 2 inputs) x 4 x 10 outputs per unit
    table = read_predictions(out, columns=["unit_id", "step"])
    assert table.num_rows == 200 * 2 * 6 * 4 * 10
    assert len(set(table.column("unit_id").to_pylist())) == 200
    assert len(ds.dataset(out / "predictions", format="parquet", partitioning="hive").files) == 1  # compacted
    assert not list(out.rglob("part-*.parquet")) and len(list(out.rglob("compact-*.parquet"))) == 1
    status = subprocess.run([EQNTK, "status", str(out)], capture_output=True, text=True, timeout=120)
    assert status.returncode == 0 and "200 done" in status.stdout, status.stdout + status.stderr


@pytest.mark.slow
def test_two_thousand_units_local_and_two_nodes(tmp_path):
    units, clusters = [200, 2000], ["local", "two-node"]
    check_rows(run_scale(tmp_path, units, clusters), units, clusters)
