"""study.sphere: quadrature, harmonics, transforms, Wigner D and the SOFT grid are exact.

Every identity here is exact in exact arithmetic; the tolerances are float64 round-off of
sums over at most a few thousand terms of size O(1)..O(10) (harmonics grow like
sqrt(2l+1)), so 1e-12 with a margin of ~100 over the measured 1e-14.
"""

import numpy as np
import pytest

from study.sphere import (
    degree_slice,
    dh_grid,
    euler_zyz,
    isht,
    random_rotations,
    real_sph_harm,
    rotate_signal,
    sht,
    so3_grid,
    wigner_d,
)

TOL = 1e-12


@pytest.mark.parametrize("L", [1, 2, 5, 8])
def test_dh_quadrature_orthonormality(L):
    g = dh_grid(L)
    assert g.weights.shape == (2 * L, 2 * L) and abs(g.weights.sum() - 1) < TOL
    assert np.allclose(np.linalg.norm(g.xyz, axis=-1), 1)
    # Products Y_i Y_j of degree <= 2L - 1 are integrated exactly: all pairs with l, l' < L,
    # and l + l' <= 2L - 1 in general (checked with l_max = L, one beyond the band).
    y = real_sph_harm(L - 1, g.xyz)
    gram = np.einsum("jk,jki,jkl->il", g.weights, y, y)
    assert np.abs(gram - np.eye(L * L)).max() < TOL
    # ... and polynomials up to degree 2L - 1: mean z^(2L-2) = 1/(2L-1), mean z^(2L-1) = 0;
    # not beyond: z^(2L) is off (the grid's band limit is real, not an accident).
    z = g.xyz[..., 2]
    assert abs((g.weights * z ** (2 * L - 1)).sum()) < TOL
    assert abs((g.weights * z ** (2 * L - 2)).sum() - 1 / (2 * L - 1)) < TOL
    assert abs((g.weights * z ** (2 * L)).sum() - 1 / (2 * L + 1)) > 1e-10  # measured 1.2e-7 at L = 8


def test_harmonics_conventions():
    e = np.eye(3)
    y = real_sph_harm(1, e)  # rows: x, y, z axes
    s3 = np.sqrt(3)
    assert np.allclose(y[:, 0], 1)
    assert np.allclose(y[:, 1:], s3 * np.array([[0, 0, 1], [1, 0, 0], [0, 1, 0]]))  # Y_1 = sqrt3 (y, z, x)
    # Unnormalised points give the same values; poles are fine (no division by sin b).
    pts = np.array([[0, 0, 2.0], [0, 0, -1.0], [0.3, -0.2, 0.5]])
    yy = real_sph_harm(6, pts)
    assert np.all(np.isfinite(yy))
    assert np.allclose(yy[2], real_sph_harm(6, pts[2] / np.linalg.norm(pts[2])))
    # Addition theorem: sum_m Y_lm(x)^2 = 2l + 1 at every point.
    for l in range(7):
        assert np.allclose((yy[:, degree_slice(l)] ** 2).sum(-1), 2 * l + 1)


def test_sht_round_trip():
    rng = np.random.default_rng(0)
    L = 6
    g = dh_grid(L)
    c = rng.standard_normal((3, 2, L * L))
    s = isht(c, g)
    assert s.shape == (3, 2, 2 * L, 2 * L)
    assert np.abs(sht(s, g) - c).max() < TOL
    assert np.abs(sht(s, g, 3) - c[..., :16]).max() < TOL  # lower l_max: the leading coefficients
    # A signal beyond the band is projected, not recovered: its round trip differs.
    wild = rng.standard_normal((2 * L, 2 * L))
    assert np.abs(isht(sht(wild, g), g) - wild).max() > 0.1


def test_wigner_orthogonal_homomorphism_and_consistent():
    rng = np.random.default_rng(1)
    l_max = 6
    R = random_rotations(5, rng)
    ds = wigner_d(l_max, R)
    d12 = wigner_d(l_max, R[0] @ R[1])
    dinv = wigner_d(l_max, R[0].T)
    pts = rng.standard_normal((9, 3))
    y = real_sph_harm(l_max, pts)
    yr = real_sph_harm(l_max, pts @ R[0].T)  # Y(R x)
    for l, d in enumerate(ds):
        eye = np.eye(2 * l + 1)
        assert np.abs(d @ np.swapaxes(d, -1, -2) - eye).max() < TOL
        assert np.abs(d12[l] - d[0] @ d[1]).max() < TOL
        assert np.abs(dinv[l] - d[0].T).max() < TOL
        sl = degree_slice(l)
        assert np.abs(yr[:, sl] - y[:, sl] @ d[0].T).max() < TOL  # Y_l(R x) = D^l(R) Y_l(x)
    # D^1 is R itself in the (y, z, x) order of Y_1; D(identity) = I.
    perm = [1, 2, 0]
    assert np.abs(ds[1] - R[:, perm][:, :, perm]).max() < TOL
    assert all(np.abs(d - np.eye(2 * l + 1)).max() < TOL for l, d in enumerate(wigner_d(l_max, np.eye(3))))


def test_rotate_signal_is_sampling_the_rotated_function():
    rng = np.random.default_rng(2)
    L = 5
    g = dh_grid(L)
    c = rng.standard_normal((4, L * L))
    s = isht(c, g)
    R = random_rotations(4, rng)
    # (R s)(x) = s(R^-1 x): sample the expansion at R^-1 x directly (x @ R is R^T x).
    direct = np.einsum("njki,ni->njk", real_sph_harm(L - 1, np.einsum("jkp,npq->njkq", g.xyz, R)), c)
    rotated = rotate_signal(s, R, g)
    assert np.abs(rotated - direct).max() < 1e-10
    # Composition and inverse: rotating by R then by R^-1 gives the signal back.
    back = rotate_signal(rotated, np.swapaxes(R, -1, -2), g)
    assert np.abs(back - s).max() < 1e-10


def test_random_rotations_haar():
    # E[D^l] = 0 for l >= 1 under Haar measure; with n samples each entry has sd 1/sqrt(3n)
    # (entries of D^l have mean square 1/(2l+1)), so 5 sd for n = 4000 is ~0.046.
    R = random_rotations(4000, np.random.default_rng(3))
    assert np.allclose(np.linalg.det(R), 1) and np.allclose(R @ np.swapaxes(R, -1, -2), np.eye(3))
    ds = wigner_d(2, R)
    assert np.abs(ds[1].mean(0)).max() < 5 / np.sqrt(3 * 4000)
    assert np.abs(ds[2].mean(0)).max() < 5 / np.sqrt(5 * 4000)
    # Haar second moments: E[D_mn D_m'n'] = delta delta / (2l+1).
    m2 = np.einsum("rmn,rpq->mnpq", ds[1], ds[1]).reshape(9, 9) / len(R)
    assert np.abs(m2 - np.eye(9) / 3).max() < 0.05
    assert np.array_equal(random_rotations(3, 7), random_rotations(3, np.random.default_rng(7)))


@pytest.mark.parametrize("B", [1, 2, 3, 4])
def test_soft_grid_quadrature(B):
    grid = so3_grid(B)
    P = 8 * B**3
    assert grid.R.shape == (P, 3, 3) and grid.weights.shape == (P,) and abs(grid.weights.sum() - 1) < TOL
    assert np.abs(grid.R[grid.index(1, 0, 1)] - euler_zyz(grid.alpha[1], grid.beta[0], grid.gamma[1])).max() < TOL
    # Exact for D^l_mn with l < 2B: mean 0 for l >= 1; hence Peter-Weyl orthogonality
    # mean D^l_mn D^l_pq = delta delta / (2l+1) for l < B (product of degree < 2B).
    ds = grid.wigner(2 * B - 1)
    for l, d in enumerate(ds):
        mean = np.einsum("a,amn->mn", grid.weights, d)
        assert np.abs(mean - (l == 0)).max() < TOL
        if l < B:
            k = 2 * l + 1
            gram = np.einsum("a,amn,apq->mnpq", grid.weights, d, d).reshape(k * k, k * k)
            assert np.abs(gram * k - np.eye(k * k)).max() < TOL


def test_soft_grid_left_shifts_permute():
    grid = so3_grid(3)
    for j in range(6):
        q = euler_zyz(2 * np.pi * j / 6, 0.0, 0.0)
        perm = grid.left_shift_perm(j)
        assert np.abs(q @ grid.R - grid.R[perm]).max() < TOL
        assert np.array_equal(grid.weights[perm], grid.weights)
