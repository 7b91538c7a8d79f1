"""The built-in molecule set, made on this machine so the built-in study needs no download:
conformers of the built-in molecules with PySCF atomisation energies, cached as ``.npz``."""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Optional, Sequence

from ..config import StudyError
from .elements import HARTREE_EV
from .geometries import DEFAULT_MOLECULES, DEFAULT_SIGMA, GEOMETRIES, MAX_STRAIN, conformer, molecule_geometry
from .molecule_set import MoleculeSet
from .pyscf_energies import DEFAULT_METHOD, atom_energies, limited_threads, parse_method, pyscf_modules, qc_energy


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
    ``limited_threads``; ``None`` leaves the libraries' settings).
    """
    if isinstance(molecules, str):
        molecules = (molecules,)
    if n_conformers <= 0:
        raise StudyError(f"molecules: n_conformers {n_conformers} must be positive")
    if not sigma >= 0:
        raise StudyError(f"molecules: sigma {sigma} must be >= 0 (Angstrom)")
    for name in molecules:
        molecule_geometry(name)
    parse_method(method)
    version = pyscf_modules()[0]
    # bump "format" when conformer() or the energy recipe changes (2: rotations from study.sphere.random_rotations)
    settings = {
        "format": 2, "n_conformers": int(n_conformers), "seed": int(seed), "method": method, "sigma": float(sigma),
        "molecules": list(molecules), "geometries": {m: GEOMETRIES[m] for m in molecules}, "pyscf": version,
        "strain": list(MAX_STRAIN),
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
    with limited_threads(threads):
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
