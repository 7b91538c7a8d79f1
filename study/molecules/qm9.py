"""The standard QM9 release (``dsgdb9nsd.xyz.tar.bz2`` from figshare, or a folder of its
``dsgdb9nsd_NNNNNN.xyz`` files) read into a :class:`MoleculeSet`; the target is the U0
atomisation energy ``U0 - sum of the atomic U0`` with QM9's own atomic references, in eV."""

from __future__ import annotations

import bz2
import gzip
import lzma
import re
import tarfile
import zlib
from pathlib import Path
from typing import Iterable, Optional

import numpy as np

from ..config import StudyError
from .elements import HARTREE_EV, NUMBERS
from .errors import one_line
from .molecule_set import MoleculeSet

# QM9's atomic reference energies U0 (Hartree), from the release's atomref table.
QM9_ATOMREF_U0 = {1: -0.500273, 6: -37.846772, 7: -54.583861, 8: -75.064579, 9: -99.718730}
QM9_SOURCE = "dsgdb9nsd.xyz.tar.bz2 (QM9, figshare)"
_QM9_LINE2 = "'gdb <id> A B C mu alpha homo lumo gap r2 zpve U0 U H G Cv'"
_ID_RE = re.compile(r"(\d+)\.xyz$")


def _num(s: str) -> float:
    return float(s.replace("*^", "e"))


def parse_qm9_xyz(text: str, where: str) -> tuple[int, np.ndarray, np.ndarray, float]:
    """One QM9 ``.xyz`` file: ``(gdb id, z [n], pos [n, 3] Angstrom, U0 Hartree)``.

    ``where`` names the file in errors. Numbers may use Mathematica exponents (``1.2*^-6``).
    """
    lines = text.splitlines()
    if not lines or not lines[0].strip():
        raise StudyError(f"qm9: {where} line 1: empty; expected the atom count (the file is empty or damaged)")
    try:
        n = int(lines[0].split()[0])
    except ValueError:
        raise StudyError(f"qm9: {where} line 1: {' '.join(lines[0].split())[:40]!r} is not an atom count; the file is damaged") from None
    if n <= 0:
        raise StudyError(f"qm9: {where} line 1: atom count {n} must be positive; the file is damaged")
    if len(lines) < n + 2:
        raise StudyError(f"qm9: {where} has {len(lines)} lines, fewer than the {n + 2} that {n} atoms need; the file is truncated")
    tok = lines[1].split()
    if len(tok) < 17 or tok[0] != "gdb":
        raise StudyError(f"qm9: {where} line 2: {len(tok)} fields starting {tok[:1]}; expected {_QM9_LINE2}")
    try:
        gid = int(tok[1])
        u0 = _num(tok[12])
    except ValueError:
        raise StudyError(f"qm9: {where} line 2: id {tok[1]!r} or U0 {tok[12]!r} is not a number; expected {_QM9_LINE2}") from None
    z = np.empty(n, dtype=np.int64)
    pos = np.empty((n, 3))
    for a in range(n):
        ln = a + 3
        t = lines[a + 2].split()
        if len(t) < 4:
            raise StudyError(f"qm9: {where} line {ln}: {' '.join(t)[:60]!r} has {len(t)} fields; expected 'Element x y z charge'")
        if t[0] not in NUMBERS:
            raise StudyError(f"qm9: {where} line {ln}: element {t[0]!r} is not one of H, C, N, O, F")
        try:
            pos[a] = [_num(v) for v in t[1:4]]
        except ValueError:
            raise StudyError(
                f"qm9: {where} line {ln}: {' '.join(t)[:60]!r} has a coordinate that is not a number; "
                "expected 'Element x y z charge'"
            ) from None
        z[a] = NUMBERS[t[0]]
    return gid, z, pos, u0


def qm9_atomisation_ev(z: np.ndarray, u0_hartree: float) -> float:
    """``U0 - sum of QM9's atomic U0``, in eV (negative for a bound molecule)."""
    return (u0_hartree - sum(QM9_ATOMREF_U0[int(a)] for a in z)) * HARTREE_EV


def _sort_key(name: str) -> tuple:
    m = _ID_RE.search(name)
    return (0, int(m.group(1)), name) if m else (1, 0, name)


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise StudyError(f"qm9: {where} is not text (not UTF-8); the file is damaged, re-extract it") from None


def load_qm9(path, limit: Optional[int] = None, exclude: Iterable[int] = ()) -> MoleculeSet:
    """QM9 molecules from a directory of ``dsgdb9nsd_NNNNNN.xyz`` files, one ``.xyz`` file,
    or the release archive ``dsgdb9nsd.xyz.tar.bz2`` (read as a stream, never unpacked).

    Order: by the number in the file name (the gdb id). ``limit``: the first ``limit``
    molecules in that order (an archive is still read to its end, since its member order is
    not guaranteed). ``exclude``: gdb ids to leave out (e.g. the 3054 molecules the QM9
    authors flag as failing their consistency check). Energy: U0 atomisation energy in eV.
    """
    path = Path(path).expanduser()
    if limit is not None and limit <= 0:
        raise StudyError(f"qm9: limit {limit} must be positive (or None for all molecules)")
    excl = {int(e) for e in exclude}
    if path.is_dir():
        keyed = sorted((_sort_key(p.name), p) for p in path.iterdir() if p.suffix == ".xyz" and p.is_file())
        files = [p for k, p in keyed if not (k[0] == 0 and k[1] in excl)]
        if not files:
            raise StudyError(f"qm9: {path} has no .xyz files; give the folder of dsgdb9nsd_*.xyz files or {QM9_SOURCE}")
        items = ((p.name, p.read_bytes()) for p in files)
        raw = items if limit is None else (x for _, x in zip(range(limit), items))
        raw = list(raw)
        where_prefix = f"{path}/"
    elif path.is_file() and path.suffix == ".xyz":
        raw = [(path.name, path.read_bytes())]
        where_prefix = f"{path.parent}/"
    elif path.is_file():
        raw = _read_tar(path, limit, excl)
        where_prefix = f"{path}:"
    else:
        raise StudyError(f"qm9: {path} not found; give the folder of dsgdb9nsd_*.xyz files or {QM9_SOURCE}")
    mols, energy, names, ids = [], [], [], []
    for name, data in raw:
        where = where_prefix + name
        gid, z, pos, u0 = parse_qm9_xyz(_decode(data, where), where)
        if gid in excl:
            continue
        mols.append((z, pos))
        energy.append(qm9_atomisation_ev(z, u0))
        names.append(f"gdb_{gid}")
        ids.append(gid)
    meta = {"source": "qm9", "path": str(path), "limit": limit, "n_excluded": len(excl),
            "energy": "U0 atomisation energy (U0 - sum of QM9 atomic U0), eV"}
    return MoleculeSet.from_molecules(mols, energy, names, meta)


def _decompressed(path: Path):
    """The archive as a stream of tar bytes (bz2, gzip, xz or none, told by its magic bytes).
    Python's BZ2File decompresses in large blocks; tarfile's own ``r|bz2`` stream was 6x
    slower on QM9-sized members."""
    with open(path, "rb") as f:
        head = f.read(6)
    if head.startswith(b"BZh"):
        return bz2.open(path, "rb")
    if head.startswith(b"\x1f\x8b"):
        return gzip.open(path, "rb")
    if head.startswith(b"\xfd7zXZ"):
        return lzma.open(path, "rb")
    return open(path, "rb")


def _read_tar(path: Path, limit: Optional[int], excl: set) -> list[tuple[str, bytes]]:
    """``(name, bytes)`` of the archive's ``.xyz`` members, the first ``limit`` in id order.
    Holds at most ``2 * limit`` files in memory while streaming."""
    kept: list = []
    try:
        with _decompressed(path) as raw, tarfile.open(fileobj=raw, mode="r|") as tf:
            for m in tf:
                if not m.isfile() or not m.name.endswith(".xyz"):
                    continue
                name = m.name.rsplit("/", 1)[-1]
                key = _sort_key(name)
                if key[0] == 0 and key[1] in excl:
                    continue
                f = tf.extractfile(m)
                kept.append((key, name, f.read() if f is not None else b""))
                if limit is not None and len(kept) >= 2 * limit:
                    kept.sort(key=lambda t: t[0])
                    del kept[limit:]
    except (tarfile.TarError, EOFError, OSError, ValueError, zlib.error, lzma.LZMAError) as e:
        raise StudyError(
            f"qm9: {path} is not a readable tar archive ({one_line(e, 60)}); "
            f"re-download {QM9_SOURCE} or give the folder of extracted .xyz files"
        ) from None
    if not kept:
        raise StudyError(f"qm9: {path} holds no .xyz files; expected {QM9_SOURCE}")
    kept.sort(key=lambda t: t[0])
    return [(n, d) for _, n, d in kept[:limit]]
