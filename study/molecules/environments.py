"""Each atom's environment as a multi-channel signal on the sphere (the Spherical CNNs QM7
construction, Cohen et al. 2018).

Around atom ``i`` a sphere of ``radius``; channel ``(z, p)`` at the unit vector ``x`` is
``sum_{j != i, Z_j = z} Z_i Z_j / |radius x - r_ij|^p`` with ``r_ij = r_j - r_i``. A rotation
``R`` of the molecule rotates every atom's signal: ``s'(x) = s(R^T x)``.
"""

from __future__ import annotations

import numpy as np

from ..config import StudyError
from .elements import ELEMENTS, SYMBOLS


def grid_points(grid) -> np.ndarray:
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
    pts = grid_points(grid)
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
