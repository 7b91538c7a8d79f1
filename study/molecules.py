"""Molecules for the kernel-regression study of THEORY section 7: geometries and energies,
and each atom's environment as a multi-channel signal on the sphere.

Three sources of molecules, all returned as a :class:`MoleculeSet`:

- :func:`load_qm9`: the standard QM9 release (``dsgdb9nsd.xyz.tar.bz2`` from figshare, or a
  directory of its ``dsgdb9nsd_NNNNNN.xyz`` files), target the atomisation energy
  ``U0 - sum of the atomic U0`` (QM9's own atomic references);
- :func:`generate_conformers`: a small data set made on this machine, so the built-in study
  needs no download: randomly displaced and rotated conformers of a dozen small molecules,
  energies from PySCF (Hartree-Fock or DFT), atomisation energy against the same method's
  isolated atoms; cached as ``.npz`` after the first run;
- :meth:`MoleculeSet.load` of a set saved with :meth:`MoleculeSet.save`.

Units: positions in Angstrom, energies in eV (``HARTREE_EV`` eV per Hartree). Atomisation
energies keep QM9's sign: molecule minus atoms, negative for a bound molecule.

:func:`atom_environments` turns one molecule into per-atom spherical signals (the Spherical
CNNs QM7 construction, Cohen et al. 2018): around atom ``i`` a sphere of ``radius``; channel
``(z, p)`` at the unit vector ``x`` is ``sum_{j != i, Z_j = z} Z_i Z_j / |radius x - r_ij|^p``
with ``r_ij = r_j - r_i``. A rotation ``R`` of the molecule rotates every atom's signal:
``s'(x) = s(R^T x)``. :meth:`MoleculeSet.with_environments` stores them for a whole set,
padded to the largest molecule with an atom mask, so per-atom networks can be summed over
the real atoms.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import hashlib
import json
import lzma
import os
import re
import tarfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

from .atomic import atomic_savez
from .config import StudyError
from .seeds import derive_seed

HARTREE_EV = 27.211386245988  # CODATA 2018
SYMBOLS = {1: "H", 6: "C", 7: "N", 8: "O", 9: "F"}
NUMBERS = {s: z for z, s in SYMBOLS.items()}
ELEMENTS = (1, 6, 7, 8, 9)
# QM9's atomic reference energies U0 (Hartree), from the release's atomref table.
QM9_ATOMREF_U0 = {1: -0.500273, 6: -37.846772, 7: -54.583861, 8: -75.064579, 9: -99.718730}
QM9_SOURCE = "dsgdb9nsd.xyz.tar.bz2 (QM9, figshare)"


# ----- the container ----------------------------------------------------------------------
@dataclass
class MoleculeSet:
    """Molecules padded to the largest one: ``z [N, A]`` atomic numbers (0 = no atom),
    ``pos [N, A, 3]`` Angstrom (0 where no atom), ``energy [N]`` eV, ``names [N]``.

    ``env [N, A, C, ...]`` (optional) holds each atom's spherical signal, zero for padding;
    ``env_settings`` says how it was made (elements, powers, radius, grid shape).
    ``meta`` records the source (JSON-serialisable).
    """

    z: np.ndarray
    pos: np.ndarray
    energy: np.ndarray
    names: np.ndarray
    meta: dict = field(default_factory=dict)
    env: Optional[np.ndarray] = None
    env_settings: Optional[dict] = None

    def __post_init__(self):
        self.z = np.asarray(self.z, dtype=np.int64)
        self.pos = np.asarray(self.pos, dtype=np.float64)
        self.energy = np.asarray(self.energy, dtype=np.float64)
        self.names = np.asarray(self.names, dtype=str)
        n = len(self.z)
        if self.z.ndim != 2 or self.pos.shape != (*self.z.shape, 3) or self.energy.shape != (n,) or self.names.shape != (n,):
            raise StudyError(
                f"molecules: inconsistent shapes z {self.z.shape}, pos {self.pos.shape}, energy {self.energy.shape}, "
                f"names {self.names.shape}; expected [N, A], [N, A, 3], [N], [N]"
            )
        if self.env is not None and self.env.shape[:2] != self.z.shape:
            raise StudyError(f"molecules: env has shape {self.env.shape}, expected [N, A, ...] with [N, A] = {self.z.shape}")

    @classmethod
    def from_molecules(cls, mols: Sequence[tuple[np.ndarray, np.ndarray]], energy, names, meta=None) -> "MoleculeSet":
        """From a list of ``(z [n], pos [n, 3])`` pairs of any sizes."""
        a = max((len(zz) for zz, _ in mols), default=0)
        z = np.zeros((len(mols), a), dtype=np.int64)
        pos = np.zeros((len(mols), a, 3))
        for k, (zz, pp) in enumerate(mols):
            z[k, : len(zz)] = zz
            pos[k, : len(zz)] = pp
        return cls(z=z, pos=pos, energy=np.asarray(energy, dtype=np.float64), names=np.asarray(names, dtype=str), meta=dict(meta or {}))

    def __len__(self) -> int:
        return len(self.z)

    @property
    def mask(self) -> np.ndarray:
        """``[N, A]`` True where there is an atom."""
        return self.z > 0

    @property
    def n_atoms(self) -> np.ndarray:
        return self.mask.sum(axis=1)

    def molecule(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Molecule ``i`` without padding: ``(z [n], pos [n, 3])``."""
        m = self.mask[i]
        return self.z[i][m], self.pos[i][m]

    def subset(self, idx) -> "MoleculeSet":
        idx = np.asarray(idx)
        return replace(
            self, z=self.z[idx], pos=self.pos[idx], energy=self.energy[idx], names=self.names[idx],
            env=None if self.env is None else self.env[idx], meta=dict(self.meta),
        )

    def with_environments(self, grid, elements=ELEMENTS, powers=(1, 2, 3), radius: float = 0.5) -> "MoleculeSet":
        """This set with ``env [N, A, len(elements) * len(powers), *grid shape]`` filled by
        :func:`atom_environments` (zero for padding atoms)."""
        pts = _grid_points(grid)
        chans = len(elements) * len(powers)
        env = np.zeros((*self.z.shape, chans, *pts.shape[:-1]))
        for k in range(len(self)):
            zz, pp = self.molecule(k)
            try:
                env[k, : len(zz)] = atom_environments((zz, pp), pts, elements=elements, powers=powers, radius=radius)
            except StudyError as e:
                raise StudyError(f"{e} (molecule {self.names[k]})") from None
        settings = {
            "elements": [int(e) for e in elements], "powers": [float(p) for p in powers], "radius": float(radius),
            "grid_shape": list(pts.shape[:-1]), "grid_L": getattr(grid, "L", None),
        }
        return replace(self, env=env, env_settings=settings, meta=dict(self.meta))

    def digest(self) -> str:
        h = hashlib.sha256()
        for name, arr in [("z", self.z), ("pos", self.pos), ("energy", self.energy)] + ([("env", self.env)] if self.env is not None else []):
            h.update(name.encode())
            h.update(str(arr.shape).encode())
            h.update(np.ascontiguousarray(arr, dtype=np.float64).tobytes())
        h.update("\x1f".join(self.names.tolist()).encode())
        h.update(json.dumps(self.env_settings, sort_keys=True).encode())
        return h.hexdigest()[:16]

    def save(self, path) -> None:
        """Write an ``.npz`` atomically (a temporary file in the same folder, then renamed)."""
        arrays = {"z": self.z, "pos": self.pos, "energy": self.energy, "names": self.names,
                  "meta": np.array(json.dumps(self.meta, sort_keys=True))}
        if self.env is not None:
            arrays["env"] = self.env
            arrays["env_settings"] = np.array(json.dumps(self.env_settings, sort_keys=True))
        atomic_savez(path, arrays)

    @classmethod
    def load(cls, path) -> "MoleculeSet":
        path = Path(path)
        if not path.is_file():
            raise StudyError(f"molecules: {path} not found; give the path of a saved molecule set (.npz)")
        try:
            with np.load(path, allow_pickle=False) as f:
                missing = [k for k in ("z", "pos", "energy", "names", "meta") if k not in f.files]
                if missing:
                    raise StudyError(f"molecules: {path} has no {missing[0]} array; it is not a saved molecule set")
                env = f["env"] if "env" in f.files else None
                settings = json.loads(str(f["env_settings"])) if "env_settings" in f.files else None
                return cls(z=f["z"], pos=f["pos"], energy=f["energy"], names=f["names"],
                           meta=json.loads(str(f["meta"])), env=env, env_settings=settings)
        except StudyError:
            raise
        except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
            raise StudyError(f"molecules: {path} is not a readable .npz ({type(e).__name__}); delete it and regenerate it") from None


# ----- atom environments on the sphere ---------------------------------------------------
def _grid_points(grid) -> np.ndarray:
    pts = np.asarray(grid.xyz if hasattr(grid, "xyz") else grid, dtype=np.float64)
    if pts.ndim < 2 or pts.shape[-1] != 3:
        raise StudyError(f"molecules: grid points have shape {pts.shape}; expected [..., 3] unit vectors or a SphereGrid")
    return pts


def atom_environments(molecule, grid, elements=ELEMENTS, powers=(1, 2, 3), radius: float = 0.5) -> np.ndarray:
    """Each atom's environment as a spherical signal, ``[n_atoms, len(elements) * len(powers), *grid]``.

    ``molecule``: ``(z [n], pos [n, 3])`` in Angstrom. ``grid``: a ``SphereGrid`` (its ``xyz``)
    or any array ``[..., 3]`` of unit vectors. Channel ``e * len(powers) + k`` is element
    ``elements[e]`` and power ``powers[k]``:
    ``s_i(x) = sum_{j != i, Z_j = z} Z_i Z_j / |radius x - (r_j - r_i)|^p``.

    ``radius`` (Angstrom) must be below every interatomic distance, else a sphere passes
    through a neighbour and the signal is singular; the default 0.5 A lies below the shortest
    bonds of H/C/N/O/F molecules (O-H 0.96, H-F 0.92 A) with room for displaced conformers.
    """
    z, pos = molecule
    z = np.asarray(z, dtype=np.int64)
    pos = np.asarray(pos, dtype=np.float64)
    pts = _grid_points(grid)
    n = len(z)
    if pos.shape != (n, 3):
        raise StudyError(f"molecules: positions have shape {pos.shape}, expected [{n}, 3] for {n} atoms")
    unknown = sorted(set(z.tolist()) - set(int(e) for e in elements))
    if unknown:
        raise StudyError(
            f"molecules: element Z={unknown[0]} has no channel (elements {list(elements)}); add it to elements"
        )
    if not radius > 0:
        raise StudyError(f"molecules: radius {radius} must be > 0 (Angstrom)")
    if n > 1:
        d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
        d[np.diag_indices(n)] = np.inf
        i, j = np.unravel_index(np.argmin(d), d.shape)
        if d[i, j] <= radius:
            raise StudyError(
                f"molecules: atoms {i} and {j} are {d[i, j]:.3f} A apart, not more than radius {radius}; "
                "the signal would be singular, lower radius"
            )
    flat = pts.reshape(-1, 3) * radius
    elements = [int(e) for e in elements]
    out = np.zeros((n, len(elements), len(powers), len(flat)))
    for i in range(n):
        others = np.arange(n) != i
        rel = pos[others] - pos[i]  # [m, 3]
        dist = np.linalg.norm(flat[None] - rel[:, None], axis=-1)  # [m, P]
        zj = z[others]
        for e, ze in enumerate(elements):
            sel = zj == ze
            if not sel.any():
                continue
            dsel = dist[sel]
            for k, p in enumerate(powers):
                out[i, e, k] = (z[i] * ze / dsel**p).sum(axis=0)
    return out.reshape(n, len(elements) * len(powers), *pts.shape[:-1])


def channel_names(elements=ELEMENTS, powers=(1, 2, 3)) -> list[str]:
    """Names of the channels of :func:`atom_environments`, in order (``"C/r^2"``)."""
    return [f"{SYMBOLS.get(int(z), z)}/r^{p:g}" for z in elements for p in powers]


# ----- QM9 -------------------------------------------------------------------------------
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
            f"qm9: {path} is not a readable tar archive ({_short(e, 60)}); "
            f"re-download {QM9_SOURCE} or give the folder of extracted .xyz files"
        ) from None
    if not kept:
        raise StudyError(f"qm9: {path} holds no .xyz files; expected {QM9_SOURCE}")
    kept.sort(key=lambda t: t[0])
    return [(n, d) for _, n, d in kept[:limit]]


# ----- a small data set made locally with PySCF --------------------------------------------
def _pyramid(center: str, r: float, angle_deg: float):
    """X at the origin and three H at bond length r, pairwise angle H-X-H = angle, below X."""
    c = np.cos(np.radians(angle_deg))
    rho = r * np.sqrt(2 * (1 - c) / 3)
    h = -np.sqrt(r**2 - rho**2)
    atoms = [(center, (0.0, 0.0, 0.0))]
    for k in range(3):
        phi = 2 * np.pi * k / 3
        atoms.append(("H", (rho * np.cos(phi), rho * np.sin(phi), h)))
    return atoms


def _methyl(c_pos: np.ndarray, axis_sign: float, r: float, angle_to_axis_deg: float, phis_deg) -> list:
    """Three H on a carbon at c_pos; each C-H makes angle_to_axis with the +z*axis_sign direction."""
    t = np.radians(angle_to_axis_deg)
    return [
        ("H", tuple(c_pos + r * np.array([np.sin(t) * np.cos(np.radians(p)), np.sin(t) * np.sin(np.radians(p)), axis_sign * np.cos(t)])))
        for p in phis_deg
    ]


def _geometries() -> dict[str, list]:
    """Near-equilibrium geometries (Angstrom, degrees from experimental structures)."""
    s, c, r_ = np.sin, np.cos, np.radians
    g: dict[str, list] = {}
    g["H2"] = [("H", (0, 0, 0)), ("H", (0, 0, 0.741))]
    g["HF"] = [("F", (0, 0, 0)), ("H", (0, 0, 0.917))]
    g["CO"] = [("C", (0, 0, 0)), ("O", (0, 0, 1.128))]
    g["H2O"] = [("O", (0, 0, 0)), ("H", (0.958 * s(r_(52.25)), 0, 0.958 * c(r_(52.25)))),
                ("H", (-0.958 * s(r_(52.25)), 0, 0.958 * c(r_(52.25))))]
    g["NH3"] = _pyramid("N", 1.012, 106.7)
    g["CH4"] = [("C", (0, 0, 0))] + [("H", tuple(1.087 / np.sqrt(3) * np.array(v))) for v in
                                     [(1, 1, 1), (1, -1, -1), (-1, 1, -1), (-1, -1, 1)]]
    g["HCN"] = [("H", (0, 0, -1.064)), ("C", (0, 0, 0)), ("N", (0, 0, 1.156))]
    g["C2H2"] = [("H", (0, 0, -0.6015 - 1.063)), ("C", (0, 0, -0.6015)), ("C", (0, 0, 0.6015)), ("H", (0, 0, 0.6015 + 1.063))]
    g["CO2"] = [("C", (0, 0, 0)), ("O", (0, 0, 1.160)), ("O", (0, 0, -1.160))]
    g["H2CO"] = [("C", (0, 0, 0)), ("O", (0, 0, 1.205)),
                 ("H", (1.111 * s(r_(121.95)), 0, 1.111 * c(r_(121.95)))),
                 ("H", (-1.111 * s(r_(121.95)), 0, 1.111 * c(r_(121.95))))]
    cc = 0.6695
    g["C2H4"] = [("C", (0, 0, cc)), ("C", (0, 0, -cc))] + [
        ("H", (sx * 1.086 * s(r_(58.8)), 0, sz * (cc + 1.086 * c(r_(58.8))))) for sz in (1, -1) for sx in (1, -1)
    ]
    cc = 0.7675
    g["C2H6"] = [("C", (0, 0, cc)), ("C", (0, 0, -cc))] + _methyl(np.array([0, 0, cc]), 1, 1.094, 68.8, (0, 120, 240)) \
        + _methyl(np.array([0, 0, -cc]), -1, 1.094, 68.8, (60, 180, 300))
    g["CH3F"] = [("C", (0, 0, 0)), ("F", (0, 0, 1.383))] + _methyl(np.zeros(3), 1, 1.086, 108.8, (0, 120, 240))
    g["CH3OH"] = [("C", (0, 0, 0)), ("O", (0, 0, 1.427)), ("H", (0.956 * s(r_(71.1)), 0, 1.427 + 0.956 * c(r_(71.1))))] \
        + _methyl(np.zeros(3), 1, 1.094, 109.5, (180, 60, 300))
    oo, half = 0.7375, r_(111.5 / 2)
    g["H2O2"] = [("O", (0, 0, oo)), ("O", (0, 0, -oo)),
                 ("H", (0.950 * s(r_(85.2)) * np.cos(half), 0.950 * s(r_(85.2)) * np.sin(half), oo + 0.950 * c(r_(85.2)))),
                 ("H", (0.950 * s(r_(85.2)) * np.cos(half), -0.950 * s(r_(85.2)) * np.sin(half), -oo - 0.950 * c(r_(85.2))))]
    return g


GEOMETRIES = _geometries()
DEFAULT_MOLECULES = ("H2O", "NH3", "CH4", "HF", "CO", "HCN", "C2H2", "CO2", "H2CO", "C2H4", "C2H6", "CH3F", "CH3OH", "H2O2")
DEFAULT_METHOD = "HF/6-31G"
DEFAULT_SIGMA = 0.07  # Angstrom, Gaussian displacement of each coordinate
# ground-state spin (2S) of the isolated atoms
ATOM_SPIN = {1: 1, 6: 2, 7: 3, 8: 2, 9: 1}
_MAX_STRAIN = (0.8, 1.25)  # a draw is kept when every interatomic distance stays within these factors


def molecule_geometry(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(z, pos)`` of a built-in molecule (its near-equilibrium geometry, Angstrom)."""
    if name not in GEOMETRIES:
        raise StudyError(f"molecules: no built-in geometry for {name!r}; choose from {', '.join(GEOMETRIES)}")
    atoms = GEOMETRIES[name]
    return np.array([NUMBERS[a] for a, _ in atoms]), np.array([p for _, p in atoms], dtype=np.float64)


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    """A uniformly random rotation matrix (QR of a Gaussian matrix, sign-fixed, det +1)."""
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    q = q * np.sign(np.diag(r))
    if np.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def conformer(name: str, k: int, seed: int, sigma: float = DEFAULT_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """Conformer ``k`` of a built-in molecule: every coordinate displaced by N(0, sigma^2)
    (Angstrom; draws that stretch or compress a distance beyond 0.8x-1.25x are redrawn),
    then a random rotation, centred at the centroid. Depends only on (name, k, seed, sigma)."""
    z, pos0 = molecule_geometry(name)
    rng = np.random.default_rng(derive_seed("molecule-conformer", seed, name, k, sigma))
    d0 = np.linalg.norm(pos0[:, None] - pos0[None], axis=-1)
    off = ~np.eye(len(z), dtype=bool)
    for _ in range(1000):
        pos = pos0 + sigma * rng.standard_normal(pos0.shape)
        ratio = np.linalg.norm(pos[:, None] - pos[None], axis=-1)[off] / d0[off]
        if ratio.size == 0 or (ratio.min() >= _MAX_STRAIN[0] and ratio.max() <= _MAX_STRAIN[1]):
            break
    else:  # pragma: no cover - needs an absurd sigma
        raise StudyError(f"molecules: sigma {sigma} A distorts {name} too much to draw a conformer; lower sigma")
    pos = pos @ random_rotation(rng).T
    return z, pos - pos.mean(axis=0)


def _short(e: BaseException, n: int = 80) -> str:
    """An exception as one short line."""
    return f"{type(e).__name__}: {' '.join(str(e).split())[:n]}"


def _parse_method(method: str) -> tuple[str, str]:
    parts = method.split("/")
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise StudyError(f"molecules: method {method!r} must be 'THEORY/BASIS', e.g. 'HF/6-31G' or 'B3LYP/6-31G'")
    return parts[0].upper(), parts[1]


def _pyscf():
    # deferred: PySCF is an optional extra (only the built-in conformer set needs it)
    try:
        import pyscf  # noqa: F401
        from pyscf import dft, gto, scf
    except ImportError:
        raise StudyError(
            "molecules: PySCF is not installed; run `.venv/bin/pip install pyscf==2.14.0` (scripts/bootstrap.sh does) "
            "or use QM9 files"
        ) from None
    return pyscf.__version__, gto, scf, dft


def qc_energy(z, pos, method: str = DEFAULT_METHOD, spin: int = 0) -> float:
    """Total energy (Hartree) of atoms ``z`` at ``pos`` (Angstrom) with PySCF.

    ``method`` 'HF/<basis>' runs Hartree-Fock, '<xc>/<basis>' Kohn-Sham DFT with that
    functional; restricted for closed shells (``spin`` 0), unrestricted otherwise. An SCF
    that does not converge is retried with second-order (Newton) SCF, then an error."""
    _, gto, scf, dft = _pyscf()
    theory, basis = _parse_method(method)
    atoms = [(SYMBOLS[int(a)], tuple(map(float, p))) for a, p in zip(z, pos)]
    try:
        mol = gto.M(atom=atoms, basis=basis, spin=spin, unit="Angstrom", verbose=0)
    except Exception as e:  # pyscf raises plain errors for unknown basis names
        raise StudyError(f"molecules: PySCF cannot build basis {basis!r} for {method!r} ({_short(e)})") from None
    if theory == "HF":
        mf = scf.RHF(mol) if spin == 0 else scf.UHF(mol)
    else:
        mf = dft.RKS(mol) if spin == 0 else dft.UKS(mol)
        mf.xc = theory
    try:
        e = mf.kernel()
        if not mf.converged:
            mf = mf.newton()
            e = mf.kernel()
    except StudyError:
        raise
    except Exception as ex:
        raise StudyError(f"molecules: PySCF failed for {method!r} ({_short(ex)})") from None
    if not mf.converged:
        raise StudyError(f"molecules: the {method} SCF did not converge for {''.join(SYMBOLS[int(a)] for a in z)}")
    return float(e)


def atom_energies(elements: Iterable[int], method: str = DEFAULT_METHOD) -> dict[int, float]:
    """Isolated-atom energies (Hartree) in their ground spin states with ``method``."""
    return {int(a): qc_energy([a], np.zeros((1, 3)), method, spin=ATOM_SPIN[int(a)]) for a in sorted(set(int(e) for e in elements))}


@contextlib.contextmanager
def _pyscf_threads(n: Optional[int]):
    """OpenMP (PySCF) and BLAS (numpy, scipy) thread counts limited to ``n`` inside the block
    (``None``: unchanged). Molecules this small gain nothing from threads, and on a busy
    2-core machine two threads made the default set several times slower."""
    if n is None:
        yield
        return
    # deferred: PySCF is an optional extra; loading it brings its OpenMP runtime, so the limit reaches it
    import pyscf.lib  # noqa: F401
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=n):
        yield


def default_cache_dir() -> Path:
    """``$EQNTK_CACHE/molecules`` when ``EQNTK_CACHE`` is set, else ``~/.cache/eqntk/molecules``."""
    root = os.environ.get("EQNTK_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "eqntk") / "molecules"


def generate_conformers(
    n_conformers: int = 16,
    seed: int = 0,
    method: str = DEFAULT_METHOD,
    molecules: Sequence[str] = DEFAULT_MOLECULES,
    sigma: float = DEFAULT_SIGMA,
    cache_dir=None,
    cache: bool = True,
    progress: bool = False,
    threads: Optional[int] = 1,
) -> MoleculeSet:
    """``n_conformers`` conformers of each molecule (see :func:`conformer`), atomisation
    energies (total minus the same method's isolated atoms) in eV, computed with PySCF.

    Cached as ``.npz`` in ``cache_dir`` (default :func:`default_cache_dir`), keyed by a digest
    of the settings, the geometries and the PySCF version; written atomically, so a killed run
    leaves either no file or a whole one. ``meta`` records the settings and the seconds spent.
    ``threads``: OpenMP (PySCF) and BLAS threads while computing (default 1, see
    ``_pyscf_threads``; ``None`` leaves the libraries' settings).
    """
    if isinstance(molecules, str):
        molecules = (molecules,)
    if n_conformers <= 0:
        raise StudyError(f"molecules: n_conformers {n_conformers} must be positive")
    if not sigma >= 0:
        raise StudyError(f"molecules: sigma {sigma} must be >= 0 (Angstrom)")
    for name in molecules:
        molecule_geometry(name)
    _parse_method(method)
    version = _pyscf()[0]
    settings = {  # bump "format" when conformer() or the energy recipe changes
        "format": 1, "n_conformers": int(n_conformers), "seed": int(seed), "method": method, "sigma": float(sigma),
        "molecules": list(molecules), "geometries": {m: GEOMETRIES[m] for m in molecules}, "pyscf": version,
        "strain": list(_MAX_STRAIN),
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True, default=float).encode()).hexdigest()[:16]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", method).strip("-").lower()
    path = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    path = path / f"conformers-{slug}-n{n_conformers}-s{seed}-{key}.npz"
    if cache and path.is_file():
        try:
            out = MoleculeSet.load(path)
            if out.meta.get("key") == key:
                out.meta["cache"] = str(path)
                return out
        except StudyError:
            pass  # a damaged cache file is regenerated
    t0 = time.perf_counter()
    elements = {int(a) for m in molecules for a in molecule_geometry(m)[0]}
    mols, energy, names = [], [], []
    with _pyscf_threads(threads):
        ref = atom_energies(elements, method)
        for m in molecules:
            for k in range(n_conformers):
                z, pos = conformer(m, k, seed, sigma)
                e = qc_energy(z, pos, method) - sum(ref[int(a)] for a in z)
                mols.append((z, pos))
                energy.append(e * HARTREE_EV)
                names.append(f"{m}#{k}")
            if progress:
                print(f"molecules: {m} done ({time.perf_counter() - t0:.1f} s)", flush=True)
    seconds = time.perf_counter() - t0
    meta = {"source": "generated", "key": key, "method": method, "n_conformers": n_conformers, "seed": seed,
            "sigma": sigma, "molecules": list(molecules), "pyscf": version, "seconds": round(seconds, 3),
            "atom_energies_hartree": {str(a): e for a, e in ref.items()},
            "energy": f"atomisation energy (molecule minus isolated atoms, {method}), eV"}
    out = MoleculeSet.from_molecules(mols, energy, names, meta)
    if cache:
        out.save(path)
        out.meta["cache"] = str(path)
    return out
