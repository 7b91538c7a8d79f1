"""Signals on the sphere S^2 and functions on SO(3): grids, quadrature, harmonics, Wigner D.

One convention for the whole project (docs/theory.md §7, the molecules experiment), chosen
so that every transform is exact for band-limited signals and every test can demand
round-off agreement:

- Points are unit vectors ``x = (sin b cos a, sin b sin a, cos b)``.
- Measures are NORMALISED: the sphere and SO(3) have total mass 1, so a quadrature
  ``sum_i w_i f(x_i)`` is the mean of ``f``. Real spherical harmonics are orthonormal for
  that measure (``mean Y_i Y_j = delta_ij``; ``Y_00 = 1``, ``Y_1 = sqrt(3) (y, z, x)``), with
  flat index ``l^2 + l + m`` and no Condon-Shortley phase.
- A rotation ``R`` acts on signals by ``(R s)(x) = s(R^-1 x)``. With ``Y_l(R x) = D^l(R) Y_l(x)``
  the coefficients transform as ``s_l -> D^l(R) s_l``, and ``D`` is a homomorphism,
  ``D(R1 R2) = D(R1) D(R2)``, real and orthogonal.
- ``D^l`` is computed as ``mean_x Y_l(R x) Y_l(x)^T`` by Driscoll-Healy quadrature of
  bandwidth ``l_max + 1``: the integrand has degree ``2 l <= 2 l_max``, so the quadrature is
  exact, and no Euler-angle formula (with its sign conventions) is involved.
- Driscoll-Healy (DH) grid of bandwidth ``L``: ``2L x 2L`` points,
  ``beta_j = pi (2j+1) / (4L)``, ``alpha_k = 2 pi k / (2L)``; its weights integrate every
  polynomial of degree ``< 2L`` exactly (so products of two signals of band limit ``< L``).
- SOFT grid of bandwidth ``B`` on SO(3): ZYZ Euler angles ``R = Rz(alpha) Ry(beta) Rz(gamma)``
  on ``alpha_j = gamma_j = 2 pi j / (2B)``, ``beta_k = pi (2k+1) / (4B)``; ``P = 8 B^3``
  points with DH weights in ``beta``. Exact for every ``D^l_mn`` with ``l < 2B``, hence for
  products of two functions of band limit ``< B``. Left multiplication by
  ``Rz(2 pi j / 2B)`` permutes the grid (it shifts ``alpha``).

Everything is numpy float64. The only caches are bounded ``lru_cache`` s of small arrays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import List, Optional, Union

import numpy as np

__all__ = [
    "SphereGrid",
    "SO3Grid",
    "dh_grid",
    "dh_weights",
    "real_sph_harm",
    "n_harmonics",
    "degree_slice",
    "sht",
    "isht",
    "rotate_coeffs",
    "rotate_signal",
    "random_rotations",
    "euler_zyz",
    "wigner_d",
    "so3_grid",
    "SO3Spec",
    "SphereMLPSpec",
    "fourier_size",
    "fourier_slice",
    "so3_synthesis",
    "so3_analysis",
]


def n_harmonics(l_max: int) -> int:
    """Number of real spherical harmonics of degree ``<= l_max``: ``(l_max + 1)^2``."""
    return (l_max + 1) ** 2


def degree_slice(l: int) -> slice:
    """The flat indices ``l^2 .. l^2 + 2l`` of degree ``l`` (orders ``m = -l .. l``)."""
    return slice(l * l, (l + 1) * (l + 1))


# ----- Driscoll-Healy grid ------------------------------------------------------------------
def dh_weights(L: int) -> np.ndarray:
    """Driscoll-Healy weights ``[2L]`` in ``beta``, normalised to sum 1.

    ``w_j ~ sin(beta_j) sum_{k<L} sin((2k+1) beta_j) / (2k+1)``: exact for
    ``mean over beta (with sin beta dbeta / 2) of P(cos beta)``, ``deg P < 2L``.
    """
    if L < 1:
        raise ValueError(f"bandwidth must be at least 1, got {L}")
    j = np.arange(2 * L)
    beta = np.pi * (2 * j + 1) / (4 * L)
    k = np.arange(L)
    s = (np.sin(np.outer(beta, 2 * k + 1)) / (2 * k + 1)).sum(axis=1)
    w = np.sin(beta) * s
    return w / w.sum()


@dataclass(frozen=True, eq=False)
class SphereGrid:
    """A DH grid of bandwidth ``L``: angles, normalised weights ``[2L, 2L]``, points ``[2L, 2L, 3]``.

    Axis 0 is ``beta`` (polar angle), axis 1 is ``alpha`` (azimuth).
    """

    L: int
    beta: np.ndarray
    alpha: np.ndarray
    weights: np.ndarray
    xyz: np.ndarray

    @property
    def shape(self):
        return (2 * self.L, 2 * self.L)

    def harmonics(self, l_max: int) -> np.ndarray:
        """``real_sph_harm(l_max, xyz)`` on this grid, ``[2L, 2L, (l_max+1)^2]`` (cached, read-only)."""
        return _grid_harmonics(self.L, l_max)


@lru_cache(maxsize=32)
def dh_grid(L: int) -> SphereGrid:
    """The Driscoll-Healy grid of bandwidth ``L`` (immutable arrays; cached)."""
    beta = np.pi * (2 * np.arange(2 * L) + 1) / (4 * L)
    alpha = 2 * np.pi * np.arange(2 * L) / (2 * L)
    wb = dh_weights(L)
    weights = np.repeat(wb[:, None] / (2 * L), 2 * L, axis=1)
    b, a = np.meshgrid(beta, alpha, indexing="ij")
    xyz = np.stack([np.sin(b) * np.cos(a), np.sin(b) * np.sin(a), np.cos(b)], axis=-1)
    for arr in (beta, alpha, weights, xyz):
        arr.setflags(write=False)
    return SphereGrid(L=L, beta=beta, alpha=alpha, weights=weights, xyz=xyz)


@lru_cache(maxsize=32)
def _grid_harmonics(L: int, l_max: int) -> np.ndarray:
    y = real_sph_harm(l_max, dh_grid(L).xyz)
    y.setflags(write=False)
    return y


# ----- real spherical harmonics -------------------------------------------------------------
def real_sph_harm(l_max: int, xyz) -> np.ndarray:
    """Real spherical harmonics ``[..., (l_max+1)^2]`` at points ``xyz [..., 3]``.

    Orthonormal for the normalised measure (``mean Y_i Y_j = delta_ij``); index
    ``l^2 + l + m``; ``Y_lm ~ P_l^m(z) cos(m a)`` for ``m > 0``, ``P_l^|m|(z) sin(|m| a)`` for
    ``m < 0``, no Condon-Shortley phase. Points are normalised to unit length first. The
    azimuthal factors are ``Re, Im (x + i y)^m`` and the Legendre factors polynomials in
    ``z`` (fully normalised recurrences), so nothing divides by ``sin b`` at the poles.
    """
    if l_max < 0:
        raise ValueError(f"l_max must be >= 0, got {l_max}")
    p = np.asarray(xyz, dtype=np.float64)
    p = p / np.linalg.norm(p, axis=-1, keepdims=True)
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    out = np.empty(p.shape[:-1] + (n_harmonics(l_max),))
    c, s = np.ones_like(x), np.zeros_like(x)  # Re, Im (x + i y)^m
    pmm = 1.0  # normalised P_m^m / sin^m b (a constant)
    for m in range(l_max + 1):
        if m == 1:
            pmm = np.sqrt(3.0)
        elif m >= 2:
            pmm = pmm * np.sqrt((2 * m + 1) / (2 * m))
        if m >= 1:
            c, s = x * c - y * s, x * s + y * c
        p_prev2 = None
        p_prev = np.full_like(z, pmm)
        for l in range(m, l_max + 1):
            if l == m:
                cur = p_prev
            elif l == m + 1:
                cur = np.sqrt(2 * m + 3) * z * p_prev
            else:
                a = np.sqrt((2 * l - 1) * (2 * l + 1) / ((l - m) * (l + m)))
                b = np.sqrt((2 * l + 1) * (l + m - 1) * (l - m - 1) / ((l - m) * (l + m) * (2 * l - 3)))
                cur = a * z * p_prev - b * p_prev2
            if l > m:
                p_prev2, p_prev = p_prev, cur
            if m == 0:
                out[..., l * l + l] = cur
            else:
                out[..., l * l + l + m] = cur * c
                out[..., l * l + l - m] = cur * s
    return out


# ----- transforms on the sphere -------------------------------------------------------------
def sht(signal, grid: SphereGrid, l_max: Optional[int] = None) -> np.ndarray:
    """Coefficients ``[..., (l_max+1)^2]`` of a grid signal ``[..., 2L, 2L]`` by DH quadrature.

    ``c_i = sum_x w(x) s(x) Y_i(x)``; exact for signals of band limit ``< 2L - l_max``
    (in particular ``l_max = L - 1``, the default, recovers any signal of band limit ``< L``).
    """
    l_max = grid.L - 1 if l_max is None else l_max
    s = np.asarray(signal, dtype=np.float64)
    if s.shape[-2:] != grid.shape:
        raise ValueError(f"signal grid {s.shape[-2:]} does not match the DH grid {grid.shape}")
    return np.einsum("...jk,jk,jki->...i", s, grid.weights, grid.harmonics(l_max), optimize=True)


def isht(coeffs, grid: SphereGrid) -> np.ndarray:
    """Grid samples ``[..., 2L, 2L]`` of ``sum_i c_i Y_i`` from coefficients ``[..., (l_max+1)^2]``."""
    c = np.asarray(coeffs, dtype=np.float64)
    l_max = int(round(np.sqrt(c.shape[-1]))) - 1
    if n_harmonics(l_max) != c.shape[-1]:
        raise ValueError(f"{c.shape[-1]} coefficients is not a square (l_max+1)^2")
    return np.einsum("...i,jki->...jk", c, grid.harmonics(l_max), optimize=True)


def band_limited_noise(n: int, channels: int, L: int, rng) -> np.ndarray:
    """``[n, channels, 2L, 2L]`` DH samples of white noise band-limited to degrees ``< L``
    (i.i.d. N(0, 1) real SH coefficients), so every rotation acts on it exactly."""
    rng = np.random.default_rng(rng)
    return isht(rng.standard_normal((n, channels, L * L)), dh_grid(L))


def rotate_coeffs(coeffs, R, l_max: Optional[int] = None) -> np.ndarray:
    """Coefficients of ``R s`` from those of ``s``: ``s_l -> D^l(R) s_l``.

    ``R [*b, 3, 3]``'s batch shape broadcasts against ``coeffs.shape[:-1]``.
    """
    c = np.asarray(coeffs, dtype=np.float64)
    l_max = int(round(np.sqrt(c.shape[-1]))) - 1 if l_max is None else l_max
    ds = wigner_d(l_max, R)
    parts = [np.einsum("...mn,...n->...m", d, c[..., degree_slice(l)]) for l, d in enumerate(ds)]
    return np.concatenate(parts, axis=-1)


def rotate_signal(signal, R, grid: SphereGrid, l_max: Optional[int] = None) -> np.ndarray:
    """``(R s)(x) = s(R^-1 x)`` on the grid, through the SH expansion up to ``l_max`` (default ``L - 1``).

    Exact (to round-off) for signals of band limit ``<= l_max < L``; other signals are first
    projected onto that band. ``R [*b, 3, 3]``'s batch shape broadcasts against
    ``signal.shape[:-2]`` (one rotation per sample of ``[N, C, 2L, 2L]``: pass ``R[:, None]``).
    """
    l_max = grid.L - 1 if l_max is None else l_max
    return isht(rotate_coeffs(sht(signal, grid, l_max), R, l_max), grid)


# ----- rotations ----------------------------------------------------------------------------
def random_rotations(n: int, rng: Union[np.random.Generator, int, None] = None) -> np.ndarray:
    """``n`` Haar-uniform rotation matrices ``[n, 3, 3]`` (normalised Gaussian quaternions)."""
    rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    q = rng.standard_normal((n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=-2,
    )


def _rz(t):
    t = np.asarray(t, dtype=np.float64)
    c, s, o, i = np.cos(t), np.sin(t), np.zeros_like(t), np.ones_like(t)
    return np.stack([np.stack([c, -s, o], -1), np.stack([s, c, o], -1), np.stack([o, o, i], -1)], -2)


def _ry(t):
    t = np.asarray(t, dtype=np.float64)
    c, s, o, i = np.cos(t), np.sin(t), np.zeros_like(t), np.ones_like(t)
    return np.stack([np.stack([c, o, s], -1), np.stack([o, i, o], -1), np.stack([-s, o, c], -1)], -2)


def euler_zyz(alpha, beta, gamma) -> np.ndarray:
    """``Rz(alpha) Ry(beta) Rz(gamma)`` (broadcast over the angles), ``[..., 3, 3]``."""
    return _rz(alpha) @ _ry(beta) @ _rz(gamma)


# Elements per chunk of the quadrature for D^l (bounds memory for many rotations).
_WIGNER_CHUNK = 1 << 22


def wigner_d(l_max: int, R) -> List[np.ndarray]:
    """Real Wigner-D matrices ``[D^0, .., D^l_max]``, each ``[*b, 2l+1, 2l+1]``, for ``R [*b, 3, 3]``.

    ``D^l(R)_mn = mean_x Y_lm(R x) Y_ln(x)`` by DH quadrature of bandwidth ``l_max + 1``
    (exact), so ``Y_l(R x) = D^l(R) Y_l(x)`` with exactly the harmonics of ``real_sph_harm``.
    """
    R = np.asarray(R, dtype=np.float64)
    batch = R.shape[:-2]
    Rf = R.reshape(-1, 3, 3)
    g = dh_grid(l_max + 1)
    pts = g.xyz.reshape(-1, 3)
    w = g.weights.reshape(-1)
    wy = g.harmonics(l_max).reshape(len(w), -1) * w[:, None]  # [P, n]
    n = n_harmonics(l_max)
    out = [np.empty((len(Rf), 2 * l + 1, 2 * l + 1)) for l in range(l_max + 1)]
    step = max(1, _WIGNER_CHUNK // (len(w) * n))
    for i in range(0, len(Rf), step):
        rx = np.einsum("rij,pj->rpi", Rf[i : i + step], pts)
        yr = real_sph_harm(l_max, rx)  # [r, P, n]
        for l in range(l_max + 1):
            sl = degree_slice(l)
            out[l][i : i + step] = np.einsum("rpm,pn->rmn", yr[..., sl], wy[:, sl], optimize=True)
    return [d.reshape(batch + d.shape[1:]) for d in out]


# ----- SO(3) grid ---------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class SO3Grid:
    """The SOFT grid of bandwidth ``B``: ``P = 8 B^3`` rotations ``R [P, 3, 3]``, weights ``[P]`` (sum 1).

    Points are ordered ``(alpha, beta, gamma)`` row-major; ``index(j, k, i)`` finds one.
    """

    B: int
    alpha: np.ndarray
    beta: np.ndarray
    gamma: np.ndarray
    R: np.ndarray
    weights: np.ndarray
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def size(self) -> int:
        return len(self.weights)

    def index(self, j: int, k: int, i: int) -> int:
        n = 2 * self.B
        return (j % n) * n * n + k * n + (i % n)

    def wigner(self, l_max: int) -> List[np.ndarray]:
        """``D^l(R_a)`` at every grid point, ``[P, 2l+1, 2l+1]`` for ``l <= l_max`` (read-only, cached)."""
        have = self._cache.get("wigner")
        if have is None or len(have) <= l_max:
            have = wigner_d(l_max, self.R)
            for d in have:
                d.setflags(write=False)
            self._cache["wigner"] = have
        return have[: l_max + 1]

    def left_shift_perm(self, j: int) -> np.ndarray:
        """The permutation ``perm`` with ``Rz(2 pi j / 2B) R_a = R_perm[a]`` (exact on this grid)."""
        n = 2 * self.B
        a = np.arange(self.size)
        ja, rest = a // (n * n), a % (n * n)
        return ((ja + j) % n) * n * n + rest


@lru_cache(maxsize=16)
def so3_grid(B: int) -> SO3Grid:
    """The SOFT grid of bandwidth ``B`` (immutable arrays; cached)."""
    if B < 1:
        raise ValueError(f"bandwidth must be at least 1, got {B}")
    n = 2 * B
    alpha = 2 * np.pi * np.arange(n) / n
    beta = np.pi * (2 * np.arange(n) + 1) / (4 * B)
    gamma = alpha.copy()
    a, b, c = np.meshgrid(alpha, beta, gamma, indexing="ij")
    R = euler_zyz(a.ravel(), b.ravel(), c.ravel())
    w = np.broadcast_to(dh_weights(B)[None, :, None], (n, n, n)).ravel() / (n * n)
    w = np.ascontiguousarray(w)
    for arr in (alpha, beta, gamma, R, w):
        arr.setflags(write=False)
    return SO3Grid(B=B, alpha=alpha, beta=beta, gamma=gamma, R=R, weights=w)


# ----- model specs (one definition for the finite model and its kernel) ---------------------
_NONLINS = ("relu", "erf", "identity")


@dataclass(frozen=True)
class SO3Spec:
    """An SO(3) GCNN on spherical signals (docs/so3.md); ``workers.so3`` and ``analysis.kernel_so3`` read it.

    Lifting ``S^2 -> SO(3)`` to band limit ``bands[0]``, then ``len(bands) - 1`` blocks of
    (nonlinearity on the SOFT grid of bandwidth ``B``, SO(3) group convolution to band
    limit ``bands[k]``), then nonlinearity, invariant pooling (SOFT quadrature) and a dense
    readout. Inputs are ``channels`` signals on the DH grid of bandwidth ``L_in``.
    Every band limit is at most ``L_in`` (the lifting's harmonics transform exactly) and at
    most ``B`` (so a band-limited feature survives grid -> Fourier exactly).
    """

    channels: int
    L_in: int
    bands: tuple
    B: int
    nonlin: str = "relu"
    sigma_w: float = 1.0
    sigma_b: float = 0.0
    readout_sigma_w: float = 1.0
    outputs: int = 1

    def __post_init__(self):
        object.__setattr__(self, "bands", tuple(int(b) for b in self.bands))
        if not self.bands or min(self.bands) < 1:
            raise ValueError(f"bands must be a non-empty tuple of band limits >= 1, got {self.bands}")
        if self.bands[0] > self.L_in:
            raise ValueError(f"lifting band limit {self.bands[0]} exceeds the input bandwidth L_in={self.L_in}")
        if max(self.bands) > self.B:
            raise ValueError(f"band limits {self.bands} exceed the grid bandwidth B={self.B}")
        if self.nonlin not in _NONLINS:
            raise ValueError(f"nonlin: unknown {self.nonlin!r}; use one of {_NONLINS}")

    @property
    def depth(self) -> int:
        """Number of SO(3) group convolutions after the lifting."""
        return len(self.bands) - 1


@dataclass(frozen=True)
class SphereMLPSpec:
    """An MLP on DH samples weighted by ``sqrt(n_pix w)`` (docs/so3.md, the augmentation baseline).

    ``depth`` hidden layers (dense + nonlinearity) then a dense readout; ``depth = 0`` is a
    linear model. The first layer's ``(1 / fan_in) z . z'`` is the quadrature inner product
    ``(1/C) sum_c mean_x x_c x'_c``, so the kernel is jointly rotation invariant for inputs
    of band limit ``< L_in``.
    """

    channels: int
    L_in: int
    depth: int = 1
    nonlin: str = "relu"
    sigma_w: float = 1.0
    sigma_b: float = 0.0
    readout_sigma_w: float = 1.0
    outputs: int = 1

    def __post_init__(self):
        if self.nonlin not in _NONLINS:
            raise ValueError(f"nonlin: unknown {self.nonlin!r}; use one of {_NONLINS}")
        if self.depth < 0:
            raise ValueError(f"depth must be >= 0, got {self.depth}")


def fourier_size(L: int) -> int:
    """Number of SO(3) Fourier coefficients of band limit ``L`` (degrees ``< L``): ``sum (2l+1)^2``."""
    return L * (2 * L - 1) * (2 * L + 1) // 3


def fourier_slice(l: int) -> slice:
    """The flat block of degree ``l`` (``(2l+1)^2`` entries, row-major ``(m, n)``) in packed coefficients."""
    return slice(fourier_size(l), fourier_size(l + 1))


def so3_synthesis(grid: SO3Grid, L: int) -> np.ndarray:
    """``[F_L, P]``: packed coefficients -> samples, ``f(R_a) = sum_l sqrt(2l+1) sum_mn D^l_mn(R_a) f^l_mn``."""
    ds = grid.wigner(L - 1)
    return np.concatenate([np.sqrt(2 * l + 1) * d.reshape(len(d), -1).T for l, d in enumerate(ds)], axis=0)


def so3_analysis(grid: SO3Grid, L: int) -> np.ndarray:
    """``[P, F_L]``: samples -> packed coefficients, ``f^l_mn = sqrt(2l+1) sum_a w_a f(R_a) D^l_mn(R_a)``.

    Inverse of ``so3_synthesis`` on band limit ``L`` when ``L <= B`` (the basis
    ``sqrt(2l+1) D^l_mn`` is orthonormal and SOFT quadrature is exact on its products).
    """
    return so3_synthesis(grid, L).T * grid.weights[:, None]
