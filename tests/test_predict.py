"""analysis.predict against direct iteration of linearised GD, and analysis.blocks.

The kernels here are closed forms written out in this file (the one-hidden-layer ReLU
network in NTK parameterisation, docs/theory.md §2), so these tests depend on nothing
but numpy and the code under test.
"""

from __future__ import annotations

import sys

import numpy as np
import pytest

from analysis.blocks import blocked_kernel, blocked_kernel_fn
from analysis.predict import GDPredictor, UnstableLearningRate, _flow_filter, _gd_filter

SW, SB = 1.3, 0.2  # sigma_w, sigma_b: a bias makes the kernel full rank on generic data


def relu_kernels(x1, x2=None, sw=SW, sb=SB):
    """NNGP and NTK of ``f(x) = sw/sqrt(n) v.relu(sw/sqrt(d) W x + sb b) + sb b'`` (width -> inf)."""
    x1 = np.asarray(x1, dtype=np.float64).reshape(len(x1), -1)
    x2 = x1 if x2 is None else np.asarray(x2, dtype=np.float64).reshape(len(x2), -1)
    d = x1.shape[1]
    # pre-activation covariance as inner products of a = (sw x / sqrt(d), sb)
    a1, a2 = (np.hstack([sw * x / np.sqrt(d), np.full((len(x), 1), sb)]) for x in (x1, x2))
    k0 = a1 @ a2.T
    n1, n2 = np.linalg.norm(a1, axis=1), np.linalg.norm(a2, axis=1)
    norm = np.outer(n1, n2)
    # the angle from unit vectors, 2 atan2(|u - v|, |u + v|): arccos(k0 / norm) would turn a
    # rounding of 1e-16 in a ratio near 1 into an angle of 1e-8, differently for another
    # blocking of the same matmul; this form is exact (0) for an input against itself
    u1, u2 = a1 / n1[:, None], a2 / n2[:, None]
    theta = 2 * np.arctan2(np.linalg.norm(u1[:, None] - u2[None], axis=-1),
                           np.linalg.norm(u1[:, None] + u2[None], axis=-1))
    e_phi = norm * (np.sin(theta) + (np.pi - theta) * np.cos(theta)) / (2 * np.pi)
    e_dphi = (np.pi - theta) / (2 * np.pi)
    nngp = sw**2 * e_phi + sb**2
    ntk = nngp + sw**2 * k0 * e_dphi
    return {"nngp": nngp, "ntk": ntk}


def relu_diag(x, sw=SW, sb=SB):
    x = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    k0 = sw**2 * np.einsum("ij,ij->i", x, x) / x.shape[1] + sb**2
    return sw**2 * k0 / 2 + sb**2  # E[relu(u)^2] = k/2


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    n, m, d, n_out = 12, 7, 5, 3
    x = rng.standard_normal((n, d))
    xt = np.concatenate([rng.standard_normal((m - 2, d)), x[:2]])  # two test points are training points
    y = rng.standard_normal((n, n_out))
    k_dd, k_td, k_tt = relu_kernels(x), relu_kernels(xt, x), relu_kernels(xt)
    return dict(x=x, xt=xt, y=y, k_dd=k_dd, k_td=k_td, k_tt=k_tt, kdiag=relu_diag(xt))


def iterate_gd(p, lr, steps):
    """Linearised GD in function space, one step at a time: mean and joint covariance.

    State z = (f(x_test), f(X)); z_{k+1} = M z_k + (eta/N) (Theta(x,X); Theta(X,X)) Y,
    so the mean follows the same affine map and the covariance C_{k+1} = M C_k M^T,
    starting from the NNGP of (x_test, X).
    """
    th_dd, th_td = p["k_dd"]["ntk"], p["k_td"]["ntk"]
    m, n = th_td.shape
    c = lr / n
    big_m = np.eye(m + n)
    big_m[:m, m:] = -c * th_td
    big_m[m:, m:] -= c * th_dd
    drive = c * np.concatenate([th_td, th_dd]) @ p["y"]
    k = p["k_tt"]["nngp"], p["k_td"]["nngp"], p["k_dd"]["nngp"]
    cov = np.block([[k[0], k[1]], [k[1].T, k[2]]])
    mean = np.zeros((m + n, p["y"].shape[1]))
    means, covs = {}, {}
    for step in range(max(steps) + 1):
        if step in steps:
            means[step], covs[step] = mean[:m].copy(), cov[:m, :m].copy()
        mean = big_m @ mean + drive
        cov = big_m @ cov @ big_m.T
    return np.stack([means[s] for s in steps]), np.stack([covs[s] for s in steps])


def lr_fraction(p, frac):
    return frac * GDPredictor(p["k_dd"]["ntk"], None, p["y"]).max_stable_lr


STEPS = [0, 1, 2, 7, 40, 250]


@pytest.mark.parametrize("frac", [0.3, 0.9, 0.999])  # 0.9, 0.999: top eigen-directions oscillate (r > 1)
def test_mean_and_variance_match_direct_iteration(problem, frac):
    p = problem
    lr = lr_fraction(p, frac)
    pred = GDPredictor(p["k_dd"]["ntk"], p["k_dd"]["nngp"], p["y"], lr)
    want_mean, want_cov = iterate_gd(p, lr, STEPS)
    mean = pred.mean(p["k_td"]["ntk"], steps=STEPS)
    var = pred.variance(p["k_td"]["ntk"], p["k_td"]["nngp"], p["kdiag"], steps=STEPS)
    cov = pred.covariance(p["k_td"]["ntk"], p["k_td"]["nngp"], p["k_tt"]["nngp"], steps=STEPS)
    # Both sides are O(1) numbers computed in float64 through at most 250 matrix products
    # of norm <= 1 on the kernel's range: rounding stays near 1e-13, far inside 1e-10.
    assert mean.shape == (len(STEPS), 7, 3) and var.shape == (len(STEPS), 7)
    np.testing.assert_allclose(mean, want_mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(cov, want_cov, rtol=0, atol=1e-10)
    np.testing.assert_allclose(var, np.diagonal(want_cov, axis1=1, axis2=2), rtol=0, atol=1e-10)


def test_step_zero_is_the_prior(problem):
    p = problem
    pred = GDPredictor(p["k_dd"]["ntk"], p["k_dd"]["nngp"], p["y"], lr_fraction(p, 0.5))
    for kw in (dict(steps=[0]), dict(times=[0.0])):
        assert np.all(pred.mean(p["k_td"]["ntk"], **kw) == 0)
        var = pred.variance(p["k_td"]["ntk"], p["k_td"]["nngp"], p["kdiag"], **kw)[0]
        np.testing.assert_array_equal(var, p["kdiag"])  # a_0 = 0 exactly
    np.testing.assert_allclose(p["kdiag"], np.diag(p["k_tt"]["nngp"]), rtol=1e-14)


def test_gradient_flow_is_the_small_lr_limit(problem):
    p = problem
    times = [0.5, 3.0, 20.0]
    pred = GDPredictor(p["k_dd"]["ntk"], p["k_dd"]["nngp"], p["y"])
    flow_mean = pred.mean(p["k_td"]["ntk"], times=times)
    flow_var = pred.variance(p["k_td"]["ntk"], p["k_td"]["nngp"], p["kdiag"], times=times)
    errs = []
    for lr in (1e-2, 1e-3, 1e-4):
        gd = GDPredictor(p["k_dd"]["ntk"], p["k_dd"]["nngp"], p["y"], lr)
        steps = [round(t / lr) for t in times]
        e_mean = np.abs(gd.mean(p["k_td"]["ntk"], steps=steps) - flow_mean).max()
        e_var = np.abs(gd.variance(p["k_td"]["ntk"], p["k_td"]["nngp"], p["kdiag"], steps=steps) - flow_var).max()
        errs.append(max(e_mean, e_var))
    # (1 - c lam)^k = exp(-k c lam) (1 + O(k c^2 lam^2)): the gap is first order in eta,
    # so each tenfold smaller eta must cut it about tenfold (ratios within [7, 13]).
    assert 7 < errs[0] / errs[1] < 13 and 7 < errs[1] / errs[2] < 13, errs
    assert errs[2] < 1e-4, errs


def test_infinite_time_is_kernel_regression(problem):
    p = problem
    th_dd, th_td = p["k_dd"]["ntk"], p["k_td"]["ntk"]
    n = len(th_dd)
    for reg in (0.0, 0.05):
        pred = GDPredictor(th_dd, p["k_dd"]["nngp"], p["y"], diag_reg=reg)
        a = np.linalg.solve(th_dd + reg * np.eye(n), th_td.T).T
        want_mean = a @ p["y"]
        k_xx, k_xd, k_dd = p["k_tt"]["nngp"], p["k_td"]["nngp"], p["k_dd"]["nngp"]
        want_cov = k_xx - a @ k_xd.T - k_xd @ a.T + a @ k_dd @ a.T
        mean = pred.mean(th_td, times=[np.inf])[0]
        cov = pred.covariance(th_td, k_xd, k_xx, times=[np.inf])[0]
        var = pred.variance(th_td, k_xd, p["kdiag"], times=[np.inf])[0]
        # cond(Theta(X,X)) is about 70 here: solve and eigendecomposition agree to ~1e-14.
        np.testing.assert_allclose(mean, want_mean, rtol=0, atol=1e-10)
        np.testing.assert_allclose(cov, want_cov, rtol=0, atol=1e-10)
        np.testing.assert_allclose(var, np.maximum(np.diag(want_cov), 0), rtol=0, atol=1e-10)
        # long flow approaches the same limit (slowest rate lam_min/N sets the time)
        t_long = 60 * n / pred.eigenvalues[0]
        np.testing.assert_allclose(pred.mean(th_td, times=[t_long])[0], mean, rtol=0, atol=1e-10)
    # without a ridge the training points are interpolated, and their variance vanishes
    pred = GDPredictor(th_dd, p["k_dd"]["nngp"], p["y"])
    np.testing.assert_allclose(pred.mean(th_td, times=[np.inf])[0][-2:], p["y"][:2], rtol=0, atol=1e-10)
    var = pred.variance(th_td, p["k_td"]["nngp"], p["kdiag"], times=[np.inf])[0]
    assert np.all(var[-2:] < 1e-10)


def test_variance_is_non_negative(problem):
    p = problem
    pred = GDPredictor(p["k_dd"]["ntk"], p["k_dd"]["nngp"], p["y"], lr_fraction(p, 0.95))
    # test points include training points, where the variance decays to zero
    var_s = pred.variance(p["k_td"]["ntk"], p["k_td"]["nngp"], p["kdiag"], steps=[0, 3, 100, 10_000, 10**7])
    var_t = pred.variance(p["k_td"]["ntk"], p["k_td"]["nngp"], p["kdiag"], times=[0.1, 1e3, 1e6, np.inf])
    assert np.all(var_s >= 0) and np.all(var_t >= 0)
    assert np.all(var_s[:, :5] > 0.01)  # off the training set it stays positive


def test_stability_bound(problem):
    p = problem
    pred = GDPredictor(p["k_dd"]["ntk"], None, p["y"])
    bound = pred.max_stable_lr
    np.testing.assert_allclose(bound, 2 * 12 / np.linalg.eigvalsh(p["k_dd"]["ntk"])[-1], rtol=1e-12)
    assert pred.is_stable(0.99 * bound) and not pred.is_stable(bound)
    with pytest.raises(UnstableLearningRate, match="stability bound"):
        GDPredictor(p["k_dd"]["ntk"], None, p["y"], lr=1.01 * bound)
    # opting out gives the diverging dynamics, still equal to direct iteration
    lr = 1.01 * bound
    unstable = GDPredictor(p["k_dd"]["ntk"], p["k_dd"]["nngp"], p["y"], lr=lr, check_stability=False)
    want_mean, _ = iterate_gd(p, lr, [200])
    got = unstable.mean(p["k_td"]["ntk"], steps=[200])
    # values grow like 1.01^200 ~ 7; relative rounding stays near 1e-13
    np.testing.assert_allclose(got, want_mean, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError, match="no lr"):
        pred.mean(p["k_td"]["ntk"], steps=[1])
    with pytest.raises(ValueError, match="exactly one"):
        pred.mean(p["k_td"]["ntk"])


def test_filters_near_zero_eigenvalues():
    # g_k(lam) = c k - c^2 k (k-1) lam / 2 + O(lam^2): the series is exact to rounding
    # where its next term, c^3 k^3 lam^2 / 6, is below 1e-16 of the value.
    c, k = 0.01, 1000
    lam = np.array([0.0, 1e-300, 1e-18, 1e-12, -1e-14])
    series = c * k - c**2 * k * (k - 1) * lam / 2
    np.testing.assert_allclose(_gd_filter(lam, c, k), series, rtol=1e-14)
    s = 5.0
    np.testing.assert_allclose(_flow_filter(lam, s), s - s**2 * lam / 2, rtol=1e-14)
    # a large-eigenvalue direction is the plain formula, including the oscillating regime
    big = np.array([10.0, 150.0, 199.0])
    np.testing.assert_allclose(_gd_filter(big, c, 7), (1 - (1 - c * big) ** 7) / big, rtol=1e-14)
    np.testing.assert_allclose(_flow_filter(big, 0.3), -np.expm1(-0.3 * big) / big, rtol=1e-14)


def test_singular_kernel_matches_direct_iteration():
    # duplicated training inputs make Theta(X,X) exactly singular (conflicting targets too):
    # the filter's lam -> 0 limit must still give the iterated dynamics
    rng = np.random.default_rng(1)
    x = rng.standard_normal((6, 4))
    x = np.concatenate([x, x[:3]])
    xt = rng.standard_normal((4, 4))
    p = dict(x=x, y=rng.standard_normal((9, 2)), k_dd=relu_kernels(x), k_td=relu_kernels(xt, x), k_tt=relu_kernels(xt))
    lr = lr_fraction(p, 0.7)
    pred = GDPredictor(p["k_dd"]["ntk"], p["k_dd"]["nngp"], p["y"], lr)
    assert pred.eigenvalues[0] < 1e-12 * pred.eigenvalues[-1]
    want_mean, want_cov = iterate_gd(p, lr, [5, 300])
    np.testing.assert_allclose(pred.mean(p["k_td"]["ntk"], steps=[5, 300]), want_mean, rtol=0, atol=1e-10)
    cov = pred.covariance(p["k_td"]["ntk"], p["k_td"]["nngp"], p["k_tt"]["nngp"], steps=[5, 300])
    np.testing.assert_allclose(cov, want_cov, rtol=0, atol=1e-10)
    assert np.all(np.isfinite(pred.mean(p["k_td"]["ntk"], times=[np.inf])))


def test_rejects_bad_input(problem):
    p = problem
    with pytest.raises(ValueError, match="positive semidefinite"):
        th = p["k_dd"]["ntk"]
        GDPredictor(th - np.trace(th) / 12 * np.eye(12), None, p["y"])  # mean eigenvalue removed
    with pytest.raises(ValueError, match="y_train"):
        GDPredictor(p["k_dd"]["ntk"], None, p["y"][:5])
    with pytest.raises(ValueError, match="nngp_train_train"):
        GDPredictor(p["k_dd"]["ntk"], None, p["y"]).variance(p["k_td"]["ntk"], p["k_td"]["nngp"], p["kdiag"], times=[1])


# ----- blocks ----------------------------------------------------------------------------

CALLS = []  # symmetric / asymmetric calls seen by the local engine


def relu_engine(spec, input_shape, n_out):
    """An engine with ``analysis.kernels.kernel_fn``'s signature, on the closed form above."""

    def kf(x1, x2=None, get=("nngp", "ntk")):
        CALLS.append((len(x1), None if x2 is None else len(x2)))
        if x2 is None:  # a symmetric call must come back exactly symmetric, like a real engine's
            k = relu_kernels(x1)
            return {g: 0.5 * (k[g] + k[g].T) for g in get}
        k = relu_kernels(x1, x2)
        return {g: k[g] for g in get}

    return kf


@pytest.fixture(scope="module")
def ray_local():
    ray = pytest.importorskip("ray")
    from ray import cloudpickle  # Ray's own copy, the one that pickles task arguments

    # ship this test module's engine to the workers by value: they cannot import it
    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()
    cloudpickle.unregister_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def spec():
    from study.spec import ModelSpec

    return ModelSpec(name="m", arch="mlp", depth=1, group="C4", sigma_w=SW, sigma_b=SB)


def test_blocked_kernel_local(spec):
    rng = np.random.default_rng(2)
    x1, x2 = rng.standard_normal((23, 2, 3, 3)), rng.standard_normal((10, 2, 3, 3))
    CALLS.clear()
    sym = blocked_kernel(spec, (2, 3, 3), 1, x1, block_size=5, use_ray=False, engine=relu_engine)
    # 5 row blocks: 5 symmetric diagonal calls and 10 upper off-diagonal ones, none below
    assert sorted(c[1] is None for c in CALLS).count(True) == 5 and len(CALLS) == 15
    full = relu_kernels(x1)
    for g in ("nngp", "ntk"):
        # the closed form evaluated block by block rounds differently only in its last bits
        np.testing.assert_allclose(sym[g], full[g], rtol=1e-14, atol=0)
        np.testing.assert_array_equal(sym[g], sym[g].T)
    cross = blocked_kernel(spec, (2, 3, 3), 1, x1, x2, get=("ntk",), block_size=4, use_ray=False, engine=relu_engine)
    assert set(cross) == {"ntk"}
    np.testing.assert_allclose(cross["ntk"], relu_kernels(x1, x2)["ntk"], rtol=1e-14, atol=0)


def test_blocked_kernel_on_ray(ray_local, spec):
    rng = np.random.default_rng(3)
    x1, x2 = rng.standard_normal((17, 2, 3, 3)), rng.standard_normal((9, 2, 3, 3))
    local = blocked_kernel(spec, (2, 3, 3), 1, x1, block_size=4, use_ray=False, engine=relu_engine)
    remote = blocked_kernel(spec, (2, 3, 3), 1, x1, block_size=4, engine=relu_engine)
    for g in ("nngp", "ntk"):
        np.testing.assert_array_equal(remote[g], local[g])  # same blocks, same arithmetic
    kf = blocked_kernel_fn(block_size=4, engine=relu_engine)(spec, (2, 3, 3), 1)
    cross = kf(x2, x1, get="ntk")
    np.testing.assert_allclose(cross["ntk"], relu_kernels(x2, x1)["ntk"], rtol=1e-14, atol=0)


def test_blocked_kernel_with_the_kernel_engine(ray_local):
    kernels = pytest.importorskip("analysis.kernels")
    from analysis.predict import predict_as_trained
    from study.spec import ModelSpec

    spec = ModelSpec(name="c", arch="cnn", depth=2, group="C4", sigma_w=SW, sigma_b=SB, augmentation="full_orbit")
    plain = spec.model_copy(update={"augmentation": "none"})
    rng = np.random.default_rng(4)
    x, xt = rng.standard_normal((7, 1, 4, 4)), rng.standard_normal((5, 1, 4, 4))
    y = rng.standard_normal((7, 2))
    whole = kernels.kernel_fn(plain, (1, 4, 4), 2)(x)
    blocked = blocked_kernel(plain, (1, 4, 4), 2, x, block_size=3)  # default engine, on Ray
    for g in ("nngp", "ntk"):
        # the engine computes each pair independently: blocking changes only rounding order
        np.testing.assert_allclose(blocked[g], whole[g], rtol=1e-13, atol=0)
    # the blocked factory drops into predict_as_trained (28 augmented samples, blocks of 8)
    direct = predict_as_trained(spec, x, y, xt, times=[1.0, 30.0])
    via_ray = predict_as_trained(spec, x, y, xt, times=[1.0, 30.0], kernel_fn=blocked_kernel_fn(block_size=8))
    np.testing.assert_allclose(via_ray.mean, direct.mean, rtol=0, atol=1e-12)
    np.testing.assert_allclose(via_ray.variance, direct.variance, rtol=0, atol=1e-12)
