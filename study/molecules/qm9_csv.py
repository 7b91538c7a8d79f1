"""QM9 from the CSV files of the ``qm9pack`` package (PyPI, MIT; the optional extra ``qm9``):
all 130,831 molecules of the release in ``qm9pack/data/qm9_part{1,2,3}.csv``, read offline.

Columns read: ``Index`` (the gdb id), ``Elements`` (``"['C','H',...]"``), ``XYZ_Ang`` (the
positions in Angstrom, ``"[[x,y,z],...]"``) and the target. Target ``U0_atomisation`` (the
default) is ``InternalEnergy_0K_au`` minus QM9's atomic U0 references, in eV, exactly as
:func:`study.molecules.qm9.qm9_atomisation_ev`; any other numeric column by its name, with
columns in Hartree (names ending ``_au``) converted to eV and the others kept in their own
units (named in ``meta["energy"]``).

The package is located without importing it (``qm9pack/__init__`` needs ``pkg_resources``,
which recent setuptools no longer ship); a folder holding ``qm9_part*.csv`` files in the
same layout (the tests' generated files) reads the same way.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Optional

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv

from ..config import StudyError
from .elements import HARTREE_EV, NUMBERS
from .errors import one_line
from .molecule_set import MoleculeSet
from .qm9 import qm9_atomisation_ev

QM9PACK_PIN = "qm9pack==1.0.3"
DEFAULT_TARGET = "U0_atomisation"
_U0 = "InternalEnergy_0K_au"
_GEOMETRY = ("Index", "Elements", "XYZ_Ang")
_INSTALL = f"`.venv/bin/pip install {QM9PACK_PIN}` (or `pip install .[qm9]`)"


def qm9pack_data_dir() -> Path:
    """The ``data`` folder of the installed ``qm9pack``, or a one-line error naming the fix."""
    spec = importlib.util.find_spec("qm9pack")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise StudyError(f"qm9: the qm9pack package is not installed; run {_INSTALL}, "
                         "or give path: <folder of qm9_part*.csv>")
    folder = Path(locations[0]) / "data"
    if not list(folder.glob("qm9_part*.csv")):
        raise StudyError(f"qm9: {folder} holds no qm9_part*.csv; reinstall with {_INSTALL}")
    return folder


def csv_files(folder: Path) -> list[Path]:
    """``qm9_part*.csv`` in ``folder``, in part order."""
    files = sorted(Path(folder).glob("qm9_part*.csv"), key=lambda p: (len(p.name), p.name))
    if not files:
        raise StudyError(f"qm9: {folder} holds no qm9_part*.csv files; give the folder of the qm9pack CSVs "
                         f"or leave path out to read the installed package ({_INSTALL})")
    return files


def target_column(target: str) -> str:
    """The CSV column a target reads."""
    return _U0 if target == DEFAULT_TARGET else target


def _parse_positions(text: str, n: int, where: str) -> np.ndarray:
    try:
        vals = [float(v.replace("*^", "e")) for v in text.replace("[", "").replace("]", "").split(",") if v.strip()]
    except ValueError:
        raise StudyError(f"qm9: {where} XYZ_Ang: {text[:50]!r} has an entry that is not a number; "
                         "expected '[[x,y,z],...]' in Angstrom") from None
    if len(vals) != 3 * n:
        raise StudyError(f"qm9: {where} XYZ_Ang: {len(vals)} numbers for {n} elements; expected 3 per atom")
    return np.asarray(vals, dtype=np.float64).reshape(n, 3)


def _parse_elements(text: str, where: str) -> np.ndarray:
    names = [t.strip().strip("'\"") for t in text.strip().strip("[]").split(",") if t.strip()]
    unknown = [e for e in names if e not in NUMBERS]
    if not names or unknown:
        raise StudyError(f"qm9: {where} Elements: {text[:50]!r} names {unknown[:1] or 'no element'}; "
                         "expected a list of H, C, N, O, F")
    return np.array([NUMBERS[e] for e in names], dtype=np.int64)


@lru_cache(maxsize=4)
def _read(folder: str, column: str, stamp: tuple) -> tuple:
    """``(ids, elements, positions, values)`` of every row, in gdb-id order (cached per process:
    a study reads the pool and the test set from the same files)."""
    tables = []
    for path in csv_files(Path(folder)):
        try:
            names = pacsv.open_csv(path).schema.names
        except (pa.ArrowInvalid, OSError) as e:
            raise StudyError(f"qm9: {path} is not a readable CSV ({one_line(e, 60)}); reinstall with {_INSTALL}") from None
        missing = [c for c in (*_GEOMETRY, column) if c not in names]
        if missing:
            known = ", ".join(n for n in names if n not in _GEOMETRY)
            field = "target" if missing[0] == column else "path"
            raise StudyError(f"qm9: {field}: column {missing[0]!r} is not in {path.name}; "
                             + (f"use {DEFAULT_TARGET} or one of: {known}" if field == "target"
                                else "the file is not in the qm9pack layout"))
        try:
            tables.append(pacsv.read_csv(path, convert_options=pacsv.ConvertOptions(
                include_columns=[*_GEOMETRY, column],
                column_types={"Index": pa.int64(), "Elements": pa.string(), "XYZ_Ang": pa.string()})))
        except (pa.ArrowInvalid, OSError) as e:
            raise StudyError(f"qm9: {path} column {column!r} or Index is not numeric ({one_line(e, 60)}); "
                             f"choose a numeric target column") from None
    table = pa.concat_tables(tables)
    if not pa.types.is_floating(table.schema.field(column).type) and not pa.types.is_integer(table.schema.field(column).type):
        raise StudyError(f"qm9: target: column {column!r} is not numeric ({table.schema.field(column).type}); "
                         "choose a numeric property column")
    ids = table.column("Index").to_numpy()
    values = table.column(column).to_numpy(zero_copy_only=False).astype(np.float64)
    order = np.argsort(ids, kind="stable")
    elements = table.column("Elements").to_pylist()
    xyz = table.column("XYZ_Ang").to_pylist()
    return ids[order], [elements[k] for k in order], [xyz[k] for k in order], values[order]


def load_qm9_csv(folder=None, target: str = DEFAULT_TARGET, limit: Optional[int] = None) -> MoleculeSet:
    """The QM9 molecules of the qm9pack CSVs (``folder``: a folder of ``qm9_part*.csv``;
    ``None``: the installed package), in gdb-id order; ``limit``: the first ``limit`` of them.

    ``target``: ``U0_atomisation`` (eV) or a numeric column's name (``*_au`` in eV, others in
    their own units). Rows with an empty target are left out (counted in ``meta``)."""
    folder = Path(folder).expanduser() if folder is not None else qm9pack_data_dir()
    if not folder.is_dir():
        raise StudyError(f"qm9: path {folder} is not a folder; give the folder of qm9_part*.csv files")
    if limit is not None and limit <= 0:
        raise StudyError(f"qm9: limit {limit} must be positive (or left out for all molecules)")
    stamp = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in csv_files(folder))
    return _load(str(folder), target, limit, stamp)


@lru_cache(maxsize=2)
def _load(folder: str, target: str, limit: Optional[int], stamp: tuple) -> MoleculeSet:
    column = target_column(target)
    ids, elements, xyz, values = _read(folder, column, stamp)
    keep = np.nonzero(np.isfinite(values))[0]
    if limit is not None:
        keep = keep[:limit]
    mols, energy, names = [], [], []
    for k in keep:
        where = f"{folder}: molecule {ids[k]}"
        z = _parse_elements(elements[k], where)
        pos = _parse_positions(xyz[k], len(z), where)
        mols.append((z, pos))
        if target == DEFAULT_TARGET:
            energy.append(qm9_atomisation_ev(z, values[k]))
        else:
            energy.append(values[k] * (HARTREE_EV if column.endswith("_au") else 1.0))
        names.append(f"gdb_{ids[k]}")
    if not mols:
        raise StudyError(f"qm9: {folder} has no molecule with a value of {column}; choose another target")
    unit = ("U0 atomisation energy (U0 - sum of QM9 atomic U0), eV" if target == DEFAULT_TARGET
            else f"{column}, " + ("eV (from Hartree)" if column.endswith("_au") else "in the column's own units"))
    meta = {"source": "qm9pack", "path": str(folder), "limit": limit, "target": target, "energy": unit,
            "n_without_target": int(len(values) - np.isfinite(values).sum())}
    return MoleculeSet.from_molecules(mols, energy, names, meta)
