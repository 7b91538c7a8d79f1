"""Noise-removed squared sizes with intervals from independent blocks of draws (docs/theory.md §5.6).

An ensemble's independent draws (members, or antithetic pair means) are stored as ``K`` blocks:
per point ``i`` the block sums ``S_ik`` and the block sizes ``n_k`` (``N = sum n_k``). For a
target ``c_i`` let ``y_ik = S_ik - n_k c_i``. Different blocks are independent, so

    U = sum_i sum_{k != l} y_ik y_il / W,    W = N^2 - sum_k n_k^2,

is unbiased for ``B^2 = sum_i (E f_i - c_i)^2`` (with one draw a block it is exactly
``sum (mean - c)^2 - sum se^2``). Leaving block ``j`` out changes only ``W`` and the sums:

    U_(-j) = (a - 2 b_j + 2 c_j) / W_(-j),   a = sum_i (Y_i^2 - Q_i),  b_j = sum_i Y_i y_ij,
    c_j = sum_i y_ij^2,  Y_i = sum_k y_ik,  Q_i = sum_k y_ik^2,  W_(-j) = (N - n_j)^2 - sum_{k != j} n_k^2.

``W`` and ``W_(-j)`` are the same for every slice of one ensemble, so ``U`` and each ``U_(-j)``
of a pool of slices (steps, eval sets) are the sums of the slices' values: tables carry them
and pool by adding. The jackknife variance ``(K-1)/K sum_j (U_(-j) - mean U_(-)))^2`` estimates
the variance of ``U`` whatever the correlation between points (the points of one ensemble
share its members), and is biased upwards if anything (Efron and Stein).

The gap between two independent ensembles ``A`` and ``B`` (no target) is estimated by
``U_A + U_B - 2 sum_i mean_A,i mean_B,i``; leaving out a block of ``A`` or of ``B`` gives two sets
of jackknife values, whose variances add.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
from scipy import stats as sps

# Fewer blocks than this give too rough a variance for a t interval; the tables then fall back
# to the bound that assumes the worst correlation (analysis.compare.excess_interval).
MIN_BLOCKS = 8


def _group_sum(values: np.ndarray, codes: np.ndarray, n_groups: int) -> np.ndarray:
    out = np.zeros((n_groups,) + values.shape[1:])
    np.add.at(out, codes, values)
    return out


def u_statistic(y: np.ndarray, n: np.ndarray, codes: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """``(U [G], U_loo [G, K])`` for block sums ``y`` ``[P, K]`` already centred on the target
    (``S - n c``), block sizes ``n`` ``[K]``, and each point's group (slice) ``codes`` ``[P]``."""
    n = np.asarray(n, dtype=np.float64)
    total, sq = n.sum(), np.sum(n**2)
    w = total**2 - sq
    w_loo = (total - n) ** 2 - (sq - n**2)
    Y = y.sum(axis=1)
    a = _group_sum(Y**2 - np.sum(y**2, axis=1), codes, n_groups)
    b = _group_sum(Y[:, None] * y, codes, n_groups)
    c = _group_sum(y**2, codes, n_groups)
    with np.errstate(divide="ignore", invalid="ignore"):
        return a / w, (a[:, None] - 2 * b + 2 * c) / w_loo[None, :]


def gap_statistic(sa: np.ndarray, na: np.ndarray, sb: np.ndarray, nb: np.ndarray, codes: np.ndarray,
                  n_groups: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(G [groups], G_loo_a [groups, K_A], G_loo_b [groups, K_B])``: the unbiased estimate of
    ``sum_i (E mean_A,i - E mean_B,i)^2`` from two independent ensembles' block sums on matched
    points, and its values with one block of ``A`` (of ``B``) left out."""
    na, nb = np.asarray(na, dtype=np.float64), np.asarray(nb, dtype=np.float64)
    ua, ua_loo = u_statistic(sa, na, codes, n_groups)
    ub, ub_loo = u_statistic(sb, nb, codes, n_groups)
    ma, mb = sa.sum(axis=1) / na.sum(), sb.sum(axis=1) / nb.sum()
    x = _group_sum(ma * mb, codes, n_groups)
    # mean_A without block j, dotted with mean_B: (N_A x - sum_i S_Aij mean_B,i) / (N_A - n_j)
    xa = (na.sum() * x[:, None] - _group_sum(sa * mb[:, None], codes, n_groups)) / (na.sum() - na)[None, :]
    xb = (nb.sum() * x[:, None] - _group_sum(sb * ma[:, None], codes, n_groups)) / (nb.sum() - nb)[None, :]
    g = ua + ub - 2 * x
    return g, ua_loo + ub[:, None] - 2 * xa, ua[:, None] + ub_loo - 2 * xb


def variance(loo) -> float:
    """Jackknife variance from the leave-one-block-out values; NaN below ``MIN_BLOCKS``."""
    v = np.asarray(loo, dtype=np.float64)
    k = v.size
    if k < MIN_BLOCKS or not np.all(np.isfinite(v)):
        return float("nan")
    return float((k - 1) / k * np.sum((v - v.mean()) ** 2))


def interval(est: float, var: float, dof: float, level: float = 0.95) -> tuple[float, float]:
    """``(lo, hi)`` for a squared size ``>= 0`` estimated by ``est`` with variance ``var``: Student's
    t with ``dof`` degrees of freedom. An estimate below zero counts as zero, so the upper end is
    at least the size the data could have detected."""
    t = float(sps.t.ppf(0.5 + level / 2, max(dof, 1.0)))
    sd = np.sqrt(var)
    return max(est - t * sd, 0.0), max(est, 0.0) + t * sd


def welch_dof(var_a: float, k_a: int, var_b: float, k_b: int) -> float:
    """Welch-Satterthwaite degrees of freedom of a sum of two independent jackknife variances."""
    den = var_a**2 / max(k_a - 1, 1) + var_b**2 / max(k_b - 1, 1)
    return float((var_a + var_b) ** 2 / den) if den > 0 else float(min(k_a, k_b) - 1)


def one_sample(est: float, loo: Optional[np.ndarray]) -> tuple[float, float, float]:
    """``(lo, hi, blocks)`` of one ensemble's noise-removed size; NaN where the blocks are too few."""
    if loo is None:
        return float("nan"), float("nan"), 0.0
    v = variance(loo)
    if not np.isfinite(v):
        return float("nan"), float("nan"), float(np.size(loo))
    lo, hi = interval(est, v, np.size(loo) - 1)
    return lo, hi, float(np.size(loo))


def two_sample(est: float, loo_a: Optional[np.ndarray], loo_b: Optional[np.ndarray]) -> tuple[float, float, float]:
    """``(lo, hi, dof)`` of a gap between two independent ensembles; NaN where blocks are too few."""
    if loo_a is None or loo_b is None:
        return float("nan"), float("nan"), float("nan")
    va, vb = variance(loo_a), variance(loo_b)
    if not (np.isfinite(va) and np.isfinite(vb)):
        return float("nan"), float("nan"), float("nan")
    dof = welch_dof(va, np.size(loo_a), vb, np.size(loo_b))
    lo, hi = interval(est, va + vb, dof)
    return lo, hi, dof
