"""Compaction: a partition's many part files merged into few larger Parquet files.

Every unit writes one part (``eqntk.store``), and reading costs a few milliseconds a file
whatever its size (benchmarks/scale.py: 11 s of ``eqntk analyze``'s read for 2,000 parts), so
a study of tens of thousands of units would spend minutes opening files. ``compact`` merges the
parts of each ``model=<m>/width=<w>`` partition, in unit id order, into files of at most
``MAX_FILE_BYTES`` of parts with row groups of ``ROW_GROUP_ROWS`` rows; the rows, their order
within a unit and every column (the block lists included) are copied as they are.

Each compacted file is published in three steps, and a kill between any two leaves a store
that reads every finished unit exactly once (``eqntk.store``'s docstring):

1. write it to a hidden temp file (``study.atomic``), its footer listing its units: readers
   and ``clean_temp_files`` ignore or remove the temp file; the parts are untouched;
2. rename it into place: from now on it holds its units and their parts are skipped;
3. delete the parts it holds: a part left behind stays skipped, and the next ``compact``
   (``eqntk run`` calls it at its end, ``eqntk compact DIR`` at any time) deletes it.

The caller holds the store's lock, so no run commits parts and no other compaction works on
the store meanwhile. ``eqntk run`` compacts at its end only when the store has at least
``AUTO_MIN_PARTS`` uncompacted parts.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from study.atomic import atomic_path
from study.config import StudyError

from .store import COMPACT_PREFIX, COMPACTED_KEY, SUFFIX, Partition, ResultStore

# Rows per row group: 2^17 rows of the part schema are about 40 MB before compression (16
# blocks a row), large enough that a file of a partition's parts reads as a few row groups,
# small enough to hold in memory while writing.
ROW_GROUP_ROWS = 2**17
# Parts' bytes per compacted file: a 50,000-unit partition of the scale test's 37 kB parts makes
# 7 files, each read in well under a second.
MAX_FILE_BYTES = 256 * 2**20
# ``eqntk run`` compacts at its end from this many uncompacted parts in the store. Measured
# (benchmarks/scale.json, 2,000 parts): compacting costs about one read of the parts (8.4 s
# against 12 s) and cuts every later read tenfold (1.0 s), so it pays from the second read on
# (``eqntk run`` reads once for its report). Below 100 parts a read costs under half a second
# either way, and the parts stay as they are: one file per unit is the simplest layout to inspect.
AUTO_MIN_PARTS = 100


@dataclass
class Compaction:
    """What one ``compact`` did."""

    partitions: int = 0  # partitions compacted
    parts: int = 0  # parts merged into new compacted files
    files: int = 0  # compacted files written
    leftovers: int = 0  # parts deleted that an earlier, killed compaction had already merged
    bytes_before: int = 0  # the merged parts' bytes
    bytes_after: int = 0  # the new files' bytes
    seconds: float = 0.0
    written: list = field(default_factory=list)

    def line(self) -> str:
        if not self.files and not self.leftovers:
            return "compaction: nothing to compact"
        text = (f"compaction: {self.parts} parts of {self.partitions} partition(s) into {self.files} file(s), "
                f"{self.bytes_before / 1e6:.1f} MB -> {self.bytes_after / 1e6:.1f} MB, in {self.seconds:.1f} s")
        if self.leftovers:
            text += f"; {self.leftovers} leftover part(s) of an interrupted compaction deleted"
        return text


def uncompacted_parts(store: ResultStore) -> int:
    return sum(len(p.live_parts) for p in store.partitions())


def compact(store: ResultStore, min_parts: int = 2) -> Compaction:
    """Merge the uncompacted parts of every partition that has at least ``min_parts`` of them,
    and delete the leftovers of an interrupted compaction in every partition. The caller holds
    ``store``'s lock."""
    t0 = time.perf_counter()
    done = Compaction()
    for partition in store.partitions():
        for part in partition.stale_parts.values():
            part.unlink(missing_ok=True)
            done.leftovers += 1
        live = partition.live_parts
        if len(live) < max(min_parts, 2):
            continue
        done.partitions += 1
        for group in _file_groups(live):
            _write_compacted(partition, group, done)
    done.seconds = time.perf_counter() - t0
    return done


def compact_dir(root: os.PathLike | str, min_parts: int = 2, log=print) -> Compaction:
    """``eqntk compact DIR``: take the directory's lock (refused while a run holds it), remove
    temp files a killed process left, compact."""
    root = Path(root)
    store = ResultStore(root)
    if not store.exists():
        raise StudyError(f"DIR: {root} is not an eqntk results directory (no study.json); run `eqntk run --out {root}` first")
    if not store.predictions.is_dir():
        raise StudyError(f"DIR: {root} holds no predictions (a kernel-regression study, or no unit finished yet); nothing to compact")
    store.lock(what="DIR")
    try:
        store.clean_temp_files()
        done = compact(store, min_parts)
    finally:
        store.unlock()
    log(done.line())
    return done


def auto_compact(store: ResultStore, log=print) -> Compaction:
    """The end of ``eqntk run`` (lock held): compact when at least ``AUTO_MIN_PARTS`` parts are
    uncompacted; otherwise only delete the leftovers of an interrupted compaction."""
    many = uncompacted_parts(store) >= AUTO_MIN_PARTS
    done = compact(store, min_parts=2 if many else 2**62)
    if done.files or done.leftovers:
        log(done.line())
    return done


def _file_groups(live: dict[str, Path]) -> list[list[tuple[str, Path]]]:
    """The parts to merge, in unit id order, split into groups of one schema (parts an older
    eqntk wrote may lack newer columns) and at most ``MAX_FILE_BYTES``."""
    by_schema: dict[pa.Schema, list[tuple[str, Path]]] = {}
    for uid in sorted(live):
        schema = pq.read_schema(live[uid]).remove_metadata()
        key = next((s for s in by_schema if s.equals(schema)), schema)
        by_schema.setdefault(key, []).append((uid, live[uid]))
    groups = []
    for parts in by_schema.values():
        if len(parts) < 2:  # a part alone in its schema: merging it would gain nothing
            continue
        group, size = [], 0
        for uid, path in parts:
            n = path.stat().st_size
            if group and size + n > MAX_FILE_BYTES:
                groups.append(group)
                group, size = [], 0
            group.append((uid, path))
            size += n
        groups.append(group)
    return groups


def _write_compacted(partition: Partition, group: list[tuple[str, Path]], done: Compaction) -> None:
    units = [uid for uid, _ in group]
    digest = hashlib.sha256("\n".join(units).encode()).hexdigest()[:16]
    target = partition.path / f"{COMPACT_PREFIX}{digest}{SUFFIX}"
    metas, rows, pending, pending_rows = {}, 0, [], 0
    schema = pq.read_schema(group[0][1]).remove_metadata()
    with atomic_path(target) as tmp:  # step 1: a hidden temp file, synced and renamed (step 2)
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for uid, path in group:
                f = pq.ParquetFile(path)
                metas[uid] = json.loads((f.metadata.metadata or {}).get(b"eqntk", b"{}"))
                table = f.read().replace_schema_metadata(None)
                rows += table.num_rows
                pending.append(table)
                pending_rows += table.num_rows
                if pending_rows >= ROW_GROUP_ROWS:
                    pending, pending_rows = _flush(writer, pending, full_only=True)
            _flush(writer, pending, full_only=False)
            writer.add_key_value_metadata({COMPACTED_KEY.decode(): json.dumps({"units": units, "parts": metas}, sort_keys=True)})
        if pq.read_metadata(tmp).num_rows != rows:  # never publish a file that lost rows
            raise RuntimeError(f"{target}: wrote {pq.read_metadata(tmp).num_rows} rows of {rows}")
        done.bytes_after += tmp.stat().st_size
    done.files += 1
    done.parts += len(group)
    done.written.append(target)
    for _, path in group:  # step 3: the parts it holds
        done.bytes_before += path.stat().st_size
        path.unlink()


def _flush(writer: pq.ParquetWriter, tables: list[pa.Table], full_only: bool) -> tuple[list[pa.Table], int]:
    """Write ``tables`` as row groups of ``ROW_GROUP_ROWS`` rows; with ``full_only`` keep the
    remainder that does not fill one and return it."""
    table = pa.concat_tables(tables)
    n = table.num_rows - table.num_rows % ROW_GROUP_ROWS if full_only else table.num_rows
    if n:
        writer.write_table(table.slice(0, n), row_group_size=ROW_GROUP_ROWS)
    rest = table.slice(n)
    return ([rest] if rest.num_rows else []), rest.num_rows
