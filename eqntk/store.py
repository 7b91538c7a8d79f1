"""The result store: one directory per study run.

Layout (``DIR``)::

    study.yaml        the study file as given
    study.json        the resolved study (every default filled in), to detect a changed study
    inputs.npz        the exact arrays: train_x, train_y, eval__<name> for each eval set
    versions.json     python, torch, escnn, ray, numpy, pyarrow versions of the driver
    units/<id>.json   one record per finished or failed unit (status, steps, node, timing)
    predictions/model=<name>/width=<w>/part-<unit id>.parquet
    predictions/model=<name>/width=<w>/compact-<digest>.parquet   (eqntk.compact)

``predictions`` is a hive-partitioned Parquet dataset: ``pandas.read_parquet(DIR /
"predictions")`` or ``pyarrow.dataset.dataset(..., partitioning="hive")`` reads it whole.
A part appears only complete (written to a hidden temp file, then renamed), so a part file
exists if and only if its unit finished; readers never see half a unit, and a rerun never
duplicates one. docs/results.md documents the columns (``PART_SCHEMA`` below).

Compaction (``eqntk.compact``) merges a partition's parts into compacted files whose footer
lists the units they hold (``COMPACTED_KEY``); it renames a compacted file into place before
deleting the parts it covers. So a unit is stored when its part exists or a compacted file
lists it, and a part whose unit a compacted file lists is a leftover that readers skip
(``read_predictions``, ``ResultStore.finished_ids``): whatever step a compaction was killed
at, every finished unit is read exactly once.
"""

from __future__ import annotations

import fcntl
import importlib.metadata as md
import io
import json
import os
import platform
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from study.atomic import atomic_write
from study.config import StudyError
from study.data import StudyData
from study.grid import UnitSpec

# Columns of every part file; ``model`` and ``width`` come from the directory names.
PART_SCHEMA = pa.schema(
    [
        ("unit_id", pa.string()),
        ("arch", pa.string()),
        ("group", pa.string()),
        ("basis", pa.string()),
        ("support", pa.string()),
        ("augmentation", pa.string()),
        ("member_start", pa.int32()),
        ("member_stop", pa.int32()),
        ("lr", pa.float64()),
        ("step", pa.int64()),
        ("time", pa.float64()),
        ("eval_set", pa.string()),
        ("sample", pa.int32()),
        ("group_element", pa.int32()),
        ("output", pa.int32()),
        ("count", pa.int32()),
        ("sum", pa.float64()),
        ("sumsq", pa.float64()),
        # sum over members of (prediction - that member's own mean over the orbit)^2: gives
        # the ensemble's noise in the orbit spread of its mean, correlations across the orbit
        # included (analysis.compare.orbit_spread)
        ("orbit_devsq", pa.float64()),
        # antithetic ensembles (pairing: antithetic; NaN otherwise): the same two sums over the
        # unit's pairs, of each pair's mean (members 2k, 2k+1) instead of each member. The
        # pair means are independent, so they give the standard error (docs/theory.md §5).
        ("pair_sumsq", pa.float64()),
        ("pair_orbit_devsq", pa.float64()),
        # the unit's independent draws (members, or antithetic pair means) split into at most
        # MAX_BLOCKS consecutive blocks: each block's sum and draw count. Blocks are
        # independent, so the analysis can jackknife over them for intervals that need no
        # assumption on how the points correlate (analysis.jackknife, docs/theory.md §5.6).
        ("block_sum", pa.list_(pa.float64())),
        ("block_count", pa.list_(pa.int32())),
    ]
)
# Blocks a unit's draws are split into; 16 keeps a part small and, over the units of an
# ensemble, leaves enough blocks (16 for one unit of 32 paired members) for a jackknife.
MAX_BLOCKS = 16
MEMBER_FIELDS = [("member", pa.int32()), ("prediction", pa.float64())]


def part_schema(store_members: bool) -> pa.Schema:
    if not store_members:
        return PART_SCHEMA
    return pa.schema(list(PART_SCHEMA) + [pa.field(n, t) for n, t in MEMBER_FIELDS])


# ----- the layout of one partition (model, width): parts and compacted files --------------------
PART_PREFIX, COMPACT_PREFIX, SUFFIX = "part-", "compact-", ".parquet"
# A compacted file's footer key: JSON {"units": [unit ids in the file's row order], "parts": {unit
# id: that part's own footer record}}. The list travels in the same file as the rows, so the
# rename that publishes the rows also publishes which units they are.
COMPACTED_KEY = b"eqntk_compacted"
_compacted_cache: dict[tuple, tuple[str, ...]] = {}


def part_unit_id(name: str) -> Optional[str]:
    """The unit id in a part file's name; None for any other name."""
    if name.startswith(PART_PREFIX) and name.endswith(SUFFIX):
        return name[len(PART_PREFIX):-len(SUFFIX)]
    return None


def compacted_units(path: Path) -> tuple[str, ...]:
    """The unit ids a compacted file holds, in its row order (read from its footer once per
    version of the file)."""
    st = path.stat()
    key = (str(path), st.st_ino, st.st_size, st.st_mtime_ns)
    units = _compacted_cache.get(key)
    if units is None:
        try:
            units = tuple(json.loads((pq.read_metadata(path).metadata or {})[COMPACTED_KEY])["units"])
        except FileNotFoundError:
            raise
        except Exception:
            raise StudyError(
                f"{path} is truncated or corrupt; delete it and run `eqntk run --out {path.parents[3]}` again to "
                f"regenerate the units it held"
            ) from None
        _compacted_cache[key] = units
    return units


@dataclass(frozen=True)
class Partition:
    """The files of one ``model=<m>/width=<w>`` directory."""

    path: Path
    compacted: dict[Path, tuple[str, ...]]  # compacted file -> its units (files in name order)
    parts: dict[str, Path]  # unit id -> part file, every part (name order)

    @property
    def covered(self) -> set[str]:
        return {u for units in self.compacted.values() for u in units}

    @property
    def live_parts(self) -> dict[str, Path]:
        """Parts no compacted file holds: the ones to read."""
        covered = self.covered
        return {u: p for u, p in self.parts.items() if u not in covered}

    @property
    def stale_parts(self) -> dict[str, Path]:
        """Parts a compacted file also holds: left by a compaction killed before it deleted them."""
        covered = self.covered
        return {u: p for u, p in self.parts.items() if u in covered}

    @property
    def files(self) -> list[Path]:
        """What to read, each unit once: the compacted files, then the live parts."""
        return list(self.compacted) + list(self.live_parts.values())

    @property
    def unit_ordered(self) -> bool:
        """Whether reading ``files`` in order gives the rows in unit id order, as the parts alone
        do: true unless a compacted file has company (another one, or live parts)."""
        return len(self.compacted) + bool(self.live_parts) <= 1


def scan_partition(d: Path) -> Partition:
    compacted, parts = {}, {}
    names = sorted(e.name for e in os.scandir(d) if e.is_file())
    for name in names:
        uid = part_unit_id(name)
        if uid is not None:
            parts[uid] = d / name
        elif name.startswith(COMPACT_PREFIX) and name.endswith(SUFFIX):
            compacted[d / name] = compacted_units(d / name)
    seen: dict[str, Path] = {}
    for f, units in compacted.items():
        for u in units:
            if u in seen:  # never made by eqntk.compact, which compacts only parts no file holds
                raise StudyError(f"{d}: unit {u} is held by both {seen[u].name} and {f.name}; delete {f} and run "
                                 f"`eqntk compact {d.parents[2]}`")
            seen[u] = f
    return Partition(d, compacted, parts)


def scan_partitions(base: Path) -> list[Partition]:
    """Every partition under ``base`` (DIR/predictions), in the order a dataset reads them (path
    order of their files)."""
    if not base.is_dir():
        return []
    dirs = [d for d in base.glob("model=*/width=*") if d.is_dir()]
    return [scan_partition(d) for d in sorted(dirs, key=lambda d: str(d) + "/")]


class PartWriter:
    """Streams one unit's predictions into a Parquet file in a private temp directory.

    The worker calls ``log`` at each logged step; ``finish`` closes the file and returns its
    bytes, which the driver commits atomically into the store. A unit that dies leaves only
    its temp file behind, never a part.
    """

    def __init__(self, unit: UnitSpec, tmpdir: Optional[str] = None):
        self.unit = unit
        self.schema = part_schema(unit.store_members)
        fd, self.path = tempfile.mkstemp(prefix=f".part-{unit.unit_id}-", suffix=".parquet", dir=tmpdir)
        os.close(fd)
        self._writer = pq.ParquetWriter(self.path, self.schema, compression="zstd")
        self.rows = 0

    def log(self, step: int, eval_set: str, preds: np.ndarray) -> None:
        """``preds``: ``[members, n, |G|, n_out]`` predictions at ``step`` on ``eval_set``."""
        u = self.unit
        preds = np.asarray(preds, dtype=np.float64)
        m, n, g, k = preds.shape
        if m != u.members:
            raise ValueError(f"expected predictions of {u.members} members, got {m}")
        sample, elem, out = (a.reshape(-1) for a in np.meshgrid(np.arange(n), np.arange(g), np.arange(k), indexing="ij"))
        devsq = _orbit_devsq(preds)  # each member against its own orbit mean
        rows = n * g * k
        if u.store_members:
            member = np.repeat(np.arange(u.member_start, u.member_stop), rows)
            sample, elem, out = (np.tile(a, m) for a in (sample, elem, out))
            values = preds.reshape(-1)
            cols = dict(count=np.ones(m * rows, np.int32), sum=values, sumsq=values**2, orbit_devsq=devsq.reshape(-1),
                        member=member, prediction=values)
            rows *= m
        else:
            cols = dict(
                count=np.full(rows, m, np.int32),
                sum=preds.sum(axis=0).reshape(-1),
                sumsq=(preds**2).sum(axis=0).reshape(-1),
                orbit_devsq=devsq.sum(axis=0).reshape(-1),
            )
        cols.update(_pair_sums(preds, u.model.pairing == "antithetic", u.store_members))
        cols.update(_block_sums(preds, u.model.pairing == "antithetic", u.store_members))
        const = dict(
            unit_id=u.unit_id,
            arch=u.model.arch,
            group=u.model.group,
            basis=u.model.basis,
            support=u.model.support,
            augmentation=u.model.augmentation,
            member_start=u.member_start,
            member_stop=u.member_stop,
            lr=u.lr,
            step=step,
            time=u.lr * step,
            eval_set=eval_set,
        )
        arrays = []
        for f in self.schema:
            if f.name in const:
                arrays.append(pa.array(np.full(rows, const[f.name]) if not isinstance(const[f.name], str) else [const[f.name]] * rows, f.type))
            elif f.name in ("sample", "group_element", "output"):
                arrays.append(pa.array({"sample": sample, "group_element": elem, "output": out}[f.name], f.type))
            elif f.name in ("block_sum", "block_count"):
                values, offsets = cols[f.name]
                arrays.append(pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, f.type.value_type)))
            else:
                arrays.append(pa.array(cols[f.name], f.type))
        self._writer.write_table(pa.Table.from_arrays(arrays, schema=self.schema))
        self.rows += rows

    def finish(self, metadata: dict) -> bytes:
        """Close the file with ``metadata`` in its footer and return its bytes."""
        self._writer.add_key_value_metadata({"eqntk": json.dumps(metadata, sort_keys=True)})
        self._writer.close()
        try:
            return Path(self.path).read_bytes()
        finally:
            self.discard()

    def discard(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _orbit_devsq(preds: np.ndarray) -> np.ndarray:
    """``[m, n, |G|, k]``: each row's squared deviation from its own mean over the orbit axis."""
    return (preds - preds.mean(axis=2, keepdims=True)) ** 2


def _pair_sums(preds: np.ndarray, antithetic: bool, per_member: bool) -> dict[str, np.ndarray]:
    """``pair_sumsq`` and ``pair_orbit_devsq`` of ``preds`` ``[m, n, |G|, k]`` (members 2j and
    2j+1 form pair j): summed over the pairs, or with ``per_member`` one row per member holding
    its pair's value on the pair's first member and 0 on the second, so sums stay exact.
    NaN for independent members."""
    m = preds.shape[0]
    if not antithetic:
        return {c: np.full(preds[0].size * (m if per_member else 1), np.nan) for c in ("pair_sumsq", "pair_orbit_devsq")}
    pairs = preds.reshape(m // 2, 2, *preds.shape[1:]).mean(axis=1)
    out = {}
    for name, per_pair in (("pair_sumsq", pairs**2), ("pair_orbit_devsq", _orbit_devsq(pairs))):
        if per_member:
            rows = np.zeros_like(preds)
            rows[0::2] = per_pair
            out[name] = rows.reshape(-1)
        else:
            out[name] = per_pair.sum(axis=0).reshape(-1)
    return out


def _block_sums(preds: np.ndarray, antithetic: bool, per_member: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``block_sum`` and ``block_count`` of ``preds`` ``[m, n, |G|, k]`` as (flat values, list
    offsets) per row. The draws (members, or the means of pairs 2j, 2j+1) are split into
    ``min(draws, MAX_BLOCKS)`` consecutive blocks of near-equal size. With ``per_member`` each
    member row holds its own draw as one block (a pair's mean on its first member, an empty
    list on the second), so concatenating a point's rows in member order gives the blocks."""
    m = preds.shape[0]
    draws = preds.reshape(m // 2, 2, *preds.shape[1:]).mean(axis=1) if antithetic else preds
    d, rows = draws.shape[0], preds[0].size
    flat = draws.reshape(d, rows)
    if per_member:
        step = 2 if antithetic else 1
        lengths = np.zeros((m, rows), np.int32)
        lengths[0::step] = 1
        values = np.zeros((m, rows))
        values[0::step] = flat
        offsets = np.concatenate([[0], np.cumsum(lengths.reshape(-1))])
        keep = lengths.reshape(-1) == 1
        return {"block_sum": (values.reshape(-1)[keep], offsets),
                "block_count": (np.ones(int(keep.sum()), np.int32), offsets)}
    groups = np.array_split(np.arange(d), min(d, MAX_BLOCKS))
    sums = np.stack([flat[g].sum(axis=0) for g in groups], axis=1)  # [rows, blocks]
    counts = np.tile(np.array([len(g) for g in groups], np.int32), rows)
    offsets = np.arange(rows + 1) * len(groups)
    return {"block_sum": (sums.reshape(-1), offsets), "block_count": (counts, offsets)}


class ResultStore:
    def __init__(self, root: os.PathLike | str):
        self.root = Path(root)
        self._lock_file = None

    # ----- paths -----------------------------------------------------------------
    @property
    def predictions(self) -> Path:
        return self.root / "predictions"

    def part_path(self, unit: UnitSpec) -> Path:
        return self.predictions / f"model={unit.model.name}" / f"width={unit.width}" / f"part-{unit.unit_id}.parquet"

    def record_path(self, unit_id: str) -> Path:
        return self.root / "units" / f"{unit_id}.json"

    # ----- lifecycle -------------------------------------------------------------
    def exists(self) -> bool:
        return (self.root / "study.json").is_file()

    def lock(self, what: str = "--out") -> None:
        """Hold an exclusive lock on the directory for this process's lifetime (``what``: the
        argument that named it, for the error).

        The kernel drops it when the process dies (even by SIGKILL), so a crashed driver
        never blocks the rerun that resumes it.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        f = open(self.root / ".lock", "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            who = f.read().strip() or "another process"
            f.close()
            other = " or choose another --out" if what == "--out" else ""
            raise StudyError(
                f"{what}: {self.root} is in use by another eqntk run ({who}); wait for it to finish{other}"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {platform.node()}")
        f.flush()
        self._lock_file = f

    def unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def initialise(self, study_text: str, resolved: dict, data) -> None:
        """Write the study, its arrays and the versions (once; a resumed run keeps them)."""
        self.root.mkdir(parents=True, exist_ok=True)
        data.save(self.root / "inputs.npz")
        atomic_write(self.root / "study.yaml", study_text.encode())
        atomic_write(self.root / "versions.json", json.dumps(versions(), indent=2).encode())
        # study.json last: its presence marks a fully initialised directory.
        atomic_write(self.root / "study.json", json.dumps(resolved, indent=2, sort_keys=True).encode())

    def resolved_study(self) -> dict:
        return json.loads((self.root / "study.json").read_text())

    def load_data(self):
        return StudyData.load(self.root / "inputs.npz")

    # ----- units -----------------------------------------------------------------
    def is_done(self, unit: UnitSpec) -> bool:
        part = self.part_path(unit)
        return part.is_file() or (part.parent.is_dir() and unit.unit_id in scan_partition(part.parent).covered)

    def partitions(self) -> list[Partition]:
        return scan_partitions(self.predictions)

    def finished_ids(self) -> set[str]:
        """The ids of every unit whose rows are stored (a part, or a compacted file listing it):
        one scan of the store, for many units at once."""
        done = set()
        for p in self.partitions():
            done |= set(p.parts) | p.covered
        return done

    def commit(self, unit: UnitSpec, part: bytes, record: dict) -> None:
        atomic_write(self.part_path(unit), part)
        atomic_write(self.record_path(unit.unit_id), json.dumps(record, indent=1, sort_keys=True).encode())

    def record_failure(self, unit: UnitSpec, record: dict) -> None:
        atomic_write(self.record_path(unit.unit_id), json.dumps(record, indent=1, sort_keys=True).encode())

    def record(self, unit_id: str) -> Optional[dict]:
        p = self.record_path(unit_id)
        return json.loads(p.read_text()) if p.is_file() else None

    def unit_states(self, units: Iterable[UnitSpec]) -> dict[str, str]:
        """``unit_id -> done | diverged | failed | pending`` (stored rows decide done)."""
        states = {}
        finished = self.finished_ids()
        for u in units:
            rec = self.record(u.unit_id) or {}
            if u.unit_id in finished:
                states[u.unit_id] = "diverged" if rec.get("status") == "diverged" else "done"
            elif rec.get("status") == "failed":
                states[u.unit_id] = "failed"
            else:
                states[u.unit_id] = "pending"
        return states

    def clean_temp_files(self) -> int:
        """Remove temp files a killed driver left behind (never complete parts)."""
        n = 0
        for p in self.root.rglob(".*.tmp*"):  # study.atomic's temp names
            p.unlink(missing_ok=True)
            n += 1
        return n


def versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    for pkg in ("torch", "escnn", "ray", "numpy", "pyarrow", "pandas", "eqntk"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def read_predictions(root: os.PathLike | str, columns: Optional[list[str]] = None, filter=None,
                     optional: Iterable[str] = ()):
    """The whole predictions dataset as a pyarrow Table (hive partitions as columns), each
    finished unit's rows once whether its part or a compacted file holds them (the module
    docstring), in the same order either way: partitions in path order, units in id order.

    ``optional`` columns are added to ``columns`` when every file has them (parts written by
    an older eqntk may lack a newer column). A corrupt file raises StudyError naming it and
    how to regenerate it. A file deleted while being read (a compaction finishing) makes it
    list the files again.
    """
    root = Path(root)
    base = root / "predictions"
    if not base.is_dir():
        raise StudyError(f"{root}: no predictions found; run `eqntk run --out {root}` first")
    for _ in range(5):
        partitions = scan_partitions(base)
        try:
            return _read_files(root, base, partitions, columns, filter, set(optional))
        except _Vanished:
            continue
    raise StudyError(f"{base}: files kept vanishing while being read (a compaction running?); read it again")


class _Vanished(Exception):
    """A file listed for reading was gone when read."""


def _read_files(root: Path, base: Path, partitions: list[Partition], columns, filter, optional: set) -> pa.Table:
    files = [f for p in partitions for f in p.files]

    def failed(e: Exception, what: str) -> Exception:
        if any(not f.exists() for f in files):
            return _Vanished()
        return StudyError(what)

    for p in files:
        try:
            optional &= set(pq.read_schema(p).names)
        except Exception as e:
            raise failed(e, f"{p} is truncated or corrupt; delete it and run `eqntk run --out {root}` again to "
                            f"regenerate {'that unit' if part_unit_id(p.name) else 'the units it held'}") from None
    if columns is not None and optional and files:
        columns = list(columns) + sorted(optional)
    try:
        if not files:
            return ds.dataset(base, format="parquet", partitioning="hive").to_table(columns=columns, filter=filter)
        dataset = ds.dataset([str(f) for f in files], format="parquet", partitioning="hive", partition_base_dir=str(base))
        if all(p.unit_ordered for p in partitions):
            return dataset.to_table(columns=columns, filter=filter)
        # Some partition mixes compacted files with other files: read partition by partition and
        # put that one's rows in unit id order (a stable sort keeps each unit's own row order),
        # so that every sum over units adds in the same order as before compaction.
        keep = columns is None or "unit_id" in columns
        cols = columns if keep else list(columns) + ["unit_id"]
        fragments = iter(dataset.get_fragments())
        tables = []
        for p in partitions:
            group = [next(fragments) for _ in p.files]
            if not group:
                continue
            t = ds.FileSystemDataset(group, dataset.schema, dataset.format, dataset.filesystem).to_table(
                columns=cols, filter=filter)
            if not p.unit_ordered:
                t = t.take(pc.sort_indices(t, [("unit_id", "ascending")]))
            tables.append(t if keep else t.drop_columns(["unit_id"]))
        return pa.concat_tables(tables)
    except (OSError, pa.ArrowInvalid) as e:
        raise failed(e, f"{base}: a part could not be read ({e}); delete it and rerun `eqntk run --out {root}`") from None


def part_bytes_metadata(part: bytes) -> dict:
    meta = pq.read_metadata(io.BytesIO(part)).metadata or {}
    return json.loads(meta.get(b"eqntk", b"{}"))
