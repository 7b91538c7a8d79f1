"""The molecule container: molecules padded to the largest one, with optional per-atom
spherical signals, saved to and loaded from ``.npz``."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..atomic import atomic_savez
from ..config import StudyError
from .elements import ELEMENTS
from .environments import atom_environments, grid_points


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
        pts = grid_points(grid)
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
