"""The chemistry baseline of the QM9 study: the sorted Coulomb matrix with a Laplacian kernel
(Rupp et al. 2012; the standard descriptor baseline of QM9 learning-curve papers), as a
molecule-level kernel beside the per-atom network kernels (docs/molecules.md).

For a molecule with charges ``Z_i`` at ``r_i`` (Angstrom): ``C_ii = Z_i^2.4 / 2`` (a fit to
the free atom's energy) and ``C_ij = Z_i Z_j / |r_i - r_j|``. The rows and columns are put in
order of decreasing row norm, which makes the descriptor invariant to renumbering the atoms
(rotations and translations leave it unchanged by construction), padded with zeros to the
largest molecule and flattened to its upper triangle. The kernel is
``k(M, M') = exp(-|C - C'|_1 / sigma)``; ``sigma = "median"`` takes the median L1 distance
between distinct pool molecules (a scale read from the inputs, never from the targets).

It has no NTK or NNGP; ``learning_curves`` files it under both kernel names (the same
matrix), so that it is paired with every model on the same draws.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.spatial.distance import cdist, pdist

from study.atomic import atomic_savez, atomic_write

__all__ = ["DescriptorModel", "sorted_coulomb", "laplacian_kernel", "cached_descriptor_kernels"]


@dataclass(frozen=True)
class DescriptorModel:
    """The row labels of a descriptor kernel in the learning-curve table (as a model spec's)."""

    name: str
    arch: str = "coulomb_laplacian"
    group: str = "none"
    basis: str = "descriptor"
    support: str = "molecule"
    augmentation: str = "none"


def sorted_coulomb(z: np.ndarray, pos: np.ndarray, size: int | None = None) -> np.ndarray:
    """Sorted Coulomb matrices ``[N, size (size + 1) / 2]`` (upper triangles, row-major) of padded
    molecules ``z [N, A]`` (0: no atom) and ``pos [N, A, 3]``; ``size`` defaults to ``A``."""
    z = np.asarray(z, dtype=np.int64)
    pos = np.asarray(pos, dtype=np.float64)
    size = z.shape[1] if size is None else int(size)
    iu = np.triu_indices(size)
    out = np.zeros((len(z), len(iu[0])))
    for m in range(len(z)):
        real = z[m] > 0
        zz, rr = z[m][real].astype(np.float64), pos[m][real]
        n = len(zz)
        d = np.linalg.norm(rr[:, None] - rr[None], axis=-1)
        np.fill_diagonal(d, 1.0)
        c = np.outer(zz, zz) / d
        np.fill_diagonal(c, 0.5 * zz**2.4)
        order = np.argsort(-np.linalg.norm(c, axis=1), kind="stable")
        full = np.zeros((size, size))
        full[:n, :n] = c[np.ix_(order, order)]
        out[m] = full[iu]
    return out


def laplacian_kernel(x1: np.ndarray, x2: np.ndarray, sigma: float) -> np.ndarray:
    return np.exp(-cdist(x1, x2, metric="cityblock") / sigma)


def cached_descriptor_kernels(cache_dir: Path, desc, pool_z, pool_pos, test_z, test_pos, log=print) -> dict:
    """``{"nngp_pool", "ntk_pool", "nngp_test", "ntk_test", "seconds", "cached", "sigma"}`` of a
    ``DescriptorKernel`` (``study.config``), cached in ``cache_dir`` by its settings and inputs."""
    h = hashlib.sha256()
    for a in (pool_z, pool_pos, test_z, test_pos):
        h.update(str(np.shape(a)).encode())
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    settings = desc.model_dump(mode="json")
    settings.pop("name", None)
    key = hashlib.sha256(json.dumps({"descriptor": settings, "data": h.hexdigest()}, sort_keys=True).encode()).hexdigest()[:16]
    path, meta_path = Path(cache_dir) / f"{key}.npz", Path(cache_dir) / f"{key}.json"
    if path.is_file() and meta_path.is_file():
        with np.load(path) as f:
            k_pool, k_test = f["pool"], f["test"]
        meta = json.loads(meta_path.read_text())
        log(f"  {desc.name}: kernel from cache {path.name} (computed in {meta['seconds']:.1f} s)")
        return _named(k_pool, k_test) | {"seconds": meta["seconds"], "cached": True, "sigma": meta["sigma"], "key": key}
    t0 = time.perf_counter()
    size = max(np.asarray(pool_z).shape[1], np.asarray(test_z).shape[1])
    xp, xt = sorted_coulomb(pool_z, pool_pos, size), sorted_coulomb(test_z, test_pos, size)
    sigma = float(np.median(pdist(xp, metric="cityblock"))) if desc.sigma == "median" else float(desc.sigma)
    k_pool, k_test = laplacian_kernel(xp, xp, sigma), laplacian_kernel(xt, xp, sigma)
    seconds = time.perf_counter() - t0
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    atomic_savez(path, {"pool": k_pool, "test": k_test})
    meta = {"model": desc.name, "descriptor": desc.model_dump(mode="json"), "sigma": sigma, "seconds": seconds,
            "pool": len(xp), "test": len(xt), "features": xp.shape[1]}
    atomic_write(meta_path, json.dumps(meta, indent=2).encode())
    log(f"  {desc.name}: sorted Coulomb matrices ({xp.shape[1]} features) and Laplacian kernel (sigma {sigma:.4g}) "
        f"in {seconds:.1f} s")
    return _named(k_pool, k_test) | {"seconds": seconds, "cached": False, "sigma": sigma, "key": key}


def _named(k_pool, k_test) -> dict:
    return {"nngp_pool": k_pool, "ntk_pool": k_pool, "nngp_test": k_test, "ntk_test": k_test}
