"""The report: plots, a summary table and one verdict per question, as ``DIR/report/index.html``.

Every statement in a verdict is computed from the analysis tables (``analysis.compare``);
the thresholds that turn numbers into words are the constants below, and the page states
them. The page needs nothing but the PNG files beside it.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats as sps  # noqa: E402

from study.atomic import atomic_path  # noqa: E402

from . import compare  # noqa: E402

# A family agrees with theory when its median |z| is at most this multiple of the value
# expected from an ensemble drawn from the infinite-width process (Student's t, M - 1 dof).
Z_AGREE_FACTOR = 1.5
# The theorem holds at finite width when the pooled gap is within this many combined SE.
GAP_SE_LIMIT = 3.0
# Two ensembles resolve a difference of their means when the pooled gap exceeds this many combined SE.
RESOLVE_SE = 3.0
# Analytic means of a pair whose relative difference is below this are equal (float64
# kernels agree to ~1e-12; THEORY section 6 was checked to 1e-9), so the theorem applies.
THEOREM_RTOL = 1e-6
# Error within this factor of the ensemble's own noise level (rel_err / rel_noise) counts as at the noise floor.
NOISE_FLOOR_FACTOR = 1.5

PLOTS = ["trajectories", "error_vs_width", "gap_vs_width", "gap_vs_time", "orbit_spread", "z_scores", "variance_ratio"]


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not np.isfinite(x)) or x is pd.NA:
        return "n/a"
    if isinstance(x, (int, np.integer)):
        return str(int(x))
    x = float(x)
    if x == 0:
        return "0"
    if abs(x) >= 1e4 or abs(x) < 1e-3:
        return f"{x:.{digits - 1}e}"
    return f"{x:.{digits}g}"


def _pct(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.0f}%"


class Summary:
    """Numbers the plots and verdicts share, computed once from the tables."""

    def __init__(self, tables: dict[str, pd.DataFrame], resolved: dict):
        self.t = tables
        self.resolved = resolved
        self.models = tables["models"].set_index("model")
        self.model_order = list(tables["models"]["model"])
        self.eval_order = ["train"] + [e["name"] for e in resolved["config"]["data"]["eval"]]
        agr = tables["agreement"]
        self.agr = agr
        # every slice with ensemble predictions, with or without an analytic prediction (agreement
        # holds only the slices with one: models trained by SGD or on the cross-entropy have none)
        ens = tables["invariance"]
        self.lrs = sorted(ens["lr"].unique()) if len(ens) else []
        # Plots of one curve per model use that model's smallest lr (models may have their own lr).
        self.model_lr = ens.groupby("model")["lr"].min().to_dict() if len(ens) else {}
        # largest width each (model, lr) reached
        self.largest = ens.groupby(["model", "lr"])["width"].max().to_dict() if len(ens) else {}
        self.arch_of = dict(zip(tables["models"]["model"], tables["models"]["arch"]))
        pts = tables["points"]
        top = pts.groupby(["model", "lr"])["width"].transform("max")
        self.top_points = pts[(pts["width"] == top) & (pts["step"] > 0)]
        self.top_points = self.top_points.assign(arch=self.top_points["model"].map(self.arch_of))
        self.errors = compare.pooled_errors(agr, ["model", "lr", "width"]) if len(agr) else agr
        self.spread = compare.pooled_spread(ens, ["model", "lr", "width"]) if len(ens) else ens
        pairs = tables["pairs"]
        self.pairs = pairs
        self.pair_pooled = compare.pooled_gaps(pairs, ["a", "b", "kind", "lr", "eval_set", "width"]) if len(pairs) else pairs
        self.pair_all = compare.pooled_gaps(pairs, ["a", "b", "kind", "lr", "width"]) if len(pairs) else pairs

    def arch(self, model: str) -> str:
        return self.arch_of[model]

    def label(self, model: str) -> str:
        m = self.models.loc[model]
        extra = [m["augmentation"]] if m["augmentation"] != "none" else []
        if m["arch"] in ("gcnn", "group_mlp"):
            extra = [f"{m['support']} support", f"{m['basis']} basis"]
        if m["group"] == "SO3":  # the orbit axis holds a seeded sample of rotations
            extra.append("SO3")
        if m.get("optimizer", "gd") != "gd":
            extra.append(f"{m['optimizer']}, batch {m['batch_size']}")
        if m.get("loss", "mse") != "mse":
            extra.append(m["loss"])
        return f"{model} ({m['arch']}{', ' if extra else ''}{', '.join(extra)})"

    def eval_sets(self, frame: pd.DataFrame) -> list[str]:
        present = set(frame["eval_set"])
        return [e for e in self.eval_order if e in present]


# Architecture families, in the order verdicts and plots show them (SO3 models last).
FAMILIES = ["mlp", "cnn", "group_mlp", "gcnn", "sphere_mlp", "so3_gcnn"]


# ----- the summary table -------------------------------------------------------------------
def summary_table(s: Summary) -> pd.DataFrame:
    rows = []
    for (model, lr), width in sorted(s.largest.items(), key=lambda kv: (s.model_order.index(kv[0][0]), kv[0][1])):
        spec = s.models.loc[model]
        p = s.top_points[(s.top_points["model"] == model) & (s.top_points["lr"] == lr)]
        members = int(p["members"].min()) if len(p) else 0
        null_med, null_frac = compare.t_null_pooled(p["members"])
        e = s.errors[(s.errors["model"] == model) & (s.errors["lr"] == lr)].sort_values("width")
        et = e[e["width"] == width]
        sp = s.spread[(s.spread["model"] == model) & (s.spread["lr"] == lr) & (s.spread["width"] == width)]
        rows.append(dict(
            model=model, arch=spec["arch"], group=spec["group"], support=spec["support"], basis=spec["basis"],
            augmentation=spec["augmentation"], loss=spec.get("loss", "mse"), optimizer=spec.get("optimizer", "gd"),
            batch_size=spec.get("batch_size"), lr=lr, width=width, members=members,
            median_abs_z=p["z"].abs().median(), median_abs_z_null=null_med,
            frac_abs_z_lt2=(p["z"].abs() < 2)[p["z"].notna()].mean(), frac_abs_z_lt2_null=null_frac,
            median_abs_z_theory_se=p["z_theory"].abs().median(),
            rel_err=et["rel_err"].iloc[0] if len(et) else np.nan,
            rel_noise=et["rel_noise"].iloc[0] if len(et) else np.nan,
            slope_err=compare.fit_slope(e["width"], e["rel_err"]),
            slope_bias=compare.fit_slope(e["width"], e["rel_bias"]),
            orbit_spread=sp["spread"].iloc[0] if len(sp) else np.nan,
            spread_noise=sp["spread_noise"].iloc[0] if len(sp) else np.nan,
            var_ratio=p["var"].mean() / p["var_theory"].mean() if len(p) else np.nan,
        ))
    return pd.DataFrame(rows)


# ----- verdicts ----------------------------------------------------------------------------
def verdict_agreement(s: Summary) -> str:
    if not len(s.top_points):
        return "No ensemble has both finished units and an analytic prediction, so nothing can be compared."
    parts = []
    for fam in FAMILIES:
        p = s.top_points[s.top_points["arch"] == fam]
        p = p[p["z"].notna()]
        if not len(p):
            continue
        members = sorted(p["members"].unique())
        null_med, null_frac = compare.t_null_pooled(p["members"])
        med, frac = p["z"].abs().median(), (p["z"].abs() < 2).mean()
        ok = med <= Z_AGREE_FACTOR * null_med
        widths = sorted({s.largest[k] for k in s.largest if s.arch(k[0]) == fam})
        parts.append(
            f"{fam} (width {'/'.join(map(str, widths))}, {'/'.join(map(str, members))} members, {len(p)} points): median |z| = {_fmt(med)} "
            f"against {_fmt(null_med)} expected for an ensemble of the infinite-width process, |z| &lt; 2 for "
            f"{_pct(frac)} (expected {_pct(null_frac)}): "
            + ("consistent with theory" if ok else f"deviates from theory ({_fmt(med / null_med)} times the expected median |z|)")
        )
    if not parts:
        return ("No model has an analytic prediction (a model trained by SGD or on the cross-entropy has none), so "
                "nothing is compared with theory.")
    return ("At the largest width, over all logged steps after initialisation and all eval sets, "
            + "; ".join(parts) + f". (Consistent means median |z| at most {Z_AGREE_FACTOR} times the expected value.)")


def verdict_width(s: Summary, summary: pd.DataFrame) -> str:
    if not len(summary):
        return "No ensembles to compare."
    parts, falling, floor_all, n = [], 0, 0, 0
    for _, r in summary.iterrows():
        e = s.errors[(s.errors["model"] == r["model"]) & (s.errors["lr"] == r["lr"])].sort_values("width")
        if not len(e):
            parts.append(f"{r['model']}: no analytic prediction, no error")
            continue
        if len(e) < 2:
            parts.append(f"{r['model']}: one width only, no slope")
            continue
        n += 1
        falling += bool(r["slope_err"] < 0)
        at_floor = bool((e["rel_err"] <= NOISE_FLOOR_FACTOR * e["rel_noise"]).all())
        floor_all += at_floor
        parts.append(
            f"{r['model']}: {_fmt(e['rel_err'].iloc[0])} at width {e['width'].iloc[0]} to {_fmt(e['rel_err'].iloc[-1])} "
            f"at width {e['width'].iloc[-1]}, slope {_fmt(r['slope_err'])}, bias-corrected slope {_fmt(r['slope_bias'])} "
            f"(ensemble noise alone: {_fmt(e['rel_noise'].iloc[0])} to {_fmt(e['rel_noise'].iloc[-1])}"
            + ("; at the noise floor at every width, so the slope does not measure the finite-width bias)" if at_floor else ")")
        )
    return (f"Relative error of the ensemble mean pooled over all eval sets and steps after initialisation, against width "
            f"(log-log slope; -1 is the O(1/width) bias of THEORY section 2, about 0 an error set by the ensemble's own "
            f"noise; the bias-corrected slope uses sqrt(error^2 - SE^2), n/a where that is zero at some width): the error "
            f"falls for {falling} of {n} models, and for {floor_all} of {n} it is within {NOISE_FLOOR_FACTOR:g} times the "
            f"noise of an ensemble of this size at every width. " + "; ".join(parts) + ".")


def verdict_theorem(s: Summary) -> str:
    aug = s.pair_pooled[s.pair_pooled["kind"] == "augmentation"] if len(s.pair_pooled) else s.pair_pooled
    if not len(aug):
        return "The study has no augmented model with a GCNN counterpart of the same group and width; the theorem is not tested."
    groups = {True: [], False: [], None: []}  # analytic means equal (the theorem applies), not, or no theory
    counts = {True: [0, 0], False: [0, 0], None: [0, 0]}
    for (a, b, lr), g in aug.groupby(["a", "b", "lr"], sort=False):
        wmax = g["width"].max()
        top = g[g["width"] == wmax].set_index("eval_set")
        equal = None if top["theory_rel_gap"].isna().all() else bool(top["theory_rel_gap"].max() < THEOREM_RTOL)
        sets = [e for e in s.eval_order if e in top.index]
        within = [e for e in sets if top.loc[e, "gap_se"] <= GAP_SE_LIMIT]
        counts[equal][0] += len(within)
        counts[equal][1] += len(sets)
        all_w = s.pair_all[(s.pair_all["a"] == a) & (s.pair_all["b"] == b) & (s.pair_all["lr"] == lr)].sort_values("width")
        trend = ""
        if len(all_w) >= 2:
            g0, g1 = all_w["gap_se"].iloc[0], all_w["gap_se"].iloc[-1]
            trend = f"; pooled over sets {_fmt(g0)} SE at width {all_w['width'].iloc[0]} and {_fmt(g1)} at {all_w['width'].iloc[-1]}"
        t = s.pairs[(s.pairs["a"] == a) & (s.pairs["b"] == b) & (s.pairs["lr"] == lr) & (s.pairs["width"] == wmax) & (s.pairs["step"] > 0)]
        worst = t.loc[t["gap_se"].idxmax()] if len(t) else None
        groups[equal].append(
            f"{a} vs {b} at width {wmax}: gap "
            + ", ".join(f"{e} {_fmt(top.loc[e, 'gap_se'])}" for e in sets)
            + f" combined SE (analytic: relative difference {_fmt(top['theory_rel_gap'].max())}, "
            f"{_fmt(top['theory_gap_se'].max())} SE); within {GAP_SE_LIMIT:g} SE on {len(within)} of {len(sets)} eval sets{trend}"
            + (f"; largest at step {int(worst['step'])} on {worst['eval_set']} ({_fmt(worst['gap_se'])} SE)" if worst is not None else "")
        )
    text = ("Gap between the ensemble means of each augmented model and its GCNN counterparts, in units of their combined "
            "standard error, pooled over the steps after initialisation, at the largest common width. ")
    if groups[True]:
        h, n = counts[True]
        text += (f"Where the analytic means agree (relative difference below {THEOREM_RTOL:g}, so the theorem applies), the "
                 f"measured gap is within {GAP_SE_LIMIT:g} SE in {h} of {n} (pair, eval set) cases: "
                 + "; ".join(groups[True]) + ". ")
    elif groups[False]:
        text += "No pair has equal analytic means, so the theorem's hypothesis holds for none of them. "
    if groups[False]:
        h, n = counts[False]
        text += (f"Where the analytic means differ (a GCNN with another filter prior, or a CNN whose NTK is not jointly "
                 f"invariant), the gap is within {GAP_SE_LIMIT:g} SE in {h} of {n} cases: " + "; ".join(groups[False]) + ". ")
    if groups[None]:
        h, n = counts[None]
        text += (f"Pairs trained without an analytic counterpart (SGD or cross-entropy, both models alike; the theorem is "
                 f"proved for full-batch GD on the MSE): the gap is within {GAP_SE_LIMIT:g} SE in {h} of {n} cases: "
                 + "; ".join(groups[None]) + ".")
    return text


# An orbit spread below this is float32 rounding of an exactly invariant network.
ROUNDING_SPREAD = 1e-5


def verdict_invariance(s: Summary) -> str:
    if not len(s.spread):
        return "No ensembles."
    parts = []
    for model in s.model_order:
        spec = s.models.loc[model]
        for lr in s.lrs:
            sp = s.spread[(s.spread["model"] == model) & (s.spread["lr"] == lr)].sort_values("width")
            if not len(sp) or sp["order"].max() < 2:
                continue
            kind = ("augmented" if spec["augmentation"] != "none" else
                    "equivariant by construction" if spec["arch"] in ("gcnn", "group_mlp", "so3_gcnn") else "not augmented")
            first, last = sp.iloc[0], sp.iloc[-1]
            text = f"{model} ({kind}): {_fmt(first['spread'])} at width {first['width']}"
            if len(sp) >= 2:
                change = "shrinks" if last["spread"] < first["spread"] else "does not shrink"
                text += (f" to {_fmt(last['spread'])} at width {last['width']} ({change}, slope "
                         f"{_fmt(compare.fit_slope(sp['width'], sp['spread']))})")
            if last["spread"] < ROUNDING_SPREAD:
                text += ": invariant up to rounding"
            elif last["spread"] <= NOISE_FLOOR_FACTOR * last["spread_noise"]:
                text += (f": within the noise level {_fmt(last['spread_noise'])}, so no systematic "
                         f"non-invariance is resolved")
            else:
                systematic = np.sqrt(max(last["spread"] ** 2 - last["spread_noise"] ** 2, 0.0))
                text += (f": {_fmt(last['spread'] / last['spread_noise'])} times the noise level "
                         f"{_fmt(last['spread_noise'])}, a systematic non-invariance of about {_fmt(systematic)}")
            parts.append(text + f"; analytic mean's spread {_fmt(last['theory_spread'])}")
    return ("Orbit spread of each ensemble's mean (RMS over group elements of mean(L_g x) minus its orbit average, "
            "relative to the RMS of the mean), pooled over eval sets and steps after initialisation. The noise level is "
            "the spread a perfectly invariant ensemble of this size would show: the member-to-member variance of each "
            "member's own deviation from its orbit average, over M (correlations across the orbit included; the "
            "independent-error level where the results predate it). " + "; ".join(parts) + ".")


def verdict_escnn(s: Summary) -> str:
    pairs = s.pair_all
    if not len(pairs):
        return "The study has no pair of GCNNs of the same architecture and group."
    esc = pairs[pairs["kind"] == "gcnn"]
    esc = esc[(esc["a"].map(lambda m: s.models.loc[m, "basis"]) != esc["b"].map(lambda m: s.models.loc[m, "basis"]))]
    ctrl = pairs[(pairs["kind"] == "gcnn") & ~pairs.index.isin(esc.index)]
    parts = []
    for label, frame in (("escnn basis vs canonical", esc), ("canonical supports (control, equal at infinite width)", ctrl)):
        for (a, b, lr), g in frame.groupby(["a", "b", "lr"], sort=False):
            top = g.loc[g["width"].idxmax()]
            resolved = top["gap_se"] > RESOLVE_SE
            if not np.isfinite(top["theory_gap_se"]):  # no analytic prediction (SGD or cross-entropy)
                parts.append(f"{label}: {a} vs {b}: no analytic prediction; measured gap {_fmt(top['gap_se'])} SE at width "
                             f"{top['width']}, " + ("resolved" if resolved else "not resolved"))
                continue
            resolvable = top["theory_gap_se"] > RESOLVE_SE
            parts.append(
                f"{label}: {a} vs {b}: analytic relative difference of the means {_fmt(top['theory_rel_gap'])} "
                f"({_fmt(top['theory_gap_se'])} combined SE at width {top['width']}); measured gap {_fmt(top['gap_se'])} SE, "
                + ("resolved" if resolved else "not resolved")
                + ("" if resolved == resolvable else (" although theory predicts a resolvable difference" if resolvable else
                                                      " although theory predicts no resolvable difference (finite-width effects)"))
            )
    if not len(esc):
        parts.insert(0, "the study has no escnn-basis GCNN with a canonical counterpart")
    return (f"Pooled over eval sets and steps after initialisation, at the largest common width (resolved means a gap above "
            f"{RESOLVE_SE:g} combined SE): " + "; ".join(parts) + ".")


# ----- plots -------------------------------------------------------------------------------
def _time_axis(ax, lr: float) -> None:
    ax.set_xscale("symlog", linthresh=max(lr, 1e-12))
    ax.set_xlim(left=0)
    ax.set_xlabel("training time t = lr * step")


def plot_trajectories(s: Summary, path: Path) -> Optional[str]:
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
    ncol = min(3, len(models))
    nrow = -(-len(models) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.2 * nrow), squeeze=False, sharey=True)
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
        ax.set_title(f"{m}, width {w}, lr {lr:g}, M={int(d['members'].min())}", fontsize=9)
        _time_axis(ax, lr)
    for ax in axes.flat[len(models):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    axes.flat[0].set_ylabel(f"f(x), output {output}")
    fig.suptitle(f"Ensemble mean against theory: {ev} sample 0, identity orbit point", fontsize=10)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return (f"Ensemble mean (band: ± 2 standard errors of the ensemble) against the analytic mean (dashed; dotted: "
            f"± 2 analytic SE) over training time, for {ev} sample 0, output {output}, at each model's largest width.")


def _per_eval_axes(s: Summary, frame: pd.DataFrame, title: str):
    sets = s.eval_sets(frame)
    fig, axes = plt.subplots(1, len(sets), figsize=(4 * len(sets), 3.4), squeeze=False)
    for ax, ev in zip(axes[0], sets):
        ax.set_title(f"{title}: {ev}", fontsize=9)
    return fig, axes[0], sets


def plot_error_vs_width(s: Summary, path: Path) -> Optional[str]:
    conv = s.t["convergence"]
    pooled = compare.pooled_errors(s.agr, ["model", "lr", "eval_set", "width"])
    if not len(pooled) or pooled["width"].nunique() < 1:
        return None
    fig, axes, sets = _per_eval_axes(s, pooled, "relative error")
    for ax, ev in zip(axes, sets):
        for i, m in enumerate(s.model_order):
            for lr in s.lrs:
                d = pooled[(pooled["model"] == m) & (pooled["lr"] == lr) & (pooled["eval_set"] == ev)].sort_values("width")
                if not len(d):
                    continue
                c = conv[(conv["model"] == m) & (conv["lr"] == lr) & (conv["eval_set"] == ev) & conv["step"].isna()]
                slope = c["slope_err"].iloc[0] if len(c) else np.nan
                color = f"C{i % 10}"
                ax.loglog(d["width"], d["rel_err"], "o-", color=color, label=f"{m} (slope {_fmt(slope, 2)})")
                ax.loglog(d["width"], d["rel_noise"], ":", color=color, lw=0.8)
        ax.set_xlabel("width")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("||mean - mu|| / ||mu||, steps > 0")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return ("Relative error of the ensemble mean against width, pooled over the logged steps after initialisation, "
            "with the fitted log-log slope; dotted: the part the finite ensemble alone explains (RMS SE / RMS mu).")


def plot_gap_vs_width(s: Summary, path: Path) -> Optional[str]:
    g = s.pair_pooled
    if not len(g):
        return None
    fig, axes, sets = _per_eval_axes(s, g, "gap")
    for ax, ev in zip(axes, sets):
        for i, ((a, b, kind, lr), d) in enumerate(g[g["eval_set"] == ev].groupby(["a", "b", "kind", "lr"], sort=False)):
            d = d.sort_values("width")
            color = f"C{i % 10}"
            ax.plot(d["width"], d["gap_se"], "o-", color=color, label=f"{a} vs {b}")
            ax.plot(d["width"], d["theory_gap_se"], "x:", color=color, lw=0.8)
        ax.axhline(GAP_SE_LIMIT, color="grey", lw=0.8, ls="--")
        ax.set_xscale("log")
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlabel("width")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("gap / combined SE, steps > 0")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return (f"Gap between the ensemble means of each pair (augmented vs GCNN; GCNN vs GCNN) in units of the combined "
            f"standard error, pooled over steps after initialisation, against width; crosses: the analytic gap in the same "
            f"units; dashed: {GAP_SE_LIMIT:g} SE.")


def plot_gap_vs_time(s: Summary, path: Path) -> Optional[str]:
    p = s.pairs
    if not len(p):
        return None
    top = p.groupby(["a", "b", "lr"])["width"].transform("max")
    p = p[p["width"] == top]
    fig, axes, sets = _per_eval_axes(s, p, "gap at the largest width")
    for ax, ev in zip(axes, sets):
        for i, ((a, b, lr, w), d) in enumerate(p[p["eval_set"] == ev].groupby(["a", "b", "lr", "width"], sort=False)):
            d = d.sort_values("time")
            ax.plot(d["time"], d["gap_se"], "o-", color=f"C{i % 10}", label=f"{a} vs {b} (w {w})")
        ax.axhline(GAP_SE_LIMIT, color="grey", lw=0.8, ls="--")
        _time_axis(ax, s.lrs[0])
        ax.legend(fontsize=6)
    axes[0].set_ylabel("gap / combined SE")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return "Gap between the ensemble means of each pair, in combined SE, over training time at the largest common width."


def plot_orbit_spread(s: Summary, path: Path) -> Optional[str]:
    sp = compare.pooled_spread(s.t["invariance"], ["model", "lr", "eval_set", "width"])
    sp = sp[sp["order"] > 1]
    if not len(sp):
        return None
    fig, axes, sets = _per_eval_axes(s, sp, "orbit spread")
    for ax, ev in zip(axes, sets):
        for i, m in enumerate(s.model_order):
            d = sp[(sp["model"] == m) & (sp["eval_set"] == ev) & (sp["lr"] == s.model_lr.get(m))].sort_values("width")
            if not len(d):
                continue
            ax.loglog(d["width"], np.maximum(d["spread"], 1e-12), "o-", color=f"C{i % 10}", label=m)
            ax.loglog(d["width"], d["spread_noise"], ":", color=f"C{i % 10}", lw=0.8)
        ax.set_xlabel("width")
        ax.legend(fontsize=6)
    axes[0].set_ylabel("RMS orbit deviation / RMS mean")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return ("Orbit spread of each ensemble's mean against width, pooled over steps after initialisation (floored at "
            "1e-12 for display); dotted: the noise level, the spread a perfectly invariant ensemble of this size would show.")


def plot_z_scores(s: Summary, path: Path) -> Optional[str]:
    p = s.top_points[s.top_points["z"].notna() & np.isfinite(s.top_points["z"])]
    if not len(p):
        return None
    fams = [f for f in FAMILIES if (p["arch"] == f).any()]
    fig, axes = plt.subplots(1, len(fams), figsize=(4 * len(fams), 3.2), squeeze=False)
    for ax, fam in zip(axes[0], fams):
        z = p.loc[p["arch"] == fam, "z"].clip(-8, 8)
        members = int(p.loc[p["arch"] == fam, "members"].min())
        ax.hist(z, bins=np.linspace(-8, 8, 65), density=True, alpha=0.6, label=f"z ({len(z)} points)")
        grid = np.linspace(-8, 8, 400)
        ax.plot(grid, sps.t.pdf(grid, max(members - 1, 1)), "k-", lw=1, label=f"Student t, {members - 1} dof")
        ax.set_title(f"{fam}: z at the largest width", fontsize=9)
        ax.set_xlabel("(mean - mu) / SE   (clipped to ±8)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return ("Distribution of z = (ensemble mean - analytic mean) / ensemble SE at each model's largest width, all points "
            "after initialisation, by architecture family, against the Student t expected without finite-width bias.")


def plot_variance_ratio(s: Summary, path: Path) -> Optional[str]:
    a = s.agr[s.agr["var_ratio"].notna()]
    if not len(a):
        return None
    a = a[a["width"] == a.groupby(["model", "lr"])["width"].transform("max")]
    fig, axes, sets = _per_eval_axes(s, a, "ensemble var / analytic var")
    for ax, ev in zip(axes, sets):
        for i, m in enumerate(s.model_order):
            d = a[(a["model"] == m) & (a["eval_set"] == ev) & (a["lr"] == s.model_lr.get(m))].sort_values("time")
            if len(d):
                ax.plot(d["time"], d["var_ratio"], "o-", color=f"C{i % 10}", label=m)
        ax.axhline(1, color="grey", lw=0.8)
        ax.set_yscale("log")
        _time_axis(ax, s.lrs[0])
        ax.legend(fontsize=6)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return ("Mean ensemble variance over mean analytic variance per eval set over training time, at each model's largest "
            "width (THEORY section 6: augmented and GCNN ensembles share their mean, not their spread).")


# ----- the page ----------------------------------------------------------------------------
_CSS = """
body{font-family:sans-serif;max-width:1250px;margin:1em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:12px;margin:0.5em 0}
th,td{border:1px solid #bbb;padding:2px 6px;text-align:right}
th{background:#eee}
td:first-child,th:first-child{text-align:left}
img{max-width:100%;border:1px solid #ddd}
.verdict{background:#f6f8fa;border-left:4px solid #4a7;padding:0.5em 1em;margin:0.5em 0}
.scroll{overflow-x:auto}
.defs{font-size:13px;color:#444}
"""


def _table_html(df: pd.DataFrame, cls: str) -> str:
    return "<div class='scroll'>" + df.to_html(index=False, classes=cls, border=0, na_rep="n/a", float_format=lambda x: _fmt(x),
                      escape=True) + "</div>"


def write_report(out: Path, tables: dict[str, pd.DataFrame], resolved: dict) -> Path:
    out = Path(out)
    rdir = out / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    for name in PLOTS:  # a plot that has nothing to show this time must not survive from an earlier report
        (rdir / f"{name}.png").unlink(missing_ok=True)
    s = Summary(tables, resolved)
    summary = summary_table(s)
    with atomic_path(rdir / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)

    figures = []
    makers = dict(trajectories=plot_trajectories, error_vs_width=plot_error_vs_width, gap_vs_width=plot_gap_vs_width,
                  gap_vs_time=plot_gap_vs_time, orbit_spread=plot_orbit_spread, z_scores=plot_z_scores,
                  variance_ratio=plot_variance_ratio)
    for name in PLOTS:
        caption = makers[name](s, rdir / f"{name}.png")
        if caption:
            figures.append((f"{name}.png", caption))

    questions = [
        ("Does the finite ensemble agree with theory at the largest width?", lambda: verdict_agreement(s)),
        ("Does the error fall with width?", lambda: verdict_width(s, summary)),
        ("Does the augmentation theorem hold at finite width?", lambda: verdict_theorem(s)),
        ("Does invariance emerge in the augmented ensembles' mean?", lambda: verdict_invariance(s)),
        ("Does escnn's default basis differ from the canonical GCNN, and do the ensembles resolve it?",
         lambda: verdict_escnn(s)),
    ]
    nothing = "No ensemble has a finished unit yet, so nothing can be measured (see the units below)."
    verdicts = [(q, answer() if len(tables["points"]) else nothing) for q, answer in questions]
    units = tables["units"]
    bad = units[units["state"] != "done"][["unit_id", "model", "width", "lr", "member_start", "member_stop", "state",
                                           "steps_reached", "error"]]
    bad = bad.astype(object).where(bad.notna(), "")
    th = tables["theory"]
    th_bad = th[th["status"] != "ok"]
    cfg = resolved["config"]
    pair_top = s.pair_pooled
    if len(pair_top):
        wmax = pair_top.groupby(["a", "b", "lr"])["width"].transform("max")
        pair_top = pair_top[pair_top["width"] == wmax][["a", "b", "kind", "lr", "width", "eval_set", "members_a",
                                                        "members_b", "gap_se", "theory_gap_se", "rel_gap", "theory_rel_gap"]]
    conv = tables["convergence"]
    conv = conv[conv["step"].isna()].drop(columns=["step"])
    rank = {m: i for i, m in enumerate(s.model_order)}
    conv = conv.sort_values(["model", "lr", "eval_set"], key=lambda c: c.map(rank) if c.name == "model" else c)

    h = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>eqntk report: {html.escape(cfg['name'])}</title>",
         f"<style>{_CSS}</style></head><body>",
         f"<h1>eqntk report: {html.escape(cfg['name'])}</h1>",
         f"<p>{len(units)} units ({', '.join(f'{v} {k}' for k, v in units['state'].value_counts().items())}); "
         f"data digest {html.escape(resolved['data_digest'])}; group {html.escape(cfg['group'])}; "
         f"ensemble size {cfg['ensemble_size']}; lr {html.escape(str(cfg['lr']))}; {cfg['steps']} steps, logged at "
         f"{html.escape(str(resolved['log_steps']))}; eval sets: {html.escape(', '.join(s.eval_order))}.</p>",
         "<h2>Verdicts</h2>"]
    for q, text in verdicts:
        h.append(f"<div class='verdict'><b>{html.escape(q)}</b><p>{text}</p></div>")
    h.append("<h2>Summary</h2><p>Per model at its largest width (all eval sets, steps after initialisation); "
             "<a href='summary.csv'>summary.csv</a>.</p>")
    h.append(_table_html(summary, "summary"))
    h.append("<h2>Plots</h2>")
    for fname, caption in figures:
        h.append(f"<figure><img src='{fname}' alt='{html.escape(fname)}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    h.append("<h2>Convergence in width</h2><p>Slopes of log relative error against log width, pooled over steps after "
             "initialisation (per step: <code>analysis/convergence.csv</code>).</p>")
    h.append(_table_html(conv, "convergence"))
    if len(pair_top):
        h.append("<h2>Pairs at the largest common width</h2><p>Pooled over steps after initialisation; per step and "
                 "width: <code>analysis/pairs.csv</code>.</p>")
        h.append(_table_html(pair_top, "pairs"))
    h.append("<h2>Diverged, failed and pending units</h2>")
    if len(bad):
        h.append("<p>Diverged units are left out of every statistic (their predictions stop where they diverged); failed "
                 "and pending units have no predictions.</p>" + _table_html(bad, "units"))
    else:
        h.append("<p>None: every unit finished.</p>")
    if len(th_bad):
        h.append("<h3>Models without an analytic prediction</h3>" + _table_html(th_bad, "theory"))
    h.append(f"""<h2>Definitions</h2><div class='defs'><ul>
<li>Ensemble statistics over M members: mean, variance, SE = sqrt(var/M). z = (mean - mu)/SE with the ensemble's SE; for an
ensemble of the infinite-width process z follows Student's t with M-1 degrees of freedom (median |t| and P(|t|&lt;2) are the
"null" columns). The summary's <code>median_abs_z_theory_se</code> uses the analytic SE sqrt(var_theory/M) instead.</li>
<li>Relative error ||mean - mu|| / ||mu|| over the samples, orbit points and outputs of a slice. At step 0 mu = 0
identically, so there the scale is the RMS analytic standard deviation instead (the error is then about 1/sqrt(M)).
<code>rel_noise</code> = RMS(SE)/scale is what the finite ensemble alone explains.</li>
<li>Gap of a pair: RMS(mean_A - mean_B) / RMS(sqrt(SE_A^2 + SE_B^2)) over matching points (same width, step, eval set, sample,
orbit point, output); the analytic gap uses mu_A - mu_B.</li>
<li>Orbit spread: RMS over g of (mean(L_g x) - orbit average) / RMS(mean); the noise level is
sqrt(sum var(d_j) / M) / RMS(mean), with d_j a member's prediction minus its own orbit average.</li>
<li>Thresholds: agreement if median |z| &le; {Z_AGREE_FACTOR} x null; theorem holds if gap &le; {GAP_SE_LIMIT:g} SE;
resolved if gap &gt; {RESOLVE_SE:g} SE; noise floor if rel_err &le; {NOISE_FLOOR_FACTOR} x rel_noise.</li>
<li>Tables: <code>analysis/*.parquet</code> and <code>.csv</code> (the per-point table <code>points</code> as Parquet only).</li>
</ul></div>""")
    h.append("</body></html>")
    page = rdir / "index.html"
    with atomic_path(page) as tmp:
        tmp.write_text("\n".join(h))
    return page
