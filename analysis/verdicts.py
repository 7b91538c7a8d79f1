"""One verdict per question of the report, in words computed from the ``Summary``.

The thresholds that turn numbers into words are the constants below; the page states them.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from study.spec import EQUIVARIANT_ARCHS

from . import compare
from .summary import FAMILIES, Summary, fmt, pct

# A family agrees with theory when its median |z| is at most this multiple of the value
# expected from an ensemble drawn from the infinite-width process (Student's t, M - 1 dof).
Z_AGREE_FACTOR = 1.5
# The theorem holds at finite width when the pooled gap is within this many combined SE.
GAP_SE_LIMIT = 3.0
# Two ensembles resolve a difference of their means when the pooled gap exceeds this many combined SE.
RESOLVE_SE = 3.0
# Analytic means of a pair whose relative difference is below this are equal (float64
# kernels agree to ~1e-12; docs/theory.md §6 was checked to 1e-9), so the theorem applies.
THEOREM_RTOL = 1e-6
# Error within this factor of the ensemble's own noise level (rel_err / rel_noise) counts as at the noise floor.
NOISE_FLOOR_FACTOR = 1.5
# An orbit spread below this is float32 rounding of an exactly invariant network.
ROUNDING_SPREAD = 1e-5


def agreement(s: Summary) -> str:
    """Does the finite ensemble agree with theory at the largest width? Per family: median |z| against the null."""
    if not len(s.top_points):
        return "No ensemble has both finished units and an analytic prediction, so nothing can be compared."
    parts = []
    for fam in FAMILIES:
        p = s.top_points[s.top_points["arch"] == fam]
        p = p[p["z"].notna()]
        if not len(p):
            continue
        members = sorted(p["members"].unique())
        null_med, null_frac = compare.t_null_pooled(p["draws"])
        med, frac = p["z"].abs().median(), (p["z"].abs() < 2).mean()
        ok = med <= Z_AGREE_FACTOR * null_med
        widths = sorted({s.largest[k] for k in s.largest if s.arch(k[0]) == fam})
        parts.append(
            f"{fam} (width {'/'.join(map(str, widths))}, {'/'.join(map(str, members))} members, {len(p)} points): median |z| = {fmt(med)} "
            f"against {fmt(null_med)} expected for an ensemble of the infinite-width process, |z| &lt; 2 for "
            f"{pct(frac)} (expected {pct(null_frac)}): "
            + ("consistent with theory" if ok else f"deviates from theory ({fmt(med / null_med)} times the expected median |z|)")
        )
    if not parts:
        return ("No model has an analytic prediction (a model trained by SGD or on the cross-entropy has none), so "
                "nothing is compared with theory.")
    return ("At the largest width, over all logged steps after initialisation and all eval sets, "
            + "; ".join(parts) + f". (Consistent means median |z| at most {Z_AGREE_FACTOR} times the expected value.)")


def width(s: Summary, summary: pd.DataFrame) -> str:
    """Does the error fall with width? Per model: error, slope and the ensemble's own noise level."""
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
            f"{r['model']}: {fmt(e['rel_err'].iloc[0])} at width {e['width'].iloc[0]} to {fmt(e['rel_err'].iloc[-1])} "
            f"at width {e['width'].iloc[-1]}, slope {fmt(r['slope_err'])}, bias-corrected slope {fmt(r['slope_bias'])} "
            f"(ensemble noise alone: {fmt(e['rel_noise'].iloc[0])} to {fmt(e['rel_noise'].iloc[-1])}"
            + ("; at the noise floor at every width, so the slope does not measure the finite-width bias)" if at_floor else ")")
        )
    return (f"Relative error of the ensemble mean pooled over all eval sets and steps after initialisation, against width "
            f"(log-log slope; -1 is the O(1/width) bias of docs/theory.md §2, about 0 an error set by the ensemble's own "
            f"noise; the bias-corrected slope uses sqrt(error^2 - SE^2), n/a where that is zero at some width): the error "
            f"falls for {falling} of {n} models, and for {floor_all} of {n} it is within {NOISE_FLOOR_FACTOR:g} times the "
            f"noise of an ensemble of this size at every width. " + "; ".join(parts) + ".")


def theorem(s: Summary) -> str:
    """Does the augmentation theorem hold at finite width? Gaps of augmented models to their GCNN counterparts."""
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
            trend = f"; pooled over sets {fmt(g0)} SE at width {all_w['width'].iloc[0]} and {fmt(g1)} at {all_w['width'].iloc[-1]}"
        t = s.pairs[(s.pairs["a"] == a) & (s.pairs["b"] == b) & (s.pairs["lr"] == lr) & (s.pairs["width"] == wmax) & (s.pairs["step"] > 0)]
        worst = t.loc[t["gap_se"].idxmax()] if len(t) else None
        groups[equal].append(
            f"{a} vs {b} at width {wmax}: gap "
            + ", ".join(f"{e} {fmt(top.loc[e, 'gap_se'])}" for e in sets)
            + f" combined SE (analytic: relative difference {fmt(top['theory_rel_gap'].max())}, "
            f"{fmt(top['theory_gap_se'].max())} SE); within {GAP_SE_LIMIT:g} SE on {len(within)} of {len(sets)} eval sets{trend}"
            + (f"; largest at step {int(worst['step'])} on {worst['eval_set']} ({fmt(worst['gap_se'])} SE)" if worst is not None else "")
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


def invariance(s: Summary) -> str:
    """Does invariance emerge in the augmented ensembles' mean? Orbit spread against its noise level."""
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
                    "equivariant by construction" if spec["arch"] in EQUIVARIANT_ARCHS else "not augmented")
            first, last = sp.iloc[0], sp.iloc[-1]
            text = f"{model} ({kind}): {fmt(first['spread'])} at width {first['width']}"
            if len(sp) >= 2:
                change = "shrinks" if last["spread"] < first["spread"] else "does not shrink"
                text += (f" to {fmt(last['spread'])} at width {last['width']} ({change}, slope "
                         f"{fmt(compare.fit_slope(sp['width'], sp['spread']))})")
            if last["spread"] < ROUNDING_SPREAD:
                text += ": invariant up to rounding"
            elif last["spread"] <= NOISE_FLOOR_FACTOR * last["spread_noise"]:
                text += (f": within the noise level {fmt(last['spread_noise'])}, so no systematic "
                         f"non-invariance is resolved")
            else:
                systematic = np.sqrt(max(last["spread"] ** 2 - last["spread_noise"] ** 2, 0.0))
                text += (f": {fmt(last['spread'] / last['spread_noise'])} times the noise level "
                         f"{fmt(last['spread_noise'])}, a systematic non-invariance of about {fmt(systematic)}")
            parts.append(text + f"; analytic mean's spread {fmt(last['theory_spread'])}")
    return ("Orbit spread of each ensemble's mean (RMS over group elements of mean(L_g x) minus its orbit average, "
            "relative to the RMS of the mean), pooled over eval sets and steps after initialisation. The noise level is "
            "the spread a perfectly invariant ensemble of this size would show: the member-to-member variance of each "
            "member's own deviation from its orbit average, over M (correlations across the orbit included; the "
            "independent-error level where the results predate it). " + "; ".join(parts) + ".")


def escnn(s: Summary) -> str:
    """Does escnn's default basis differ from the canonical GCNN, and do the ensembles resolve it?"""
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
                parts.append(f"{label}: {a} vs {b}: no analytic prediction; measured gap {fmt(top['gap_se'])} SE at width "
                             f"{top['width']}, " + ("resolved" if resolved else "not resolved"))
                continue
            resolvable = top["theory_gap_se"] > RESOLVE_SE
            parts.append(
                f"{label}: {a} vs {b}: analytic relative difference of the means {fmt(top['theory_rel_gap'])} "
                f"({fmt(top['theory_gap_se'])} combined SE at width {top['width']}); measured gap {fmt(top['gap_se'])} SE, "
                + ("resolved" if resolved else "not resolved")
                + ("" if resolved == resolvable else (" although theory predicts a resolvable difference" if resolvable else
                                                      " although theory predicts no resolvable difference (finite-width effects)"))
            )
    if not len(esc):
        parts.insert(0, "the study has no escnn-basis GCNN with a canonical counterpart")
    return (f"Pooled over eval sets and steps after initialisation, at the largest common width (resolved means a gap above "
            f"{RESOLVE_SE:g} combined SE): " + "; ".join(parts) + ".")

