"""analysis.kernel_so3: the analytic SO(3) GCNN and sphere-MLP kernels are those of the finite
models in workers.so3 (docs/so3.md, "Kernels").

(a) closed forms and exact weight expectations of single layers (1e-12: float64 round-off
    of sums over a few hundred grid points, measured ~1e-15);
(b) invariance of the pooled kernel: exact for the rotations that permute the SOFT grid,
    otherwise up to the aliasing error, measured against B;
(c) the mean empirical NTK of finite models approaches the analytic NTK as width grows;
(d) the orbit-averaged sphere-MLP kernel converges in the quadrature bandwidth B_q.
Run with -s to see the measured tables.
"""

import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, jacrev

from analysis.kernel_so3 import (
    _GridOps,
    conv_kernel_op,
    lift_kernel,
    orbit_averaged_sphere_mlp_kernel,
    so3_kernel_fn,
    sphere_mlp_kernel_fn,
)
from study.sphere import (
    band_limited_noise,
    SO3Spec,
    SphereMLPSpec,
    dh_grid,
    euler_zyz,
    isht,
    random_rotations,
    rotate_signal,
    sht,
    so3_analysis,
    so3_grid,
    so3_synthesis,
)
from workers.so3 import SO3Conv, SO3Lift, SO3Nonlin, build_so3_model, build_sphere_mlp

EXACT = 1e-12


def _signals(n, C, L, seed):
    return band_limited_noise(n, C, L, seed)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


# ----- (a) closed forms -----------------------------------------------------------------------
def test_lift_kernel_closed_form():
    # K(a, b) = sigma_w^2 / C sum_c <P s_c(R_a .), P s'_c(R_b .)> + sigma_b^2 (P: projection to l < L1),
    # evaluated with rotate_signal and the SH inner product, independently of the D^T s route.
    spec = SO3Spec(channels=2, L_in=4, bands=(3,), B=3, sigma_w=1.2, sigma_b=0.3)
    x = _signals(2, 2, 4, 0)
    K = lift_kernel(spec, x)
    grid, g = so3_grid(3), dh_grid(4)
    for a, b in [(0, 0), (3, 150), (77, 200), (215, 9)]:
        ca = sht(rotate_signal(x[0], grid.R[a].T, g), g, 2)
        cb = sht(rotate_signal(x[1], grid.R[b].T, g), g, 2)
        want = 1.2**2 / 2 * (ca * cb).sum() + 0.3**2
        assert abs(K[0, 1, a, b].item() - want) < EXACT


def _weight_expectation(samples_fn, params):
    """``E[out out^T]`` over N(0, 1) parameters of an output linear in them: ``J J^T``."""
    J = jacrev(samples_fn)(params)
    J = torch.cat([j.reshape(j.shape[0], -1) for j in J.values()], dim=1)
    return J @ J.T


def test_lift_kernel_is_the_exact_weight_expectation():
    spec = SO3Spec(channels=2, L_in=3, bands=(3,), B=3, sigma_w=0.8, sigma_b=0.5)
    x = torch.tensor(_signals(2, 2, 3, 1))
    lift = SO3Lift(2, 1, 3, 3, 0.8, 0.5)
    synth = SO3Nonlin(3, 1, 3, "identity")
    fn = lambda p: synth.samples(functional_call(lift, p, (x,)))[:, 0].reshape(-1)  # [2 P]
    E = _weight_expectation(fn, {k: v.detach() for k, v in lift.named_parameters()})
    P = so3_grid(3).size
    K = lift_kernel(spec, x.numpy())  # [2, 2, P, P]
    assert (E.reshape(2, P, 2, P).permute(0, 2, 1, 3) - K).abs().max().item() < EXACT


def test_conv_kernel_op_is_the_exact_weight_expectation():
    # Arbitrary grid samples q (like phi(f), not band-limited) -> analysis to band L -> conv ->
    # synthesis: E over the conv weights equals conv_kernel_op of the channel mean of q q'.
    B, L, C = 2, 2, 3
    grid = so3_grid(B)
    q = torch.randn(2, C, grid.size, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    anal = torch.tensor(so3_analysis(grid, L))
    synth = torch.tensor(so3_synthesis(grid, L))
    conv = SO3Conv(C, 1, L, sigma_w=1.0, sigma_b=0.0)
    params = {"weight": conv.weight.detach()}
    fn = lambda p: (functional_call(conv, {**p, "bias": conv.bias.detach()}, (q @ anal,)) @ synth)[:, 0].reshape(-1)
    E = _weight_expectation(fn, params).reshape(2, grid.size, 2, grid.size).permute(0, 2, 1, 3)
    M = torch.einsum("ica,jcb->ijab", q, q) / C
    assert (E - conv_kernel_op(M, _GridOps(B, L - 1), L)).abs().max().item() < EXACT


@pytest.mark.parametrize("mode", ["grid", "relative"])
def test_identity_network_closed_form(mode):
    # With phi = identity only l = 0 reaches the pooled output: G_1 = sw^2/C sum_c s0 s0' + sb^2,
    # G_{k+1} = sw^2 G_k + sb^2, NNGP = sr^2 G_{D+1} + sb^2; T_1 = G_1, T_{k+1} = G_{k+1} + sw^2 T_k,
    # NTK = NNGP + sr^2 T_{D+1}.
    sw, sb, sr = 1.3, 0.4, 0.9
    spec = SO3Spec(channels=2, L_in=3, bands=(3, 2, 2), B=3, nonlin="identity", sigma_w=sw, sigma_b=sb,
                   readout_sigma_w=sr)
    x = _signals(3, 2, 3, 2)
    nngp, ntk = so3_kernel_fn(spec, x, mode=mode)
    s0 = torch.tensor(sht(x, dh_grid(3), 0)[..., 0])  # [N, C]: the mean of each channel
    G = sw**2 * (s0 @ s0.T) / 2 + sb**2
    T = G.clone()
    for _ in range(spec.depth):
        G = sw**2 * G + sb**2
        T = G + sw**2 * T
    want_nngp = sr**2 * G + sb**2
    assert (nngp - want_nngp).abs().max().item() < EXACT
    assert (ntk - (want_nngp + sr**2 * T)).abs().max().item() < EXACT


def test_sphere_mlp_closed_forms():
    C, L = 2, 3
    x = _signals(4, C, L, 3)
    c = sht(x, dh_grid(L))
    sigma0 = torch.tensor(np.einsum("icn,jcn->ij", c, c) / C)  # Parseval: the quadrature inner product
    spec0 = SphereMLPSpec(channels=C, L_in=L, depth=0, readout_sigma_w=1.5, sigma_b=0.2)
    nngp, ntk = sphere_mlp_kernel_fn(spec0, x)
    assert (nngp - (1.5**2 * sigma0 + 0.04)).abs().max().item() < EXACT and torch.equal(nngp, ntk)
    # One relu layer, no bias: the arc-cosine kernel by hand.
    spec1 = SphereMLPSpec(channels=C, L_in=L, depth=1, nonlin="relu", sigma_w=1.0, readout_sigma_w=1.0)
    nngp, ntk = sphere_mlp_kernel_fn(spec1, x)
    n = sigma0.diagonal().sqrt()
    cos = (sigma0 / torch.outer(n, n)).clamp(-1, 1).fill_diagonal_(1.0)  # kernel_nonlin snaps cos ~ 1 to 1
    t = torch.acos(cos)
    want = torch.outer(n, n) * (torch.sin(t) + (math.pi - t) * cos) / (2 * math.pi)
    assert (nngp - want).abs().max().item() < 1e-12
    assert (ntk - (want + sigma0 * (math.pi - t) / (2 * math.pi))).abs().max().item() < 1e-12


# ----- (b) invariance of the pooled kernel -----------------------------------------------------
@pytest.mark.parametrize("mode", ["grid", "relative"])
@pytest.mark.parametrize("nonlin", ["relu", "erf"])
def test_kernel_exactly_invariant_under_grid_permuting_rotations(nonlin, mode):
    # Rotating x' by Q = Rz(2 pi j / 2B) permutes its lifting features over the grid, so the
    # pooled kernel is unchanged, one-sided or two-sided. In relative mode the kernel is a
    # function of g = R_a R_b^-1 and Q shifts g by Rz on the right (x') or left (x): also a
    # permutation of the SOFT grid.
    B = 3
    spec = SO3Spec(channels=2, L_in=3, bands=(3, 2), B=B, nonlin=nonlin, sigma_b=0.2)
    x = _signals(3, 2, 3, 4)
    nngp, ntk = so3_kernel_fn(spec, x, mode=mode)
    for j in [1, 2, 5]:
        xq = rotate_signal(x, euler_zyz(2 * np.pi * j / (2 * B), 0.0, 0.0), dh_grid(3))
        for a, b in [(x, xq), (xq, x), (xq, xq)]:
            n2, t2 = so3_kernel_fn(spec, a, b, mode=mode)
            assert (n2 - nngp).abs().max().item() < EXACT and (t2 - ntk).abs().max().item() < EXACT


def test_kernel_invariance_error_falls_with_B():
    # Generic rotations: the pooled kernel is invariant only up to aliasing. One-sided
    # (K(x, R x') vs K(x, x')) relative errors, max over 3 rotations; measured (docs/so3.md):
    #   relu NTK: B=2 1.4e-4, 3 1.4e-5, 4 2.1e-6, 5 5.2e-7 (deterministic; bound 4x above)
    x = _signals(2, 2, 3, 5)
    xr = np.concatenate([rotate_signal(x[1:], R, dh_grid(3)) for R in random_rotations(3, 6)])
    errs = []
    for B in [2, 3, 4, 5]:
        spec = SO3Spec(channels=2, L_in=3, bands=(2, 2), B=B, nonlin="relu", sigma_b=0.1)
        _, t = so3_kernel_fn(spec, x[:1], np.concatenate([x[1:], xr]))
        errs.append(((t[0, 1:] - t[0, 0]).abs().max() / t[0, 0].abs()).item())
    print("\npooled NTK invariance error vs B = 2, 3, 4, 5:", ", ".join(f"{e:.1e}" for e in errs))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 2e-6


def test_relative_mode_approaches_grid_mode():
    # Both are quadratures of the same continuum kernel; they differ by aliasing, which falls
    # with B. Relative NTK difference, measured (docs/so3.md):
    #   relu: B=2 1.7e-3, 3 2.4e-4, 4 9.1e-5;  erf: B=2 1.6e-3, 3 7.4e-5, 4 1.2e-5
    x = _signals(4, 2, 4, 11)
    for nonlin in ["relu", "erf"]:
        errs = []
        for B in [2, 3, 4]:
            spec = SO3Spec(channels=2, L_in=4, bands=(2, 2, 2), B=B, nonlin=nonlin, sigma_b=0.1)
            errs.append(_rel(so3_kernel_fn(spec, x, mode="relative")[1], so3_kernel_fn(spec, x)[1]))
        print(f"\n{nonlin}: relative vs grid NTK, B = 2, 3, 4:", ", ".join(f"{e:.1e}" for e in errs))
        assert all(b < a for a, b in zip(errs, errs[1:])) and errs[-1] < 4e-4, errs  # 4x above relu's


# ----- (c) finite width ------------------------------------------------------------------------
def _empirical_ntks(model_fn, X, seeds):
    out = []
    for seed in seeds:
        m = model_fn(seed)
        params = {k: v.detach() for k, v in m.named_parameters()}
        J = jacrev(lambda p: functional_call(m, p, (X,))[:, 0])(params)
        J = torch.cat([j.reshape(X.shape[0], -1) for j in J.values()], dim=1)
        out.append(J @ J.T)
    return torch.stack(out)


def _convergence(name, model_fn, ntk, X, widths, n_seeds):
    """Per width: mean single-model relative error, and the seed-mean's error with its SE scale."""
    rows = []
    for w in widths:
        E = _empirical_ntks(lambda s: model_fn(w, 1000 * w + s), X, range(n_seeds))
        single = float(np.mean([_rel(e, ntk) for e in E]))
        se = float((E.std(0) / math.sqrt(n_seeds)).norm() / ntk.norm())  # ||SE|| / ||Theta||
        rows.append((w, single, _rel(E.mean(0), ntk), se))
    slope = np.polyfit(np.log([r[0] for r in rows]), np.log([r[1] for r in rows]), 1)[0]
    print(f"\n{name}: width, mean single-model rel err, rel err of the seed mean, ||SE||/||Theta||; slope {slope:.2f}")
    for r in rows:
        print("  %4d  %.3e  %.3e  %.3e" % r)
    return rows, slope


@pytest.mark.parametrize("nonlin,bands", [("relu", (3, 2)), ("erf", (2, 2, 2))])
def test_empirical_ntk_converges_to_analytic(nonlin, bands):
    # A single model's NTK fluctuates around the limit by O(1/sqrt(width)), so the mean over
    # 20 models of the single-model relative error must fall with slope ~ -0.5 (measured
    # relu -0.51, erf -0.50; the bounds -0.8..-0.3 allow for the noise of 20 draws; docs/so3.md). The mean of 20 models must agree with the analytic
    # NTK within 3 ||SE||: its expected squared error is ||SE||^2 (plus an O(1/width) bias).
    spec = SO3Spec(channels=2, L_in=3, bands=bands, B=3, nonlin=nonlin, sigma_b=0.1)
    X = torch.tensor(_signals(4, 2, 3, 7))
    _, ntk = so3_kernel_fn(spec, X.numpy())
    rows, slope = _convergence(f"SO(3) GCNN {nonlin} {bands}", lambda w, s: build_so3_model(spec, w, seed=s),
                               ntk, X, [16, 64, 256], 20)
    assert -0.8 < slope < -0.3
    w, single, mean_err, se = rows[-1]
    assert mean_err < 3 * se and single < 0.15  # measured at 256: seed-mean 6e-3 / 9e-3 vs 3 SE 8e-2; single 0.10
    # The relative-mode kernel is as close to these finite models: its aliasing difference
    # from the grid kernel is far below the ensemble's resolution.
    assert _rel(so3_kernel_fn(spec, X.numpy(), mode="relative")[1], ntk) < se / 10


def test_sphere_mlp_empirical_ntk_converges():
    spec = SphereMLPSpec(channels=2, L_in=3, depth=2, nonlin="relu", sigma_b=0.1)
    X = torch.tensor(_signals(4, 2, 3, 8))
    _, ntk = sphere_mlp_kernel_fn(spec, X)
    rows, slope = _convergence("sphere MLP relu depth 2", lambda w, s: build_sphere_mlp(spec, w, seed=s),
                               ntk, X, [16, 64, 256], 20)
    assert -0.8 < slope < -0.3
    assert rows[-1][2] < 3 * rows[-1][3]


# ----- (d) the orbit-averaged sphere-MLP kernel ------------------------------------------------
@pytest.mark.parametrize("nonlin", ["relu", "erf"])
def test_orbit_average_converges_in_Bq(nonlin):
    # Theta(x, R x') is smooth but not band-limited in R. Quadrature error of the SOFT rule of
    # bandwidth B_q against a B_q = 16 reference (32768 rotations), relative to ||Theta(X, X)||
    # (the orbit average itself can be small: erf's kernel is nearly odd in Sigma0 and
    # cancels over the orbit). Measured (docs/so3.md), inputs with Sigma0(x, x) ~ 9:
    #   relu: B_q=1 5.2e-2, 2 3.4e-3, 3 5.6e-4, 4 1.3e-4, 6 2.1e-5, 8 6.3e-6
    #   erf : B_q=1 4.8e-2, 2 4.8e-3, 3 1.6e-3, 4 4.7e-4, 6 7.8e-5, 8 1.8e-5
    # (~B_q^-4 from 4 to 8, so the reference itself is off by ~4e-7 for relu, ~1e-6 for erf.)
    spec = SphereMLPSpec(channels=2, L_in=3, depth=2, nonlin=nonlin, sigma_b=0.1)
    x = _signals(3, 2, 3, 9)
    scale = sphere_mlp_kernel_fn(spec, x)[1].norm()
    _, ref = orbit_averaged_sphere_mlp_kernel(spec, x, B_q=16)
    errs = {}
    for B_q in [1, 2, 3, 4, 6, 8]:
        errs[B_q] = float((orbit_averaged_sphere_mlp_kernel(spec, x, B_q=B_q)[1] - ref).norm() / scale)
    print(f"\norbit-averaged {nonlin} NTK, error vs B_q=16 / ||Theta||:", ", ".join(f"{b}: {e:.1e}" for b, e in errs.items()))
    e = list(errs.values())
    assert all(b < a for a, b in zip(e, e[1:])), errs
    assert errs[8] < 1e-4  # 5x above the measured erf value (deterministic inputs)
    # Symmetric and invariant in x' to round-off: the SOFT grid is closed under inversion and
    # under right shifts Rz(2 pi j / 2B_q), which is what R -> R Q does.
    _, tg = orbit_averaged_sphere_mlp_kernel(spec, x, B_q=4)
    assert (tg - tg.T).abs().max().item() < 1e-12
    xq = rotate_signal(x, euler_zyz(0.0, 0.0, 2 * np.pi / 8), dh_grid(3))
    assert (orbit_averaged_sphere_mlp_kernel(spec, x, xq, B_q=4)[1] - tg).abs().max().item() < 1e-12


def test_orbit_average_reduces_to_mlp_kernel_for_invariant_inputs():
    # Signals of degree 0 only (constants per channel) are rotation invariant: Theta_G = Theta.
    spec = SphereMLPSpec(channels=2, L_in=2, depth=1, nonlin="erf")
    rng = np.random.default_rng(10)
    c = np.zeros((3, 2, 4))
    c[..., 0] = rng.standard_normal((3, 2))
    x = isht(c, dh_grid(2))
    assert (orbit_averaged_sphere_mlp_kernel(spec, x, B_q=2)[1] - sphere_mlp_kernel_fn(spec, x)[1]).abs().max() < 1e-12


@pytest.mark.slow
def test_empirical_ntk_converges_to_width_1024():
    # The long version of the convergence check (opt in with --runslow; ~1-2 min on 2 cores).
    spec = SO3Spec(channels=2, L_in=3, bands=(3, 2), B=3, nonlin="relu", sigma_b=0.1)
    X = torch.tensor(_signals(4, 2, 3, 7))
    _, ntk = so3_kernel_fn(spec, X.numpy())
    rows, slope = _convergence("SO(3) GCNN relu (3, 2), to width 1024", lambda w, s: build_so3_model(spec, w, seed=s),
                               ntk, X, [16, 64, 256, 1024], 30)
    assert -0.7 < slope < -0.35
    assert all(mean_err < 3 * se for _, _, mean_err, se in rows[1:])
