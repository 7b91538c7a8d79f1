"""Compaction of the result store (eqntk.compact): a kill between any two file operations
leaves every finished unit read exactly once and known as done, a second compaction finishes
the job, the analysis is bit for bit the same, and a rerun retrains nothing."""

from __future__ import annotations

import os
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import study.atomic
from eqntk import compact as cp
from eqntk import pipeline
from eqntk.cli import main
from eqntk.store import PartWriter, ResultStore, read_predictions, scan_partitions
from study.config import StudyError
from study.grid import UnitSpec
from study.spec import ModelSpec
from test_config import GOOD, replace


# ----- a store of known parts, written without training ----------------------------------------
def unit(uid: str, model: str, start: int, members: bool = False) -> UnitSpec:
    return UnitSpec(
        unit_id=uid, study_seed=0, model=ModelSpec(name=model, arch="mlp"), width=8,
        member_start=start, member_stop=start + 2, lr=0.5, steps=10, log_steps=[0, 10],
        dtype="float32", device="cpu", store_members=members,
    )


def build_store(root: Path) -> tuple[ResultStore, list[UnitSpec]]:
    """Two partitions: ``a`` of 7 units (one written by an older eqntk, without the block
    columns, so it cannot share a file with the others) and ``b`` of 5 units."""
    store = ResultStore(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "study.json").write_text("{}")  # enough for ``eqntk compact`` to know it
    rng = np.random.default_rng(1)
    units = [unit(f"a{i:02d}", "a", 2 * i) for i in range(7)] + [unit(f"b{i:02d}", "b", 2 * i) for i in range(5)]
    for u in units:
        w = PartWriter(u)
        for step in (0, 10):
            for ev in ("train", "noise"):
                w.log(step, ev, rng.standard_normal((2, 3, 4, 2)))
        rec = {"status": "done", "unit_id": u.unit_id}
        part = w.finish(rec)
        if u.unit_id == "a03":  # an older part: no block columns
            old = pq.read_table(pa.BufferReader(part)).drop_columns(["block_sum", "block_count"])
            sink = pa.BufferOutputStream()
            pq.write_table(old, sink)
            part = sink.getvalue().to_pybytes()
        store.commit(u, part, rec)
    return store, units


def rows(root: Path) -> pd.DataFrame:
    """Every row as read by the store's reader, in its order (no sorting: the order is part of
    what must not change)."""
    df = read_predictions(root).to_pandas()
    df["model"] = df["model"].astype(str)
    for c in ("block_sum", "block_count"):  # list cells as tuples, which compare exactly
        df[c] = df[c].map(lambda v: None if v is None else tuple(v))
    return df


def same_tables(before: dict, after: dict) -> None:
    """Every analysis table equal bit for bit, but for how long the analytic predictions took
    and whether the second analysis found them cached."""
    for name in pipeline.TABLES:
        volatile = [c for c in ("seconds", "cached") if name == "theory" and c in before[name]]
        pd.testing.assert_frame_equal(after[name].drop(columns=volatile), before[name].drop(columns=volatile),
                                      check_exact=True, obj=name)


class Killed(BaseException):
    """The process died here: it and every later file operation fail."""


class Reaper:
    """Fails the ``at``-th file operation of a compaction and every one after it, as kill -9
    would: the temp file's own clean-up fails too."""

    def __init__(self, at: int):
        self.at, self.count, self.dead = at, 0, False

    def wrap(self, fn):
        def op(*a, **k):
            self.count += 1
            if self.dead or self.count == self.at:
                self.dead = True
                raise Killed(f"killed at operation {self.count}")
            return fn(*a, **k)

        return op


def file_operations(monkeypatch, reaper: Reaper) -> None:
    monkeypatch.setattr(pq.ParquetWriter, "write_table", reaper.wrap(pq.ParquetWriter.write_table))
    monkeypatch.setattr(pq.ParquetWriter, "close", reaper.wrap(pq.ParquetWriter.close))
    monkeypatch.setattr(study.atomic.os, "fsync", reaper.wrap(os.fsync))
    monkeypatch.setattr(study.atomic.os, "replace", reaper.wrap(os.replace))
    monkeypatch.setattr(Path, "unlink", reaper.wrap(Path.unlink))


# a killed writer's finaliser closes it again, and "dies" too
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_kill_at_every_step_reads_each_unit_once_and_resumes(tmp_path, monkeypatch):
    # Small row groups and files: several of each per partition, so every kind of step repeats.
    monkeypatch.setattr(cp, "ROW_GROUP_ROWS", 100)
    monkeypatch.setattr(cp, "MAX_FILE_BYTES", 3 * 30_000)
    ref_root = tmp_path / "ref"
    _, units = build_store(ref_root)
    ref = rows(ref_root)
    ids = {u.unit_id for u in units}
    at = 1
    while True:
        root = tmp_path / f"kill{at}"
        shutil.copytree(ref_root, root)
        store = ResultStore(root)
        reaper = Reaper(at)
        with monkeypatch.context() as m:
            file_operations(m, reaper)
            try:
                cp.compact(store)
            except Killed:
                pass
        if not reaper.dead:
            break  # compaction ran to its end before the at-th operation: every step was covered
        # killed mid-compaction: each unit read once, rows unchanged (order included), all done
        pd.testing.assert_frame_equal(rows(root), ref, check_exact=True)
        assert store.finished_ids() == ids
        assert store.unit_states(units) == {u: "done" for u in ids}
        assert all(store.is_done(u) for u in units)
        # what pandas sees once the next compaction has run: the same rows, nothing left over
        done = cp.compact_dir(root, log=lambda m: None)
        assert store.clean_temp_files() == 0 and not [p for p in root.rglob(".*") if p.name != ".lock"]
        parts = [p for p in root.rglob("part-*.parquet")]
        assert [p.name for p in parts] == ["part-a03.parquet"]  # alone in its schema: nothing to merge it with
        assert cp.compact(store).line() == "compaction: nothing to compact"
        pd.testing.assert_frame_equal(rows(root), ref, check_exact=True)
        raw = pd.read_parquet(root / "predictions")
        assert len(raw) == len(ref) and not raw.duplicated(["unit_id", "step", "eval_set", "sample", "group_element",
                                                            "output"]).any()
        assert done.parts + done.leftovers >= 1
        at += 1
    assert at > 20, f"only {at - 1} operations: the kill points did not cover the compaction"
    # the uninterrupted compaction: a03 left alone, several files per partition, rows intact
    parts = scan_partitions(root / "predictions")
    assert [len(p.compacted) for p in parts] == [2, 2] and [list(p.live_parts) for p in parts] == [["a03"], []]
    pd.testing.assert_frame_equal(rows(root), ref, check_exact=True)
    meta = pq.read_metadata(next(iter(parts[0].compacted)))
    assert meta.num_row_groups > 1 and max(meta.row_group(i).num_rows for i in range(meta.num_row_groups)) <= 100


def test_reader_relists_when_a_compaction_deletes_a_part(tmp_path, monkeypatch):
    """A reader that listed the parts before a compaction deleted them reads the compacted file."""
    store, units = build_store(tmp_path)
    ref = rows(tmp_path)
    import eqntk.store as st

    stale = scan_partitions(store.predictions)
    calls = []
    real = st.scan_partitions

    def listing(base):
        calls.append(1)
        return stale if len(calls) == 1 else real(base)

    cp.compact(store)
    monkeypatch.setattr(st, "scan_partitions", listing)
    pd.testing.assert_frame_equal(rows(tmp_path), ref, check_exact=True)
    assert len(calls) == 2


def test_analysis_tables_bit_identical(tmp_path, make_results, closed_form_kernel_fn, monkeypatch):
    """The synthetic study's tables (a diverged unit and a failed one among them) before and after
    compaction are equal bit for bit."""
    out = make_results(tmp_path / "out")
    before = pipeline.analyze(out, kernel_fn=closed_form_kernel_fn, workers=1, log=lambda m: None)
    # one file per (model, width), but for the one whose other unit failed: its part stays alone
    assert cp.compact_dir(out, log=lambda m: None).files == 9
    assert [p.parent.parent.name for p in out.rglob("part-*.parquet")] == ["model=mlp_plain"]
    assert pipeline.load_tables(out) is not None  # the units' states did not change: report reuses the tables
    after = pipeline.analyze(out, kernel_fn=closed_form_kernel_fn, workers=1, log=lambda m: None)
    same_tables(before, after)


def test_mixed_store_tables_bit_identical(tmp_path, make_results, closed_form_kernel_fn, monkeypatch):
    """Files of one part each: every partition holds several compacted files, whose rows the
    reader puts back in unit order."""
    out = make_results(tmp_path / "out")
    before = pipeline.analyze(out, kernel_fn=closed_form_kernel_fn, workers=1, log=lambda m: None)
    monkeypatch.setattr(cp, "MAX_FILE_BYTES", 1)
    cp.compact(ResultStore(out))
    parts = scan_partitions(out / "predictions")
    assert all(len(p.compacted) == 2 and not p.unit_ordered for p in parts if "mlp_plain/width=32" not in str(p.path))
    after = pipeline.analyze(out, kernel_fn=closed_form_kernel_fn, workers=1, log=lambda m: None)
    same_tables(before, after)


def test_cli_errors(tmp_path, capsys):
    def refused(args, *words):
        assert main(args) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and all(w in err for w in words), err

    refused(["compact", str(tmp_path / "missing")], "DIR", "not an eqntk results directory")
    (tmp_path / "plain").mkdir()
    refused(["compact", str(tmp_path / "plain")], "DIR", "no study.json")
    build_store(tmp_path / "s")
    holder = ResultStore(tmp_path / "s")
    holder.lock()
    try:
        refused(["compact", str(tmp_path / "s")], "DIR", "in use by another eqntk run")
        assert len(list((tmp_path / "s").rglob("part-*.parquet"))) == 12  # nothing compacted under the run
    finally:
        holder.unlock()
    assert main(["compact", str(tmp_path / "s")]) == 0
    assert "11 parts of 2 partition(s) into 2 file(s)" in capsys.readouterr().out
    (tmp_path / "k").mkdir()
    (tmp_path / "k" / "study.json").write_text("{}")
    refused(["compact", str(tmp_path / "k")], "DIR", "no predictions")


# ----- a real study: trained, analysed, compacted at the end of a rerun that trains nothing ----
STUDY = replace(GOOD, "ensemble_size: 4", "ensemble_size: 4\nmembers_per_unit: 1")  # 16 units


def test_real_study_compacted_at_the_end_of_a_rerun(tmp_path, capsys, monkeypatch):
    study = tmp_path / "study.yaml"
    study.write_text(textwrap.dedent(STUDY))
    out = tmp_path / "out"
    assert main(["run", str(study), "--out", str(out), "--no-progress", "--no-analysis", "--no-compact"]) == 0
    assert len(list(out.rglob("part-*.parquet"))) == 16
    one = next(out.rglob("part-*.parquet"))
    saved = one.read_bytes()
    before = pipeline.analyze(out, workers=1, log=lambda m: None)
    capsys.readouterr()
    # the rerun: nothing to train; with the threshold met, it compacts at its end
    monkeypatch.setattr(cp, "AUTO_MIN_PARTS", 16)
    assert main(["run", str(study), "--out", str(out), "--no-progress", "--no-analysis", "--resume"]) == 0
    said = capsys.readouterr().out
    assert "16 units: 16 already done, 0 finished now" in said
    assert "compaction: 16 parts of 4 partition(s) into 4 file(s)" in said
    assert not list(out.rglob("part-*.parquet")) and len(list(out.rglob("compact-*.parquet"))) == 4
    assert main(["status", str(out)]) == 0
    assert "16 done, 0 diverged, 0 failed, 0 pending" in capsys.readouterr().out
    after = pipeline.analyze(out, workers=1, log=lambda m: None)
    same_tables(before, after)
    # as a compaction killed after its rename leaves it: a part its file holds, and a temp file
    one.write_bytes(saved)
    (one.parent / ".compact-x.parquet.0123.tmp.parquet").write_bytes(saved[:100])
    rows = 16 * 3 * 12 * 4 * 10  # units x logged steps x (8 + 4 inputs) x |C4| x outputs
    assert read_predictions(out).num_rows == rows  # each unit once
    assert len(pd.read_parquet(out / "predictions")) == rows + rows // 16  # a plain reader: that unit twice
    assert main(["status", str(out)]) == 0
    assert "16 done, 0 diverged, 0 failed, 0 pending" in capsys.readouterr().out
    # the rerun trains nothing and finishes the compaction (the threshold no longer met)
    monkeypatch.setattr(cp, "AUTO_MIN_PARTS", 100)
    assert main(["run", str(study), "--out", str(out), "--no-progress", "--no-analysis", "--resume"]) == 0
    said = capsys.readouterr().out
    assert "16 already done, 0 finished now" in said and "1 leftover part(s) of an interrupted compaction" in said
    assert len(pd.read_parquet(out / "predictions")) == read_predictions(out).num_rows == rows
    assert not list(out.rglob("part-*.parquet")) and not [p for p in out.rglob(".*") if p.name != ".lock"]
