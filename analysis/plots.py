"""The report's figures: one PNG per plot, each made by ``figure`` (panels, shared styling,
atomic save, close). A plot returns its caption, or None when it has nothing to show."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence

import matplotlib

matplotlib.use("Agg")  # files only, no display; before pyplot loads
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from scipy import stats as sps  # noqa: E402

from study.atomic import atomic_path  # noqa: E402

from . import compare, invariance  # noqa: E402
from .summary import FAMILIES, Summary, fmt  # noqa: E402
from .verdicts import THEOREM_FAMILY  # noqa: E402

# Small panel titles and legends, so that a row of panels fits the page's width.
REPORT_STYLE = {"axes.titlesize": 9, "legend.fontsize": 6}


@contextmanager
def figure(path: Path, n_panels: int, *, ncols: Optional[int] = None, panel: tuple[float, float] = (4, 3.4),
           titles: Sequence[str] = (), dpi: int = 90, style: Optional[dict] = None,
           **subplots) -> Iterator[tuple[plt.Figure, np.ndarray]]:
    """``with figure(path, n) as (fig, axes):`` draw into ``axes`` (rows x columns, ``ncols``
    per row, default all in one row; ``panel`` inches each); panels past ``n_panels`` are
    blank. ``titles`` name the panels in row order. On leaving, the figure is laid out and
    saved to ``path`` at ``dpi`` atomically, then closed (also when drawing fails).
    ``style`` (rcParams, default ``REPORT_STYLE``) applies to everything drawn inside."""
    ncols = ncols or n_panels
    nrows = -(-n_panels // ncols)
    with plt.rc_context(REPORT_STYLE if style is None else style):
        fig, axes = plt.subplots(nrows, ncols, figsize=(panel[0] * ncols, panel[1] * nrows), squeeze=False, **subplots)
        try:
            for ax, title in zip(axes.flat, titles):
                ax.set_title(title)
            for ax in axes.flat[n_panels:]:
                ax.axis("off")
            yield fig, axes
            fig.tight_layout()
            with atomic_path(path) as tmp:
                fig.savefig(tmp, dpi=dpi)
        finally:
            plt.close(fig)


def _time_axis(ax, lr: float) -> None:
    ax.set_xscale("symlog", linthresh=max(lr, 1e-12))
    ax.set_xlim(left=0)
    ax.set_xlabel("training time t = lr * step")


def trajectories(s: Summary, path: Path) -> Optional[str]:
    pts = s.t["points"]
    if not len(pts) or pts["mu"].isna().all():
        return None
    sets = s.eval_sets(pts)
    ev = next((e for e in sets if e != "train"), sets[0])
    first = next(m for m in s.model_order if ((pts["model"] == m) & pts["mu"].notna()).any())
    ref = pts[(pts["model"] == first) & (pts["lr"] == s.model_lr[first]) & (pts["eval_set"] == ev) & (pts["sample"] == 0)
              & (pts["group_element"] == 0) & (pts["width"] == s.largest[(first, s.model_lr[first])])]
    last = ref[ref["step"] == ref["step"].max()]
    if not len(last):
        return None
    output = int(last.loc[last["mu"].abs().idxmax(), "output"])
    models = [m for m in s.model_order if (m, s.model_lr.get(m)) in s.largest]
    with figure(path, len(models), ncols=min(3, len(models)), panel=(4.2, 3.2), sharey=True) as (fig, axes):
        for ax, m in zip(axes.flat, models):
            lr = s.model_lr[m]
            w = s.largest[(m, lr)]
            d = pts[(pts["model"] == m) & (pts["lr"] == lr) & (pts["width"] == w) & (pts["eval_set"] == ev)
                    & (pts["sample"] == 0) & (pts["group_element"] == 0) & (pts["output"] == output)].sort_values("time")
            t = d["time"].to_numpy()
            ax.fill_between(t, d["mean"] - 2 * d["se"], d["mean"] + 2 * d["se"], alpha=0.3, label="ensemble mean ± 2 SE")
            ax.plot(t, d["mean"], "o-", ms=3)
            ax.plot(t, d["mu"], "k--", label="analytic mean")
            if d["var_theory"].notna().any():
                band = 2 * np.sqrt(d["var_theory"] / d["members"])
                ax.plot(t, d["mu"] - band, "k:", lw=0.8)
                ax.plot(t, d["mu"] + band, "k:", lw=0.8, label="analytic ± 2 SE")
            ax.set_title(f"{m}, width {w}, lr {lr:g}, M={int(d['members'].min())}")
            _time_axis(ax, lr)
        axes.flat[0].legend(fontsize=7)
        axes.flat[0].set_ylabel(f"f(x), output {output}")
        fig.suptitle(f"Ensemble mean against theory: {ev} sample 0, identity orbit point", fontsize=10)
    return (f"Ensemble mean (band: ± 2 standard errors of the ensemble) against the analytic mean (dashed; dotted: "
            f"± 2 analytic SE) over training time, for {ev} sample 0, output {output}, at each model's largest width.")


def error_vs_width(s: Summary, path: Path) -> Optional[str]:
    conv = s.t["convergence"]
    pooled = compare.pooled_errors(s.agr, ["model", "lr", "eval_set", "width"])
    if not len(pooled) or pooled["width"].nunique() < 1:
        return None
    sets = s.eval_sets(pooled)
    with figure(path, len(sets), titles=[f"relative error: {ev}" for ev in sets]) as (fig, axes):
        for ax, ev in zip(axes.flat, sets):
            for i, m in enumerate(s.model_order):
                for lr in s.lrs:
                    d = pooled[(pooled["model"] == m) & (pooled["lr"] == lr) & (pooled["eval_set"] == ev)].sort_values("width")
                    if not len(d):
                        continue
                    c = conv[(conv["model"] == m) & (conv["lr"] == lr) & (conv["eval_set"] == ev) & conv["step"].isna()]
                    slope = c["slope_err"].iloc[0] if len(c) else np.nan
                    color = f"C{i % 10}"
                    ax.loglog(d["width"], d["rel_err"], "o-", color=color, label=f"{m} (slope {fmt(slope, 2)})")
                    ax.loglog(d["width"], d["rel_noise"], ":", color=color, lw=0.8)
            ax.set_xlabel("width")
            ax.legend()
        axes[0, 0].set_ylabel("||mean - mu|| / ||mu||, steps > 0")
    return ("Relative error of the ensemble mean against width, pooled over the logged steps after initialisation, "
            "with the fitted log-log slope; dotted: the part the finite ensemble alone explains (RMS SE / RMS mu).")


def gap_vs_width(s: Summary, path: Path) -> Optional[str]:
    g = s.pair_all[s.pair_all["kind"].isin(["augmentation", "control"])] if len(s.pair_all) else s.pair_all
    if not len(g):
        return None
    g = g.assign(family=g["a"].map(lambda m: THEOREM_FAMILY.get(s.arch(m), s.arch(m))))
    fams = list(dict.fromkeys(g["family"]))
    with figure(path, len(fams), panel=(5.5, 4), titles=[f"relative gap against width: {f} family" for f in fams]) as (fig, axes):
        for ax, fam in zip(axes.flat, fams):
            est = g.loc[g["family"] == fam, "rel_gap_est"]
            floor = max(float(est[est > 0].min()) / 10 if (est > 0).any() else 1e-3, 1e-6)  # where a gap is 0
            for i, ((a, b, kind, lr), d) in enumerate(g[g["family"] == fam].groupby(["a", "b", "kind", "lr"], sort=False)):
                d = d.sort_values("width")
                color = f"C{i % 10}"
                y = np.maximum(d["rel_gap_est"].to_numpy(), floor)
                err = [y - np.maximum(d["rel_gap_lo"].to_numpy(), floor), np.maximum(d["rel_gap_hi"].to_numpy() - y, 0)]
                ax.errorbar(d["width"], y, yerr=err, fmt="o-" if kind == "augmentation" else "o--", ms=3, capsize=2,
                            color=color, label=f"{a} vs {b} ({kind})")
                if np.isfinite(d["theory_rel_gap"]).any() and d["theory_rel_gap"].max() > 1e-6:
                    ax.plot(d["width"], d["theory_rel_gap"], "x:", color=color, lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(bottom=floor / 2)
            ax.set_xlabel("width")
            ax.legend(fontsize=5)
        axes[0, 0].set_ylabel("||E mean_A - E mean_B|| / ||mu||, steps > 0")
    return ("Relative gap between the ensemble means of each pair (solid: augmented vs GCNN, 0 in theory; dashed: positive "
            "controls and GCNN pairs), noise removed, with its 95% interval, pooled over eval sets and steps after "
            "initialisation, against width (a gap of 0 drawn at a tenth of the smallest nonzero one); crosses: the analytic "
            "relative gap where it is not 0.")


def gap_vs_time(s: Summary, path: Path) -> Optional[str]:
    p = s.pairs[(s.pairs["kind"].isin(["augmentation", "control"])) & (s.pairs["step"] > 0)] if len(s.pairs) else s.pairs
    if not len(p):
        return None
    p = p[p["width"] == p.groupby(["a", "b", "lr"])["width"].transform("max")]
    # one panel per family of the theorem (MLP, conv, SO3), every eval set pooled at each step
    steps = compare.pooled_gaps(p, ["a", "b", "kind", "lr", "width", "step"])
    steps["family"] = steps["a"].map(lambda m: THEOREM_FAMILY.get(s.arch(m), s.arch(m)))
    steps["time"] = steps["lr"] * steps["step"]
    fams = list(dict.fromkeys(steps["family"]))
    with figure(path, len(fams), panel=(5.5, 4), titles=[f"relative gap at the largest width: {f} family" for f in fams]) as (fig, axes):
        for ax, fam in zip(axes.flat, fams):
            groups = steps[steps["family"] == fam].groupby(["a", "b", "kind", "lr", "width"], sort=False)
            for i, ((a, b, kind, lr, w), d) in enumerate(groups):
                d = d.sort_values("time")
                color, ls = f"C{i % 10}", "-" if kind == "augmentation" else "--"
                ax.plot(d["time"], d["rel_gap_est"], "o" + ls, color=color, ms=3,
                        label=f"{a} vs {b} (w {w}{', control' if kind == 'control' else ''})")
                ax.fill_between(d["time"], d["rel_gap_lo"], d["rel_gap_hi"], color=color, alpha=0.08)
            ax.set_yscale("symlog", linthresh=1e-3)
            _time_axis(ax, float(steps.loc[steps["family"] == fam, "lr"].min()))
            ax.legend()
        axes[0, 0].set_ylabel("||E mean_A - E mean_B|| / ||mu||, eval sets pooled")
    return ("Relative gap between the ensemble means of each augmented model and its GCNN counterpart (solid; 0 in theory) "
            "and of the positive controls (dashed; analytic means apart), noise removed, with its 95% interval (band), "
            "over training time at the largest common width, all eval sets pooled.")


def _manifold_label(m: str) -> str:
    return "on the data manifold" if m == "on" else "off the data manifold"


def bias_vs_time(s: Summary, path: Path) -> Optional[str]:
    a = s.agr[s.agr["step"] > 0] if len(s.agr) else s.agr
    if not len(a):
        return None
    a = a[a["width"] == a.groupby(["model", "lr"])["width"].transform("max")]
    sets = s.eval_sets(a)
    with figure(path, len(sets), titles=[f"bias of the mean at the largest width: {ev}" for ev in sets]) as (fig, axes):
        for ax, ev in zip(axes.flat, sets):
            for i, m in enumerate(s.model_order):
                d = a[(a["model"] == m) & (a["eval_set"] == ev) & (a["lr"] == s.model_lr.get(m))].sort_values("time")
                if not len(d):
                    continue
                color = f"C{i % 10}"
                ax.plot(d["time"], d["rel_bias"], "o-", ms=3, color=color, label=f"{m} (w {int(d['width'].iloc[0])})")
                ax.fill_between(d["time"], d["rel_bias_lo"], d["rel_bias_hi"], color=color, alpha=0.15)
            ax.set_yscale("symlog", linthresh=1e-3)
            _time_axis(ax, s.lrs[0])
            ax.legend()
        axes[0, 0].set_ylabel("||E mean - mu|| / ||mu|| (noise removed)")
    return ("Finite-width bias of the ensemble mean with the ensemble's noise removed, relative to RMS(mu), at each "
            "logged step after initialisation and each model's largest width, with its 95% interval (band; docs/theory.md §5.4).")


def bias_vs_width(s: Summary, path: Path) -> Optional[str]:
    if not len(s.agr):
        return None
    a = s.agr.assign(manifold=s.agr["eval_set"].map(s.manifold).fillna("off"))
    pooled = compare.pooled_errors(a, ["model", "lr", "manifold", "width"])
    fits = s.width_fit[s.width_fit["step"].isna()]
    mans = [m for m in ("on", "off") if (pooled["manifold"] == m).any()]
    if not mans:
        return None
    with figure(path, len(mans), titles=[f"bias against width, {_manifold_label(m)}" for m in mans]) as (fig, axes):
        for ax, man in zip(axes.flat, mans):
            low = 1.0
            for i, m in enumerate(s.model_order):
                d = pooled[(pooled["model"] == m) & (pooled["manifold"] == man) & (pooled["lr"] == s.model_lr.get(m))].sort_values("width")
                if not len(d):
                    continue
                f = fits[(fits["model"] == m) & (fits["manifold"] == man) & (fits["lr"] == s.model_lr.get(m))]
                label = m + (f" (exponent {fmt(f['exponent'].iloc[0], 2)} [{fmt(f['exponent_lo'].iloc[0], 2)}, "
                             f"{fmt(f['exponent_hi'].iloc[0], 2)}])" if len(f) and np.isfinite(f["exponent"].iloc[0]) else "")
                y = np.maximum(d["rel_bias"].to_numpy(), 1e-6)
                err = [y - np.maximum(d["rel_bias_lo"].to_numpy(), 1e-6), np.maximum(d["rel_bias_hi"].to_numpy() - y, 0)]
                ax.errorbar(d["width"], y, yerr=err, fmt="o-", ms=3, capsize=2, color=f"C{i % 10}", label=label)
                low = min(low, float(y.min()))
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(bottom=max(low / 10, 1e-6))  # an interval reaching 0 runs off the bottom
            ax.set_xlabel("width")
            ax.legend()
        axes[0, 0].set_ylabel("||E mean - mu|| / ||mu||, steps > 0")
    return ("Finite-width bias of the ensemble mean (noise removed, 95% interval; floored at 1e-6 for display) against width, "
            "pooled over steps after initialisation, on the data manifold (training inputs, held-out digits) and off it, "
            "with the fitted exponent and its 95% interval (theory: -1).")


def orbit_spread(s: Summary, path: Path) -> Optional[str]:
    sp = compare.pooled_spread(s.t["invariance"], ["model", "lr", "eval_set", "width"])
    sp = sp[sp["order"] > 1]
    if not len(sp):
        return None
    sets = s.eval_sets(sp)
    with figure(path, len(sets), titles=[f"orbit spread: {ev}" for ev in sets]) as (fig, axes):
        for ax, ev in zip(axes.flat, sets):
            for i, m in enumerate(s.model_order):
                d = sp[(sp["model"] == m) & (sp["eval_set"] == ev) & (sp["lr"] == s.model_lr.get(m))].sort_values("width")
                if not len(d):
                    continue
                ax.loglog(d["width"], np.maximum(d["spread"], 1e-12), "o-", color=f"C{i % 10}", label=m)
                ax.loglog(d["width"], d["spread_noise"], ":", color=f"C{i % 10}", lw=0.8)
            ax.set_xlabel("width")
            ax.legend()
        axes[0, 0].set_ylabel("RMS orbit deviation / RMS mean")
    return ("Orbit spread of each ensemble's mean against width, pooled over steps after initialisation (floored at "
            "1e-12 for display); dotted: the noise level, the spread a perfectly invariant ensemble of this size would show.")


def finite_invariance(s: Summary, path: Path) -> Optional[str]:
    w, _ = invariance.tables(s)
    w = w[w["step"].isna()] if len(w) else w
    if not len(w) or w["width"].nunique() < 2:
        return None
    mans = [m for m in ("on", "off") if (w["manifold"] == m).any()]
    with figure(path, len(mans), panel=(5, 3.8), titles=[f"systematic orbit spread, {_manifold_label(m)}" for m in mans]) as (fig, axes):
        for ax, man in zip(axes.flat, mans):
            d = w[w["manifold"] == man]
            for i, ((m, lr), g) in enumerate(d.groupby(["model", "lr"], sort=False)):
                g = g.sort_values("width")
                color = f"C{i % 10}"
                support = g["filter_support"].iloc[0]
                label = m + (f" ({support}, {g['tap_variance'].iloc[0]})" if support else "")
                # resolved (interval above 0): the estimate and its interval; else its upper end only
                ok = (g["sys_lo"] > 0).to_numpy()
                y = np.where(ok, g["sys"], g["sys_hi"])
                ax.plot(g["width"], y, "-", color=color, lw=0.8, alpha=0.6)
                r = g[ok]
                ax.errorbar(r["width"], r["sys"], yerr=[r["sys"] - r["sys_lo"], r["sys_hi"] - r["sys"]], fmt="o", ms=3,
                            capsize=2, color=color, label=label if ok.any() else None)
                ax.plot(g.loc[~ok, "width"], g.loc[~ok, "sys_hi"], "v", ms=5, color=color,
                        label=None if ok.any() else label)
                if g["analytic"].iloc[0] > 1e-9:
                    ax.axhline(g["analytic"].iloc[0], color=color, ls="--", lw=0.8)
                ax.plot(g["width"], g["noise"], ":", color=color, lw=0.8)
            ax.set_xscale("log")
            ax.set_yscale("log")
            widths = sorted(d["width"].unique())
            ax.set_xticks(widths, [str(int(x)) for x in widths])
            ax.minorticks_off()
            ax.set_xlabel("width")
            ax.legend()
        axes[0, 0].set_ylabel("RMS orbit deviation / RMS(mu), steps > 0")
    return ("Systematic orbit spread of each augmented ensemble's mean (noise removed) against width, pooled over steps "
            "after initialisation, relative to the analytic mean's RMS: dots with their 95% interval where it excludes 0, "
            "else a triangle at its upper end; dashed: the analytic mean's own orbit spread (0 for a jointly invariant "
            "kernel, docs/theory.md §3.4); dotted: the ensemble's noise level.")


def z_scores(s: Summary, path: Path) -> Optional[str]:
    p = s.top_points[s.top_points["z"].notna() & np.isfinite(s.top_points["z"])]
    if not len(p):
        return None
    fams = [f for f in FAMILIES if (p["arch"] == f).any()]
    with figure(path, len(fams), panel=(4, 3.2), titles=[f"{fam}: z at the largest width" for fam in fams]) as (fig, axes):
        for ax, fam in zip(axes.flat, fams):
            z = p.loc[p["arch"] == fam, "z"].clip(-8, 8)
            draws = int(p.loc[p["arch"] == fam, "draws"].min())
            ax.hist(z, bins=np.linspace(-8, 8, 65), density=True, alpha=0.6, label=f"z ({len(z)} points)")
            grid = np.linspace(-8, 8, 400)
            ax.plot(grid, sps.t.pdf(grid, max(draws - 1, 1)), "k-", lw=1, label=f"Student t, {draws - 1} dof")
            ax.set_xlabel("(mean - mu) / SE   (clipped to ±8)")
            ax.legend()
    return ("Distribution of z = (ensemble mean - analytic mean) / ensemble SE at each model's largest width, all points "
            "after initialisation, by architecture family, against the Student t expected without finite-width bias.")


def variance_ratio(s: Summary, path: Path) -> Optional[str]:
    a = s.agr[s.agr["var_ratio"].notna()]
    if not len(a):
        return None
    a = a[a["width"] == a.groupby(["model", "lr"])["width"].transform("max")]
    sets = s.eval_sets(a)
    with figure(path, len(sets), titles=[f"ensemble var / analytic var: {ev}" for ev in sets]) as (fig, axes):
        for ax, ev in zip(axes.flat, sets):
            for i, m in enumerate(s.model_order):
                d = a[(a["model"] == m) & (a["eval_set"] == ev) & (a["lr"] == s.model_lr.get(m))].sort_values("time")
                if len(d):
                    ax.plot(d["time"], d["var_ratio"], "o-", color=f"C{i % 10}", label=m)
            ax.axhline(1, color="grey", lw=0.8)
            ax.set_yscale("log")
            _time_axis(ax, s.lrs[0])
            ax.legend()
    return ("Mean ensemble variance over mean analytic variance per eval set over training time, at each model's largest "
            "width (docs/theory.md §6: augmented and GCNN ensembles share their mean, not their spread).")


# The report's plots in page order; each writes ``<name>.png``.
PLOTS = dict(trajectories=trajectories, bias_vs_time=bias_vs_time, bias_vs_width=bias_vs_width,
             error_vs_width=error_vs_width, gap_vs_width=gap_vs_width, gap_vs_time=gap_vs_time,
             orbit_spread=orbit_spread, finite_invariance=finite_invariance, z_scores=z_scores,
             variance_ratio=variance_ratio)
