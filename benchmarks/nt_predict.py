"""analysis.predict against neural-tangents' gradient_descent_mse_ensemble (gradient flow).

neural-tangents is never a dependency of eqntk: run this with the Python of a separate venv
that has both (``NTVENV/bin/python benchmarks/nt_predict.py``; benchmarks/README.md says how to
make it once, at any path).

Both sides get the same kernels (neural-tangents' analytic NNGP/NTK of a ReLU MLP and of
a circular-padding ReLU CNN with global average pooling), so only the predictions over
training time are compared: means and test-test covariances, at finite times and at
t = inf with and without a diagonal regulariser. Prints the max relative differences
(max |ours - nt| / max |nt|) and exits non-zero when any exceeds 1e-8.

Convention mapping. eqntk trains on L = (1/(2N)) sum_i ||f(x_i) - y_i||^2, so gradient flow
is exp(-(t/N) Theta) with t = eta k (docs/theory.md §5). neural-tangents' ensemble predictor
normalises by y_train.size = N * n_out (the loss is the mean over every target entry) and
multiplies its `t` argument by `learning_rate`: exp(-(learning_rate * t_nt / (N n_out)) Theta).
So with learning_rate = 1, nt's t_nt = n_out * t. Its `diag_reg` with
diag_reg_absolute_scale=True is added to Theta(X,X) only, as eqntk's diag_reg is; its
t=None is t = inf (kernel regression). NNGP kernels enter its NTK-mode covariance
unregularised, as in eqntk.
"""

from __future__ import annotations

import sys

import jax

jax.config.update("jax_enable_x64", True)  # nt would otherwise compute in float32

import numpy as np  # noqa: E402
from neural_tangents import predict, stax  # noqa: E402

from analysis.predict import GDPredictor  # noqa: E402

SW, SB = 1.4, 0.1
TOL = 1e-8


def networks():
    mlp = stax.serial(stax.Flatten(), stax.Dense(512, SW, SB), stax.Relu(), stax.Dense(512, SW, SB), stax.Relu(), stax.Dense(3, SW, SB))
    cnn = stax.serial(
        stax.Conv(64, (3, 3), padding="CIRCULAR", W_std=SW, b_std=SB), stax.Relu(),
        stax.Conv(64, (3, 3), padding="CIRCULAR", W_std=SW, b_std=SB), stax.Relu(),
        stax.GlobalAvgPool(), stax.Dense(3, SW, SB),
    )
    return {"mlp": mlp[2], "cnn": cnn[2]}


def rel(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a) - np.asarray(b))) / np.max(np.abs(np.asarray(b))))


def main() -> int:
    rng = np.random.default_rng(0)
    n, m, n_out = 40, 15, 3
    x = rng.standard_normal((n, 6, 6, 2))  # nt's NHWC images
    xt = np.concatenate([rng.standard_normal((m - 3, 6, 6, 2)), x[:3]])
    y = rng.standard_normal((n, n_out))
    times = np.array([0.0, 0.3, 2.0, 15.0, 120.0, 4000.0])
    worst = 0.0
    for name, kernel_fn in networks().items():
        k_dd = kernel_fn(x, None, ("nngp", "ntk"))
        k_td = kernel_fn(xt, x, ("nngp", "ntk"))
        k_tt = kernel_fn(xt, None, "nngp")
        for reg in (0.0, 1e-3):
            ours = GDPredictor(np.asarray(k_dd.ntk), np.asarray(k_dd.nngp), y, diag_reg=reg)
            nt_fn = predict.gradient_descent_mse_ensemble(
                kernel_fn, x, y, learning_rate=1.0, diag_reg=reg, diag_reg_absolute_scale=True
            )
            nt_mean, nt_cov = nt_fn(t=n_out * times, x_test=xt, get="ntk", compute_cov=True)
            mean = ours.mean(k_td.ntk, times=times)
            cov = ours.covariance(k_td.ntk, k_td.nngp, k_tt, times=times)
            var = ours.variance(k_td.ntk, k_td.nngp, np.diag(np.asarray(k_tt)), times=times)
            nt_inf_mean, nt_inf_cov = nt_fn(t=None, x_test=xt, get="ntk", compute_cov=True)
            inf_mean = ours.mean(k_td.ntk, times=[np.inf])[0]
            inf_cov = ours.covariance(k_td.ntk, k_td.nngp, k_tt, times=[np.inf])[0]
            # per time: the covariance shrinks by orders of magnitude over training
            r = {
                "mean(t)": max(rel(mean[i], nt_mean[i]) for i in range(1, len(times))),
                "cov(t)": max(rel(cov[i], nt_cov[i]) for i in range(len(times))),
                "var(t)": max(rel(var[i], np.diagonal(nt_cov[i])) for i in range(len(times))),
                "mean(inf)": rel(inf_mean, nt_inf_mean),
                "cov(inf)": rel(inf_cov, nt_inf_cov),
            }
            cond = ours.eigenvalues[-1] / ours.eigenvalues[0]
            print(f"{name:4s} diag_reg={reg:g} cond={cond:.2e}  " + "  ".join(f"{k} {v:.2e}" for k, v in r.items()))
            worst = max(worst, *r.values())
    print(f"max relative difference {worst:.2e} (tolerance {TOL:g})")
    return 0 if worst < TOL else 1


if __name__ == "__main__":
    sys.exit(main())
