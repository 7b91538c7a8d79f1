"""The built-in molecules: near-equilibrium geometries of small H/C/N/O/F molecules written
from experimental bond lengths and angles, and their randomly displaced and rotated conformers."""

from __future__ import annotations

import numpy as np

from ..config import StudyError
from ..seeds import derive_seed
from ..sphere import random_rotations
from .elements import NUMBERS


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
DEFAULT_SIGMA = 0.07  # Angstrom, Gaussian displacement of each coordinate
MAX_STRAIN = (0.8, 1.25)  # a draw is kept when every interatomic distance stays within these factors


def molecule_geometry(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(z, pos)`` of a built-in molecule (its near-equilibrium geometry, Angstrom)."""
    if name not in GEOMETRIES:
        raise StudyError(f"molecules: no built-in geometry for {name!r}; choose from {', '.join(GEOMETRIES)}")
    atoms = GEOMETRIES[name]
    return np.array([NUMBERS[a] for a, _ in atoms]), np.array([p for _, p in atoms], dtype=np.float64)


def conformer(name: str, k: int, seed: int, sigma: float = DEFAULT_SIGMA) -> tuple[np.ndarray, np.ndarray]:
    """Conformer ``k`` of a built-in molecule: every coordinate displaced by N(0, sigma^2)
    (Angstrom; draws that stretch or compress a distance beyond 0.8x-1.25x are redrawn),
    then a Haar-random rotation (``study.sphere.random_rotations``), centred at the centroid.
    Depends only on (name, k, seed, sigma)."""
    z, pos0 = molecule_geometry(name)
    rng = np.random.default_rng(derive_seed("molecule-conformer", seed, name, k, sigma))
    d0 = np.linalg.norm(pos0[:, None] - pos0[None], axis=-1)
    off = ~np.eye(len(z), dtype=bool)
    for _ in range(1000):
        pos = pos0 + sigma * rng.standard_normal(pos0.shape)
        ratio = np.linalg.norm(pos[:, None] - pos[None], axis=-1)[off] / d0[off]
        if ratio.size == 0 or (ratio.min() >= MAX_STRAIN[0] and ratio.max() <= MAX_STRAIN[1]):
            break
    else:  # pragma: no cover - needs an absurd sigma
        raise StudyError(f"molecules: sigma {sigma} A distorts {name} too much to draw a conformer; lower sigma")
    pos = pos @ random_rotations(1, rng)[0].T
    return z, pos - pos.mean(axis=0)
