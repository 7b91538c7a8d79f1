"""Finite ensembles against theory, and against each other: the analysis tables.

Definitions (all per slice = (model, width, lr, step, eval set); "points" are the samples x
orbit points x outputs of the slice; RMS is over points):

- ``z = (mean - mu) / se`` with the ensemble's own standard error ``se = sqrt(var / M)``.
  If the ensemble were drawn from the infinite-width Gaussian process, ``z`` would follow
  Student's t with ``M - 1`` degrees of freedom; ``median_abs_z_null`` and
  ``frac_abs_z_lt2_null`` are that reference. ``z_theory`` uses the analytic standard
  error ``sqrt(var_theory / M)`` instead (reference: the standard normal).
- ``rel_err = RMS(mean - mu) / scale`` with ``scale = RMS(mu)``, except at step 0 where
  ``mu = 0`` identically (the initial function has mean zero): there the scale is the RMS
  of the analytic standard deviation ``sqrt(var_theory)`` (the ensemble's own when the
  theory has no variance, as for random augmentation), so ``rel_err`` at step 0 is
  about ``1/sqrt(M)`` for a correct ensemble. ``rel_noise = RMS(se) / scale`` is the part
  of ``rel_err`` that the finite ensemble alone explains, and
  ``rel_bias = sqrt(max(RMS(mean - mu)^2 - RMS(se)^2, 0)) / scale`` estimates what is left
  (``E (mean - mu)^2 = bias^2 + se^2``).
- Bias with the noise removed (docs/theory.md §5.4): over the points of a slice (or of any
  pool of slices), ``E = sum (mean - mu)^2`` and ``S = sum se^2``; ``bias2 = E - S`` estimates
  ``B^2 = sum (E mean - mu)^2``, and ``bias2_lo``, ``bias2_hi`` bound it with 95% confidence
  whatever the correlation between points (``excess_interval``); ``rel_bias_lo``, ``rel_bias_hi``
  are their square roots over the scale.
- Where the parts store blocks of independent draws (``analysis.empirical.ensemble_blocks``)
  and an ensemble has at least ``jackknife.MIN_BLOCKS`` of them, ``bias2`` is instead the
  blocks' unbiased estimate and its interval the delete-one-block jackknife's (Student t),
  which needs no assumption on the correlation between points (docs/theory.md §5.6); so are
  the gaps' and the orbit spreads'. ``interval`` says which a row got; the leave-one-block-out
  values (``*_loo``) travel with the rows so pooled rows get their own jackknife.
- Exponent of the bias in width (``exponent_bias`` with ``exponent_bias_lo``/``_hi``): weighted
  least squares of ``log sqrt(bias2)`` against ``log width`` over the widths whose bias is
  resolved (``bias2_lo > 0``), each weighted by the width of its interval (``fit_exponent``).
- Convergence in width: least-squares slope of ``log rel_err`` (and ``log rel_bias``)
  against ``log width``, per step and for the error pooled over all steps > 0.
- Pair gaps: ``d = (mean_A - mean_B) / sqrt(se_A^2 + se_B^2)`` per point, pooled as
  ``gap_se = RMS(mean_A - mean_B) / RMS(sqrt(se_A^2 + se_B^2))``; ``theory_gap_se`` is the
  analytic gap ``mu_A - mu_B`` in the same units (what the ensembles would show if each were
  exactly its infinite-width limit). ``rel_gap = RMS(mean_A - mean_B) / RMS(mu)`` (``RMS(mu)`` of
  both models' analytic means) includes the noise; ``rel_gap_est`` removes it as for the bias
  (``diff_ss - comb_ss``) and ``rel_gap_lo``, ``rel_gap_hi`` are its 95% interval.
- Pair kinds: see ``model_pairs``; after the gaps are known, a pair of two different models
  whose analytic means differ by more than ``CONTROL_REL_GAP`` (pooled ``theory_rel_gap``) is
  a ``control``: a difference the study must resolve before an "equal" can mean anything.
- Orbit spread of the ensemble mean: ``RMS_g(mean(L_g x) - orbit average) / RMS(mean)``;
  ``spread_noise`` is the spread independent errors of size ``se`` would give,
  ``sqrt((1 - 1/|G|) RMS(se)^2) / RMS(mean)``. Its systematic part ``spread_sys`` removes that
  noise as for the bias, with the 95% interval ``spread_sys_lo``, ``spread_sys_hi``.

Slices without an analytic prediction (a model trained by SGD or on the cross-entropy, which
has no analytic counterpart, or one whose theory failed) keep NaN ``mu``, ``z`` and analytic
columns in ``points``, ``invariance`` and ``pairs``, and are left out of ``agreement`` and
``convergence``, which measure the distance to the theory. The ensemble-only comparisons
(orbit spread, pair gaps) include them; a pair is compared only when both models are trained
alike (``ModelSpec.training``: loss, optimizer, batch size).
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import pandas as pd
from scipy import stats as sps
from scipy.optimize import brentq

from study.spec import ModelSpec

from . import jackknife
from .empirical import ENSEMBLE, POINT_KEYS, Blocks
from .theory import Theory

SLICE = ["model", "width", "lr", "step", "eval_set"]
# Two-sided 95% normal quantile, used by every interval of the tables.
Z95 = float(sps.norm.ppf(0.975))
# Analytic means further apart than this (relative, pooled over steps > 0) make a pair a
# positive control: escnn's basis against the canonical GCNN is about 0.145.
CONTROL_REL_GAP = 0.05


# ----- points ----------------------------------------------------------------------------
def add_theory(stats: pd.DataFrame, theories: dict[tuple[str, float], Theory]) -> pd.DataFrame:
    """``stats`` with the analytic ``mu``, ``var_theory`` and the z-scores ``z``, ``z_theory``."""
    mu = np.full(len(stats), np.nan)
    vt = np.full(len(stats), np.nan)
    for (model, lr, ev), idx in stats.groupby(["model", "lr", "eval_set"], sort=False).indices.items():
        th = theories.get((model, float(lr)))
        if th is None or not th.ok or ev not in th.mean:
            continue
        sub = stats.iloc[idx]
        steps = np.asarray(th.steps)
        si = np.searchsorted(steps, sub["step"].to_numpy())
        mean, var = th.mean[ev], th.var[ev]
        s, g, o = (sub[c].to_numpy() for c in ("sample", "group_element", "output"))
        if (si >= len(steps)).any() or (steps[np.minimum(si, len(steps) - 1)] != sub["step"].to_numpy()).any() or \
                s.max() >= mean.shape[1] or g.max() >= mean.shape[2] or o.max() >= mean.shape[3]:
            raise ValueError(
                f"predictions of {model} on {ev} do not match the study's inputs (steps, samples, orbit or "
                "outputs out of range); was the results directory written by another version of the study?"
            )
        mu[idx] = mean[si, s, g, o]
        vt[idx] = var[si, s, g]
    out = stats.copy()
    out["mu"] = mu
    out["var_theory"] = vt
    with np.errstate(divide="ignore", invalid="ignore"):
        diff = out["mean"].to_numpy() - mu
        out["z"] = diff / out["se"].to_numpy()
        # the analytic variance is that of independent members; antithetic pairs have none
        independent = (out["draws"] == out["members"]).to_numpy()
        out["z_theory"] = np.where(independent, diff / np.sqrt(vt / out["members"].to_numpy()), np.nan)
    return out


def t_null(draws) -> tuple[np.ndarray, np.ndarray]:
    """Median of |t| and P(|t| < 2) for Student's t with ``draws - 1`` degrees of freedom."""
    dof = np.maximum(np.asarray(draws, dtype=np.float64) - 1, 1)
    return sps.t.ppf(0.75, dof), 2 * sps.t.cdf(2.0, dof) - 1


def t_null_pooled(draws) -> tuple[float, float]:
    """Median of |z| and P(|z| < 2) for a pool of points whose ensembles have different sizes:
    the mixture of Student t laws with each point's ``draws - 1`` degrees of freedom."""
    dof, counts = np.unique(np.maximum(np.asarray(draws, dtype=np.float64) - 1, 1), return_counts=True)
    if len(dof) == 0:
        return float("nan"), float("nan")
    w = counts / counts.sum()

    def below(x):  # P(|z| < x) under the mixture
        return float(np.sum(w * (2 * sps.t.cdf(x, dof) - 1)))

    return float(brentq(lambda x: below(x) - 0.5, 1e-9, 100.0)), below(2.0)


NORMAL_MEDIAN_ABS, NORMAL_FRAC_LT2 = float(sps.norm.ppf(0.75)), float(2 * sps.norm.cdf(2.0) - 1)


def _lt(x: pd.Series, bound: float) -> pd.Series:
    """``|x| < bound`` as 0/1, NaN where ``x`` is NaN (so means skip it)."""
    return (x.abs() < bound).astype(float).where(x.notna())


def _sqrt_ratio(num, den) -> np.ndarray:
    num, den = np.asarray(num, dtype=np.float64), np.asarray(den, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, np.sqrt(num / den), np.nan)


# ----- a sum of squared errors with the noise removed (docs/theory.md §5.4) ----------------
def excess_interval(err_ss, se_ss, se_ss_var, z: float = Z95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(est, lo, hi)``: ``est = E - S`` estimates ``B^2``, the squared norm of the systematic
    part of the errors whose squares sum to ``E = err_ss`` (``S = se_ss``: the summed squared
    standard errors; ``se_ss_var``: a bound on the variance of ``S`` as estimated).

    Correlations between points are unknown (one ensemble's members make all its points), so
    the noise variance of ``E`` is bounded by its all-correlated value ``2 S^2 + 4 B^2 S``; the
    interval is every ``B^2 >= 0`` with ``|E - S - B^2| <= z sqrt(2 S^2 + se_ss_var + 4 B^2 S)``,
    the roots of a quadratic. An error below the noise level counts as no excess (``E - S`` is
    clipped at 0 before solving), which keeps the upper bound at least the detectable size."""
    e, s_, v = (np.asarray(x, dtype=np.float64) for x in (err_ss, se_ss, se_ss_var))
    est = e - s_
    d = np.maximum(est, 0.0)
    q = 2 * s_**2 + v
    mid = d + 2 * z**2 * s_
    root = np.sqrt(np.maximum(mid**2 - d**2 + z**2 * q, 0.0))
    lo = np.where(d**2 > z**2 * q, mid - root, 0.0)
    return est, lo, mid + root


def se_ss_var(se_ss, draws) -> np.ndarray:
    """Bound on the variance of a sum of squared standard errors: each ``se^2`` rests on
    ``draws - 1`` degrees of freedom (variance ``2 se^4 / (draws - 1)`` for Gaussian draws), and
    the terms are at worst perfectly correlated, so the standard deviations add."""
    s_, d = np.asarray(se_ss, dtype=np.float64), np.asarray(draws, dtype=np.float64)
    return 2 * s_**2 / np.maximum(d - 1, 1)


# ----- the same with the blocks' jackknife (docs/theory.md §5.6) --------------------------
def _ensembles(frame: pd.DataFrame, blocks: dict[tuple, Blocks], suffix: str = ""):
    """``(blocks, row positions)`` of each ensemble in ``frame`` that has blocks."""
    keys = [k + suffix if k != "width" else k for k in ENSEMBLE]
    for key, rows in frame.groupby(keys, sort=False).indices.items():
        b = blocks.get((str(key[0]), int(key[1]), float(key[2])))
        if b is not None:
            yield b, rows


def _loo_column(n_rows: int) -> np.ndarray:
    return np.full(n_rows, None, dtype=object)


def _add_u_statistic(a: pd.DataFrame, frame: pd.DataFrame, codes: np.ndarray, blocks: dict[tuple, Blocks], name: str,
                     centred: Callable[[Blocks, np.ndarray], np.ndarray]) -> None:
    """Add ``{name}_jk`` and ``{name}_loo`` to the slice rows ``a``: for each ensemble of ``frame``
    with blocks, the blocks' estimate of the squared systematic part of ``centred(blocks, rows)``
    (its rows' block sums minus their target), each row of ``frame`` counted in slice ``codes``."""
    a[f"{name}_jk"], loos = np.nan, _loo_column(len(a))
    for b, rows in _ensembles(frame, blocks):
        local, inverse = np.unique(codes[rows], return_inverse=True)
        u, loo = jackknife.u_statistic(centred(b, rows), b.counts, inverse, len(local))
        a.loc[local, f"{name}_jk"] = u
        for i, r in enumerate(local):
            loos[r] = loo[i]
    a[f"{name}_loo"] = loos


def _pool_loo(frame: pd.DataFrame, by: list[str], col: str) -> list:
    """Per group of ``frame.groupby(by, sort=True)`` (in its order), the sum of the rows'
    leave-one-block-out arrays; None where a row has none or the rows' blocks differ."""
    codes = frame.groupby(by, sort=True).ngroup().to_numpy()
    n = int(codes.max()) + 1 if len(codes) else 0
    out: list = [0.0] * n
    for code, v in zip(codes, frame[col] if col in frame else [None] * len(frame)):
        if code < 0:
            continue
        cur = out[code]
        if cur is None or v is None or not hasattr(v, "__len__") or \
                (isinstance(cur, np.ndarray) and cur.size != len(v)):
            out[code] = None
        else:
            with np.errstate(invalid="ignore", over="ignore"):  # too few blocks give inf; unused then
                out[code] = cur + np.asarray(v, dtype=np.float64)
    return [v if isinstance(v, np.ndarray) else None for v in out]


def _with_jackknife(a: pd.DataFrame, est_col: str, loo_cols: list[str], fallback: tuple) -> tuple:
    """``(est, lo, hi, interval)``: the jackknife's where a row has enough blocks, else ``fallback``."""
    est, lo, hi = (np.array(x, dtype=np.float64, copy=True) for x in fallback)
    kind = np.full(len(a), "worst-case bound", dtype=object)
    if est_col not in a or not all(c in a for c in loo_cols):
        return est, lo, hi, kind
    for i, row in enumerate(zip(a[est_col], *(a[c] for c in loo_cols))):
        e, *loos = row
        if any(v is None or not hasattr(v, "__len__") for v in loos) or not np.isfinite(e):
            continue
        if len(loos) == 1:
            l_, h_, k = jackknife.one_sample(e, loos[0])
            label = f"jackknife, {int(k)} blocks"
        else:
            l_, h_, dof = jackknife.two_sample(e, *loos)
            label = f"jackknife, {len(loos[0])}+{len(loos[1])} blocks"
        if np.isfinite(h_):
            est[i], lo[i], hi[i], kind[i] = e, l_, h_, label
    return est, lo, hi, kind


def fit_exponent(widths, est, lo, hi, z: float = Z95) -> tuple[float, float, float]:
    """``(exponent, lo, hi)`` of ``sqrt(B^2)`` against width with its 95% interval.

    Weighted least squares of ``y = log sqrt(est)`` on ``log width`` over the widths whose
    ``B^2`` is resolved (``lo > 0``); each ``y`` has standard deviation ``(log hi - log lo) / (4 z)``
    (its interval on the log scale). With more than two widths the interval widens by the
    residual scatter when that exceeds the stated errors. NaN with fewer than two widths."""
    w, e, l, h = (np.asarray(x, dtype=np.float64) for x in (widths, est, lo, hi))
    ok = np.isfinite(e) & (e > 0) & np.isfinite(l) & (l > 0) & np.isfinite(h)
    if ok.sum() < 2 or len(np.unique(w[ok])) < 2:
        return float("nan"), float("nan"), float("nan")
    x, y = np.log(w[ok]), 0.5 * np.log(e[ok])
    sd = np.maximum((np.log(h[ok]) - np.log(l[ok])) / (4 * z), 1e-12)
    wt = 1 / sd**2
    xm = np.sum(wt * x) / wt.sum()
    sxx = np.sum(wt * (x - xm) ** 2)
    slope = float(np.sum(wt * (x - xm) * y) / sxx)
    se = np.sqrt(1 / sxx)
    if ok.sum() > 2:
        resid = y - (np.sum(wt * y) / wt.sum() + slope * (x - xm))
        se *= np.sqrt(max(1.0, float(np.sum(wt * resid**2)) / (ok.sum() - 2)))
    return slope, float(slope - z * se), float(slope + z * se)


# ----- agreement with theory -------------------------------------------------------------
def agreement(points: pd.DataFrame, blocks: Optional[dict[tuple, Blocks]] = None) -> pd.DataFrame:
    """One row per slice with an analytic prediction: z-score summaries, errors (with sums of
    squares for pooling), variance ratio; with ``blocks``, the jackknife's ``bias2_jk`` and
    ``bias2_loo``."""
    p = points[points["mu"].notna()]
    d = p["mean"] - p["mu"]
    tmp = p[SLICE + ["members", "draws"]].assign(
        err2=d**2,
        se2=p["se"] ** 2,
        mu2=p["mu"] ** 2,
        std_theory2=p["var_theory"],
        var=p["var"],
        var_theory=p["var_theory"],
        abs_z=p["z"].abs(),
        z_lt2=_lt(p["z"], 2),
        abs_z_theory=p["z_theory"].abs(),
        z_theory_lt2=_lt(p["z_theory"], 2),
    )
    g = tmp.groupby(SLICE, sort=True)
    a = g.agg(
        n_points=("err2", "size"),
        members=("members", "min"),
        draws=("draws", "min"),
        err_ss=("err2", "sum"),
        se_ss=("se2", "sum"),
        mu_ss=("mu2", "sum"),
        std_theory_ss=("std_theory2", lambda s: s.sum(min_count=1)),
        var_mean=("var", "mean"),
        var_theory_mean=("var_theory", "mean"),
        median_abs_z=("abs_z", "median"),
        frac_abs_z_lt2=("z_lt2", "mean"),
        median_abs_z_theory=("abs_z_theory", "median"),
        frac_abs_z_theory_lt2=("z_theory_lt2", "mean"),
    ).reset_index()
    a["time"] = a["lr"] * a["step"]
    a["median_abs_z_null"], a["frac_abs_z_lt2_null"] = t_null(a["draws"])
    a["var_ratio"] = a["var_mean"] / a["var_theory_mean"]
    if blocks and "block_row" in p:
        block_row, mu = p["block_row"].to_numpy(), p["mu"].to_numpy()
        _add_u_statistic(a, p, g.ngroup().to_numpy(), blocks, "bias2",
                         lambda b, rows: b.sums[block_row[rows]] - mu[rows, None] * b.counts[None, :])
    return _relative_errors(a)


def _relative_errors(a: pd.DataFrame) -> pd.DataFrame:
    """Add ``scale``, ``rel_err``, ``rel_noise``, ``rel_bias`` to rows with err_ss, se_ss, mu_ss, std_theory_ss."""
    n = a["n_points"].to_numpy(np.float64)
    at_init = (a["step"] == 0).to_numpy() if "step" in a else np.zeros(len(a), bool)
    std_ss = a["std_theory_ss"].to_numpy(np.float64)
    # where the theory has no variance (random augmentation) fall back to the ensemble's
    std_ss = np.where(np.isfinite(std_ss), std_ss, a["var_mean"].to_numpy(np.float64) * n)
    scale_ss = np.where(at_init, std_ss, a["mu_ss"].to_numpy(np.float64))
    a["scale"] = np.sqrt(scale_ss / n)
    a["scale_kind"] = np.where(at_init, "analytic std (mu = 0 at step 0)", "RMS(mu)")
    a["err_rms"] = np.sqrt(a["err_ss"] / n)
    a["se_rms"] = np.sqrt(a["se_ss"] / n)
    a["rel_err"] = _sqrt_ratio(a["err_ss"], scale_ss)
    a["rel_noise"] = _sqrt_ratio(a["se_ss"], scale_ss)
    a["rel_bias"] = _sqrt_ratio(np.maximum(a["err_ss"] - a["se_ss"], 0.0), scale_ss)
    a["bias2"], a["bias2_lo"], a["bias2_hi"], a["interval"] = _with_jackknife(
        a, "bias2_jk", ["bias2_loo"], excess_interval(a["err_ss"], a["se_ss"], se_ss_var(a["se_ss"], a["draws"])))
    a["rel_bias_lo"] = _sqrt_ratio(a["bias2_lo"], scale_ss)
    a["rel_bias_hi"] = _sqrt_ratio(a["bias2_hi"], scale_ss)
    return a


def with_draws(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with a ``draws`` column (tables written before antithetic pairs have only ``members``)."""
    return frame if "draws" in frame else frame.assign(draws=frame["members"])


def pooled_errors(agr: pd.DataFrame, by: list[str], steps: str = "after_init") -> pd.DataFrame:
    """Relative errors pooled over all steps > 0 (and whatever ``by`` leaves out); with
    ``steps="all"`` over the rows as given (``by`` may then hold ``step``)."""
    a = with_draws(agr)
    a = a[a["step"] > 0] if steps == "after_init" else a
    s = a.groupby(by, sort=True).agg(
        n_points=("n_points", "sum"),
        members=("members", "min"),
        draws=("draws", "min"),
        err_ss=("err_ss", "sum"),
        se_ss=("se_ss", "sum"),
        mu_ss=("mu_ss", "sum"),
        std_theory_ss=("std_theory_ss", "sum"),
        var_mean=("var_mean", "mean"),
        bias2_jk=("bias2_jk", "sum") if "bias2_jk" in a else ("err_ss", lambda x: np.nan),
    ).reset_index()
    s["bias2_loo"] = _pool_loo(a, by, "bias2_loo")
    return _relative_errors(s)


# ----- convergence in width --------------------------------------------------------------
def fit_slope(widths, values) -> float:
    """Least-squares slope of log(value) against log(width); NaN unless >= 2 widths with positive values."""
    w, v = np.asarray(widths, dtype=np.float64), np.asarray(values, dtype=np.float64)
    ok = np.isfinite(v) & (v > 0)
    if ok.sum() < 2 or len(np.unique(w[ok])) < 2:
        return float("nan")
    return float(np.polyfit(np.log(w[ok]), np.log(v[ok]), 1)[0])


def convergence(agr: pd.DataFrame) -> pd.DataFrame:
    """Slopes of the relative error against width per (model, lr, eval set) and step;
    rows with ``step`` missing pool all steps > 0."""
    cols = ["model", "lr", "eval_set", "step", "width", "rel_err", "rel_bias", "rel_noise", "bias2", "bias2_lo", "bias2_hi"]
    per_step = agr[cols]
    pooled = pooled_errors(agr, ["model", "lr", "eval_set", "width"]).assign(step=pd.NA)
    rows = []
    for frame in (per_step, pooled[per_step.columns]):
        for key, g in frame.groupby(["model", "lr", "eval_set", "step"], sort=True, dropna=False):
            g = g.sort_values("width")
            rows.append(dict(
                zip(["model", "lr", "eval_set", "step"], key),
                widths=" ".join(map(str, g["width"])),
                n_widths=len(g),
                slope_err=fit_slope(g["width"], g["rel_err"]),
                slope_bias=fit_slope(g["width"], g["rel_bias"]),
                rel_err_smallest=g["rel_err"].iloc[0],
                rel_err_largest=g["rel_err"].iloc[-1],
                rel_noise_largest=g["rel_noise"].iloc[-1],
                **dict(zip(["exponent_bias", "exponent_bias_lo", "exponent_bias_hi"],
                           fit_exponent(g["width"], g["bias2"], g["bias2_lo"], g["bias2_hi"]))),
            ))
    cols = ["model", "lr", "eval_set", "step", "widths", "n_widths", "slope_err", "slope_bias", "rel_err_smallest",
            "rel_err_largest", "rel_noise_largest", "exponent_bias", "exponent_bias_lo", "exponent_bias_hi"]
    out = pd.DataFrame(rows, columns=cols)
    out["step"] = out["step"].astype("Int64")
    return out


# ----- emergent invariance ---------------------------------------------------------------
def orbit_spread(points: pd.DataFrame, blocks: Optional[dict[tuple, Blocks]] = None) -> pd.DataFrame:
    """Orbit spread of each ensemble's mean (and of the analytic mean) per slice; with
    ``blocks``, the jackknife's ``spread2_jk`` and ``spread2_loo`` (each block's sums centred on
    their own orbit average are unbiased for the mean's systematic orbit deviation)."""
    orbit = SLICE + ["sample", "output"]
    g = points.groupby(orbit, sort=False)
    dev = points["mean"] - g["mean"].transform("mean")
    dev_mu = points["mu"] - g["mu"].transform("mean")
    # the noise in ``dev``: the draws' own orbit deviations d_j (members', or antithetic pair
    # means') vary by var_d, and dev is their mean, so its variance is var_d / draws
    # (correlations across the orbit included)
    m = points["draws"].to_numpy(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        var_d = np.maximum(points["orbit_devsq"].to_numpy(np.float64) - dev.to_numpy() ** 2, 0.0) * m / (m - 1)
    tmp = points[SLICE + ["group_element"]].assign(
        draws=points["draws"], dev2=dev**2, m2=points["mean"] ** 2, se2=points["se"] ** 2, dev_mu2=dev_mu**2, mu2=points["mu"] ** 2,
        dev_se2=var_d / m,
    )
    a = tmp.groupby(SLICE, sort=True).agg(
        order=("group_element", "nunique"),
        draws=("draws", "min"),
        n_points=("dev2", "size"),
        dev_ss=("dev2", "sum"),
        mean_ss=("m2", "sum"),
        se_ss=("se2", "sum"),
        dev_se_ss=("dev_se2", _sum_or_nan),
        dev_mu_ss=("dev_mu2", "sum"),
        mu_ss=("mu2", "sum"),
    ).reset_index()
    a["time"] = a["lr"] * a["step"]
    if blocks and "block_row" in points:
        codes = tmp.groupby(SLICE, sort=True).ngroup().to_numpy()
        orbit_codes = g.ngroup().to_numpy()
        block_row = points["block_row"].to_numpy()

        def off_orbit_mean(b: Blocks, rows: np.ndarray) -> np.ndarray:
            y = b.sums[block_row[rows]]
            orbit_local, orbit = np.unique(orbit_codes[rows], return_inverse=True)
            centre = np.zeros((len(orbit_local), y.shape[1]))
            np.add.at(centre, orbit, y)
            return y - (centre / np.bincount(orbit)[:, None])[orbit]

        _add_u_statistic(a, points, codes, blocks, "spread2", off_orbit_mean)
    return _spreads(a)


def _spreads(a: pd.DataFrame) -> pd.DataFrame:
    a["spread"] = _sqrt_ratio(a["dev_ss"], a["mean_ss"])
    # exact (from the members' own orbit deviations) where the parts have them; else the
    # level independent errors of one SE across the orbit would give (older results)
    noise_ss = a["dev_se_ss"].where(np.isfinite(a["dev_se_ss"]), (1 - 1 / a["order"]) * a["se_ss"])
    a["spread_noise"] = _sqrt_ratio(noise_ss, a["mean_ss"])
    a["theory_spread"] = _sqrt_ratio(a["dev_mu_ss"], a["mu_ss"])
    draws = a["draws"] if "draws" in a else pd.Series(np.nan, index=a.index)
    est, lo, hi, a["interval"] = _with_jackknife(a, "spread2_jk", ["spread2_loo"],
                                                 excess_interval(a["dev_ss"], noise_ss, se_ss_var(noise_ss, draws.fillna(2))))
    a["spread_sys"] = _sqrt_ratio(np.maximum(est, 0.0), a["mean_ss"])
    a["spread_sys_lo"] = _sqrt_ratio(lo, a["mean_ss"])
    a["spread_sys_hi"] = _sqrt_ratio(hi, a["mean_ss"])
    return a


def pooled_spread(spr: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    s = spr[spr["step"] > 0]
    s = s if "draws" in s else s.assign(draws=np.nan)
    s = s.groupby(by, sort=True).agg(
        order=("order", "max"),
        draws=("draws", "min"),
        n_points=("n_points", "sum"),
        dev_ss=("dev_ss", "sum"),
        mean_ss=("mean_ss", "sum"),
        se_ss=("se_ss", "sum"),
        dev_se_ss=("dev_se_ss", _sum_or_nan),
        dev_mu_ss=("dev_mu_ss", "sum"),
        mu_ss=("mu_ss", "sum"),
        spread2_jk=("spread2_jk", "sum") if "spread2_jk" in s else ("dev_ss", lambda x: np.nan),
    ).reset_index()
    s["spread2_loo"] = _pool_loo(spr[spr["step"] > 0], by, "spread2_loo")
    return _spreads(s)


# ----- pairs of models -------------------------------------------------------------------
def model_pairs(specs: list[ModelSpec]) -> list[dict]:
    """The comparisons docs/theory.md §6 predicts something about.

    - ``augmentation``: an augmented mlp/cnn (full_orbit or random) and each GCNN of the same
      group (mlp <-> group_mlp, cnn <-> gcnn, sphere_mlp <-> so3_gcnn; any support or basis).
    - ``gcnn``: two GCNNs of the same arch and group that differ in support or basis (the
      canonical one second when only one is canonical).
    - ``pairing``: the same model with independent members (first) and antithetic pairs
      (second): the means must agree (both are unbiased), and ``se2_ratio`` is the variance
      reduction of the pairs at equal member count.
    - ``control``: a model that is not augmented (mlp, cnn, sphere_mlp) and each GCNN of the
      same group: analytic means that differ, the positive control of the theorem. Whether a
      pair is a control is settled by its analytic means (``label_controls``).

    Both models of a pair are trained alike (same loss, optimizer and batch size).
    """
    pairs = []
    partner = {"mlp": "group_mlp", "cnn": "gcnn", "sphere_mlp": "so3_gcnn"}
    for a in specs:
        if a.arch in partner:
            for b in specs:
                if b.arch == partner[a.arch] and b.group == a.group and b.training == a.training:
                    pairs.append(dict(a=a.name, b=b.name, kind="augmentation" if a.augmentation != "none" else "control"))
    def same_but_pairing(a: ModelSpec, b: ModelSpec) -> bool:
        return a.model_copy(update={"name": b.name, "pairing": b.pairing}) == b

    eq = [s for s in specs if s.equivariant]
    for i, a in enumerate(eq):
        for b in eq[i + 1:]:
            if a.arch == b.arch and a.group == b.group and a.training == b.training and not same_but_pairing(a, b):
                first, second = (b, a) if a.basis == "canonical" and b.basis != "canonical" else (a, b)
                pairs.append(dict(a=first.name, b=second.name, kind="gcnn"))
    for a in specs:
        for b in specs:
            if a.pairing == "independent" and b.pairing == "antithetic" and same_but_pairing(a, b):
                pairs.append(dict(a=a.name, b=b.name, kind="pairing"))
    return pairs


def label_controls(gaps: pd.DataFrame) -> pd.DataFrame:
    """Settle each pair's kind by its analytic means (pooled over steps > 0, widths and eval sets):
    a pair other than ``pairing`` whose means differ by more than ``CONTROL_REL_GAP`` becomes a
    ``control``; a non-augmented candidate whose means do not (or have no analytic prediction)
    is dropped, as it tests nothing."""
    if not len(gaps):
        return gaps
    late = gaps[gaps["step"] > 0].groupby(["a", "b"], sort=False)
    rel = _sqrt_ratio(late["mu_diff_ss"].sum(min_count=1), late["mu_ss"].sum(min_count=1))
    rel = pd.Series(rel, index=late["mu_ss"].sum().index)
    pooled = pd.Series(list(zip(gaps["a"], gaps["b"]))).map(lambda k: rel.get(k, np.nan)).to_numpy()
    differ = np.nan_to_num(pooled, nan=0.0) > CONTROL_REL_GAP
    kind = np.where(differ & (gaps["kind"] != "pairing").to_numpy(), "control", gaps["kind"].to_numpy())
    out = gaps.assign(kind=kind)
    return out[~((gaps["kind"] == "control").to_numpy() & ~differ)].reset_index(drop=True)


def pair_gaps(points: pd.DataFrame, pairs: list[dict], blocks: Optional[dict[tuple, Blocks]] = None) -> pd.DataFrame:
    """Gap between the ensemble means of each pair, per (width, lr, step, eval set); widths
    matched. With ``blocks``, the jackknife's ``gap2_jk``, ``gap2_loo_a`` and ``gap2_loo_b``."""
    keys = [k for k in POINT_KEYS if k != "model"]
    with_blocks = bool(blocks) and "block_row" in points
    cols = keys + ["mean", "se", "mu", "members", "draws"] + (["block_row"] if with_blocks else [])
    by_model = {m: g[cols] for m, g in with_draws(points).groupby("model", sort=False)}
    frames = []
    for pr in pairs:
        if pr["a"] not in by_model or pr["b"] not in by_model:
            continue
        j = by_model[pr["a"]].merge(by_model[pr["b"]], on=keys, suffixes=("_a", "_b")).assign(lr_b=lambda f: f["lr"])
        if j.empty and pr["kind"] == "control":
            # a control needs no common training time, only analytic means that differ: a
            # non-augmented model may need its own (smaller) lr, so match it step for step
            # when each model has a single lr (the pair's rows carry the first model's lr)
            lrs_a, lrs_b = by_model[pr["a"]]["lr"].unique(), by_model[pr["b"]]["lr"].unique()
            if len(lrs_a) == 1 and len(lrs_b) == 1:
                on = [k for k in keys if k != "lr"]
                j = by_model[pr["a"]].merge(by_model[pr["b"]].rename(columns={"lr": "lr_b"}), on=on, suffixes=("_a", "_b"))
        if j.empty:
            continue
        diff = j["mean_a"] - j["mean_b"]
        comb2 = j["se_a"] ** 2 + j["se_b"] ** 2
        with np.errstate(divide="ignore", invalid="ignore"):
            dz = diff / np.sqrt(comb2)
        tmp = j[["width", "lr", "step", "eval_set"]].assign(
            members_a=j["members_a"], members_b=j["members_b"], draws_a=j["draws_a"], draws_b=j["draws_b"],
            diff2=diff**2, comb2=comb2, se_a2=j["se_a"] ** 2, se_b2=j["se_b"] ** 2, mu_diff2=(j["mu_a"] - j["mu_b"]) ** 2,
            mu_norm2=0.5 * (j["mu_a"] ** 2 + j["mu_b"] ** 2),
            abs_d=dz.abs(), d_lt3=_lt(dz, 3),
        )
        a = tmp.groupby(["width", "lr", "step", "eval_set"], sort=True).agg(
            members_a=("members_a", "min"), members_b=("members_b", "min"),
            draws_a=("draws_a", "min"), draws_b=("draws_b", "min"), n_points=("diff2", "size"),
            diff_ss=("diff2", "sum"), comb_ss=("comb2", "sum"), se_a_ss=("se_a2", "sum"), se_b_ss=("se_b2", "sum"),
            mu_diff_ss=("mu_diff2", _sum_or_nan),
            mu_ss=("mu_norm2", _sum_or_nan), median_abs_d=("abs_d", "median"), frac_abs_d_lt3=("d_lt3", "mean"),
        ).reset_index()
        if with_blocks:
            _gap_jackknife(a, j, tmp.groupby(["width", "lr", "step", "eval_set"], sort=True).ngroup().to_numpy(),
                           blocks, pr["a"], pr["b"])
        a.insert(0, "kind", pr["kind"])
        a.insert(0, "b", pr["b"])
        a.insert(0, "a", pr["a"])
        frames.append(a)
    if not frames:
        return pd.DataFrame(columns=["a", "b", "kind", "width", "lr", "step", "eval_set", "gap_se", "theory_gap_se",
                                     "rel_gap", "theory_rel_gap", "rel_gap_est", "rel_gap_lo", "rel_gap_hi"])
    out = pd.concat(frames, ignore_index=True)
    out["time"] = out["lr"] * out["step"]
    return _gaps(out)


def _gap_jackknife(a: pd.DataFrame, j: pd.DataFrame, codes: np.ndarray, blocks: dict[tuple, Blocks],
                   model_a: str, model_b: str) -> None:
    """Add ``gap2_jk``, ``gap2_loo_a``, ``gap2_loo_b`` to the pair's rows ``a`` from the matched
    points ``j`` (each point's row of ``a`` in ``codes``)."""
    a["gap2_jk"] = np.nan
    loo_a, loo_b = _loo_column(len(a)), _loo_column(len(a))
    for (width, lr, lr_b), rows in j.groupby(["width", "lr", "lr_b"], sort=False).indices.items():
        ba = blocks.get((model_a, int(width), float(lr)))
        bb = blocks.get((model_b, int(width), float(lr_b)))
        if ba is None or bb is None:
            continue
        sub = j.iloc[rows]
        local, inverse = np.unique(codes[rows], return_inverse=True)
        g, la, lb = jackknife.gap_statistic(ba.sums[sub["block_row_a"].to_numpy()], ba.counts,
                                            bb.sums[sub["block_row_b"].to_numpy()], bb.counts, inverse, len(local))
        a.loc[local, "gap2_jk"] = g
        for i, r in enumerate(local):
            loo_a[r], loo_b[r] = la[i], lb[i]
    a["gap2_loo_a"], a["gap2_loo_b"] = loo_a, loo_b


def _sum_or_nan(s: pd.Series) -> float:
    """The sum, NaN when any term is NaN (a model without an analytic prediction has no analytic gap)."""
    return float(s.sum(skipna=False))


def _gaps(a: pd.DataFrame) -> pd.DataFrame:
    a["gap_se"] = _sqrt_ratio(a["diff_ss"], a["comb_ss"])
    a["theory_gap_se"] = _sqrt_ratio(a["mu_diff_ss"], a["comb_ss"])
    a["rel_gap"] = _sqrt_ratio(a["diff_ss"], a["mu_ss"])
    a["theory_rel_gap"] = _sqrt_ratio(a["mu_diff_ss"], a["mu_ss"])
    # the two ensembles are independent: the variances of their summed squared SEs add
    draws_a = a["draws_a"] if "draws_a" in a else a["members_a"]
    draws_b = a["draws_b"] if "draws_b" in a else a["members_b"]
    v = se_ss_var(a["se_a_ss"], draws_a) + se_ss_var(a["se_b_ss"], draws_b)
    est, lo, hi, a["interval"] = _with_jackknife(a, "gap2_jk", ["gap2_loo_a", "gap2_loo_b"],
                                                 excess_interval(a["diff_ss"], a["comb_ss"], v))
    a["rel_gap_est"] = _sqrt_ratio(np.maximum(est, 0.0), a["mu_ss"])
    a["rel_gap_lo"] = _sqrt_ratio(lo, a["mu_ss"])
    a["rel_gap_hi"] = _sqrt_ratio(hi, a["mu_ss"])
    with np.errstate(divide="ignore", invalid="ignore"):
        a["se2_ratio"] = a["se_a_ss"] / a["se_b_ss"]  # the first model's squared standard errors over the second's
    return a


def pooled_gaps(gaps: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """Pair gaps pooled over all steps > 0 (and whatever ``by`` leaves out)."""
    g = gaps if "draws_a" in gaps else gaps.assign(draws_a=gaps["members_a"], draws_b=gaps["members_b"])
    s = g[g["step"] > 0].groupby(by, sort=True).agg(
        n_points=("n_points", "sum"), diff_ss=("diff_ss", "sum"), comb_ss=("comb_ss", "sum"),
        se_a_ss=("se_a_ss", "sum"), se_b_ss=("se_b_ss", "sum"), mu_diff_ss=("mu_diff_ss", _sum_or_nan), mu_ss=("mu_ss", _sum_or_nan),
        members_a=("members_a", "min"), members_b=("members_b", "min"),
        draws_a=("draws_a", "min"), draws_b=("draws_b", "min"),
        gap2_jk=("gap2_jk", "sum") if "gap2_jk" in g else ("diff_ss", lambda x: np.nan),
    ).reset_index()
    late = g[g["step"] > 0]
    s["gap2_loo_a"], s["gap2_loo_b"] = _pool_loo(late, by, "gap2_loo_a"), _pool_loo(late, by, "gap2_loo_b")
    return _gaps(s)


# ----- all tables --------------------------------------------------------------------------
def spec_table(specs: list[ModelSpec], widths: dict[str, list[int]]) -> pd.DataFrame:
    return pd.DataFrame([
        dict(model=s.name, arch=s.arch, group=s.group, depth=s.depth, support=s.support if s.equivariant else "",
             basis=s.basis if s.equivariant else "", augmentation=s.augmentation,
             loss=s.loss, optimizer=s.optimizer, batch_size=s.batch_size,
             widths=" ".join(map(str, widths[s.name])))
        for s in specs
    ]).astype({"batch_size": "Int64"})


def build_tables(stats: pd.DataFrame, theories: dict, specs: list[ModelSpec],
                 widths: Optional[dict[str, list[int]]] = None,
                 blocks: Optional[dict[tuple, Blocks]] = None) -> dict[str, pd.DataFrame]:
    """Every analysis table from the ensemble statistics, the analytic predictions and (where
    the parts store them) the blocks of independent draws."""
    points = add_theory(stats, theories)
    agr = agreement(points, blocks)
    widths = widths or {s.name: sorted(points.loc[points["model"] == s.name, "width"].unique()) for s in specs}
    return dict(
        models=spec_table(specs, widths),
        points=points,
        agreement=agr,
        convergence=convergence(agr),
        invariance=orbit_spread(points, blocks),
        pairs=label_controls(pair_gaps(points, model_pairs(specs), blocks)),
        theory=pd.DataFrame([
            dict(model=t.model, lr=t.lr, status=t.status, error=t.error or "",
                 seconds=round(t.seconds, 3), cached=t.cached, note=getattr(t, "note", ""))
            for t in theories.values()
        ], columns=["model", "lr", "status", "error", "seconds", "cached", "note"]),
    )
