"""One verdict per question of the report, in words computed from the ``Summary``.

Each verdict opens with its answer, ``agrees``, ``differs`` or ``inconclusive``, and its key
number with a 95% interval (``Verdict``); the details follow. Sizes are relative, with the
ensembles' noise removed (``analysis.compare``: the blocks' jackknife, docs/theory.md §5.6, or
the worst-case bound of §5.4 for results without blocks), so an
"equal" always states the largest difference the data leave possible: the upper end of the
interval. An equality the study could not have refuted (the interval reaches past
``POWER_REL``, or the theorem's positive control is not resolved) is ``inconclusive``.

The thresholds that turn numbers into words are the constants below; the page states them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from study.spec import EQUIVARIANT_ARCHS

from . import compare
from .summary import FAMILIES, Summary, fmt, num_ci, pct2, pct_ci

AGREES, DIFFERS, INCONCLUSIVE = "agrees", "differs", "inconclusive"
# Median |z| reference: at most this multiple of the Student-t value counts as consistent (details only).
Z_AGREE_FACTOR = 1.5
# Gap in combined SE drawn as a reference line in the gap plots.
GAP_SE_LIMIT = 3.0
# Two ensembles resolve a difference of their means when the pooled gap exceeds this many combined SE.
RESOLVE_SE = 3.0
# A positive control counts as resolved when its pooled gap at the largest width reaches this many combined SE.
CONTROL_RESOLVE_SE = 5.0
# An "equal" whose 95% upper bound exceeds this relative size could not have seen a difference
# that matters: the verdict is inconclusive.
POWER_REL = 0.10
# Analytic means of a pair whose relative difference is below this are equal (float64
# kernels agree to ~1e-12; docs/theory.md §6 was checked to 1e-9), so the theorem applies.
THEOREM_RTOL = 1e-6
# The exponent of the finite-width bias of the mean in width (docs/theory.md §2.4, §5.4).
BIAS_EXPONENT = -1.0
# Error within this factor of the ensemble's own noise level (rel_err / rel_noise) counts as at the noise floor.
NOISE_FLOOR_FACTOR = 1.5
# An orbit spread below this is float32 rounding of an exactly invariant network.
ROUNDING_SPREAD = 1e-5
# The report's questions, in page order.
QUESTION = {
    "agreement": "Does the finite ensemble agree with theory at the largest width?",
    "width": "Does the finite-width bias of the mean fall as 1/width?",
    "theorem": "Does the augmentation theorem hold at finite width?",
    "invariance": "Does invariance emerge in the augmented ensembles' mean?",
    "escnn": "Does escnn's default basis differ from the canonical GCNN, and do the ensembles resolve it?",
}
# Architecture families of the theorem: an augmented model, its GCNN counterpart and their controls.
THEOREM_FAMILY = {"mlp": "MLP", "group_mlp": "MLP", "cnn": "conv", "gcnn": "conv", "sphere_mlp": "SO3", "so3_gcnn": "SO3"}


@dataclass
class Verdict:
    """One answer: ``question``, ``answer`` (agrees / differs / inconclusive), ``key`` (the key
    number as printed), ``text`` (the one-line verdict) and ``details`` (HTML, page only)."""
    question: str
    answer: str
    key: str
    text: str
    details: str = ""

    def record(self) -> dict:
        """The machine-readable form (``report/verdicts.json``)."""
        d = asdict(self)
        d.pop("details")
        return d


def _status(lo_values, hi_values, floor: float = 0.0) -> str:
    """``differs`` when any interval lies above ``floor`` (0, or what rounding alone makes),
    else ``inconclusive`` when any reaches past ``POWER_REL`` (or is missing), else ``agrees``."""
    lo, hi = np.asarray(lo_values, dtype=float), np.asarray(hi_values, dtype=float)
    if (np.nan_to_num(lo) > floor).any():
        return DIFFERS
    if not len(hi) or (~np.isfinite(hi)).any() or (hi > POWER_REL).any():
        return INCONCLUSIVE
    return AGREES


def _worst(answers: list[str]) -> str:
    return DIFFERS if DIFFERS in answers else INCONCLUSIVE if INCONCLUSIVE in answers or not answers else AGREES


def _subject_first(s: Summary, model: str, lr: float) -> tuple:
    """Order of a family's models in its verdict: the augmented ones (what the study is about)
    before the non-augmented controls, then the study's order; the first with the worst answer speaks."""
    return (s.models.loc[model, "augmentation"] == "none" and s.arch(model) not in EQUIVARIANT_ARCHS,
            s.model_order.index(model), lr)


def _row(frame: pd.DataFrame, **eq) -> pd.Series | None:
    m = np.ones(len(frame), bool)
    for k, v in eq.items():
        m &= (frame[k] == v).to_numpy()
    return frame[m].iloc[0] if m.any() else None


# ----- agreement with theory ---------------------------------------------------------------
def agreement(s: Summary) -> list[Verdict]:
    """Per family at the largest width: the bias of the ensemble mean with the noise removed,
    at the final logged step and pooled over the steps after initialisation."""
    q = QUESTION["agreement"]
    if not len(s.errors):
        return [Verdict(q, INCONCLUSIVE, "n/a", "No model has an analytic prediction (a model trained by SGD or on "
                        "the cross-entropy has none), so nothing is compared with theory.")]
    out = []
    for fam in FAMILIES:
        models = [(m, lr) for (m, lr) in s.largest if s.arch(m) == fam and ((s.errors["model"] == m) & (s.errors["lr"] == lr)).any()]
        models.sort(key=lambda k: _subject_first(s, *k))
        if not models:
            continue
        rows, answers = [], []
        for m, lr in models:
            w = s.largest[(m, lr)]
            by_step = s.errors_by_step[(s.errors_by_step["model"] == m) & (s.errors_by_step["lr"] == lr)
                                       & (s.errors_by_step["width"] == w)]
            last = by_step.loc[by_step["step"].idxmax()]
            pooled = _row(s.errors, model=m, lr=lr, width=w)
            ans = _status([last["rel_bias_lo"], pooled["rel_bias_lo"]], [last["rel_bias_hi"], pooled["rel_bias_hi"]])
            answers.append(ans)
            rows.append((m, lr, w, last, pooled, ans))
        answer = _worst(answers)
        m, lr, w, last, pooled, _ = next(r for r in rows if r[5] == answer)
        key = f"{pct_ci(last['rel_bias'], last['rel_bias_lo'], last['rel_bias_hi'])} at step {int(last['step'])}"
        if answer == AGREES:
            text = (f"{fam}: the ensemble mean equals theory within {pct2(last['rel_bias_hi'])} (95% CI) at width {w}, "
                    f"final step {int(last['step'])}; within {pct2(pooled['rel_bias_hi'])} pooled over steps")
        elif answer == DIFFERS:
            text = (f"{fam}: {m}'s ensemble mean differs from theory by {pct_ci(last['rel_bias'], last['rel_bias_lo'], last['rel_bias_hi'])} "
                    f"at width {w}, final step {int(last['step'])} ({pct_ci(pooled['rel_bias'], pooled['rel_bias_lo'], pooled['rel_bias_hi'])} "
                    f"pooled over steps): a finite-width bias")
        else:
            text = (f"{fam}: {m} neither resolves a bias nor excludes one above {pct2(POWER_REL)}: "
                    f"{pct_ci(last['rel_bias'], last['rel_bias_lo'], last['rel_bias_hi'])} at width {w}, final step")
        details = []
        for m, lr, w, last, pooled, ans in rows:
            p = s.top_points[(s.top_points["model"] == m) & (s.top_points["lr"] == lr) & s.top_points["z"].notna()]
            null_med, _ = compare.t_null_pooled(p["draws"])
            med = p["z"].abs().median()
            sets = s.agr[(s.agr["model"] == m) & (s.agr["lr"] == lr) & (s.agr["width"] == w) & (s.agr["step"] == last["step"])]
            per_set = ", ".join(f"{r.eval_set} {pct_ci(r.rel_bias, r.rel_bias_lo, r.rel_bias_hi)}"
                                for r in sets.set_index("eval_set").loc[s.eval_sets(sets)].reset_index().itertuples())
            details.append(
                f"{m} ({ans}; width {w}, {int(last['draws'])} independent draws): bias of the mean "
                f"{pct_ci(last['rel_bias'], last['rel_bias_lo'], last['rel_bias_hi'])} at the final step (per eval set: {per_set}), "
                f"{pct_ci(pooled['rel_bias'], pooled['rel_bias_lo'], pooled['rel_bias_hi'])} pooled over steps after "
                f"initialisation; median |z| {fmt(med)} against {fmt(null_med)} for an ensemble of the infinite-width process"
                + (f" ({fmt(med / null_med)} times)" if med > Z_AGREE_FACTOR * null_med else ""))
        out.append(Verdict(f"{q} ({fam})", answer, key, text, "; ".join(details) + "."))
    return out


# ----- error against width -----------------------------------------------------------------
def _exponent_status(lo: float, hi: float) -> str:
    if not (np.isfinite(lo) and np.isfinite(hi)):
        return INCONCLUSIVE
    if lo <= BIAS_EXPONENT <= hi:
        return INCONCLUSIVE if lo <= 0 <= hi else AGREES
    return DIFFERS


def width(s: Summary, summary: pd.DataFrame = None) -> list[Verdict]:
    """Per family: the exponent of the bias of the mean in width, pooled over the steps after
    initialisation, on and off the data manifold, against the -1 of docs/theory.md §2.4."""
    q = QUESTION["width"]
    wf = s.width_fit
    wf_pooled = wf[wf["step"].isna()] if len(wf) else wf
    out = []
    for fam in FAMILIES:
        models = [(m, lr) for (m, lr) in s.largest if s.arch(m) == fam and ((s.errors["model"] == m) & (s.errors["lr"] == lr)).any()] \
            if len(s.errors) else []
        models.sort(key=lambda k: _subject_first(s, *k))
        if not models:
            continue
        fits, details = [], []
        for m, lr in models:
            e = s.errors[(s.errors["model"] == m) & (s.errors["lr"] == lr)].sort_values("width")
            parts = []
            for man in ("on", "off"):
                r = _row(wf_pooled, model=m, lr=lr, manifold=man) if len(wf_pooled) else None
                if r is None:
                    continue
                st = _exponent_status(r["exponent_lo"], r["exponent_hi"])
                fits.append((m, man, r, st))
                half = " (also consistent with -1/2, a random O(1/sqrt(width)) part)" if \
                    np.isfinite(r["exponent_lo"]) and r["exponent_lo"] <= -0.5 <= r["exponent_hi"] else ""
                per_step = wf[(wf["model"] == m) & (wf["lr"] == lr) & (wf["manifold"] == man) & wf["step"].notna()]
                last = per_step.loc[per_step["step"].idxmax()] if len(per_step) else None
                parts.append(f"{man} the data manifold {num_ci(r['exponent'], r['exponent_lo'], r['exponent_hi'])}{half}"
                             + (f", at the final step {num_ci(last['exponent'], last['exponent_lo'], last['exponent_hi'])}"
                                if last is not None else ""))
            if len(e) < 2:
                details.append(f"{m}: one width only, no exponent")
                continue
            details.append(f"{m} (widths {' '.join(map(str, e['width']))}; bias pooled over steps "
                           + ", ".join(pct_ci(r.rel_bias, r.rel_bias_lo, r.rel_bias_hi) for r in e.itertuples())
                           + "): exponent " + ("; ".join(parts) or "n/a"))
        answers = [f[3] for f in fits if np.isfinite(f[2]["exponent"])]
        if not answers:
            answer = INCONCLUSIVE
            key = "n/a"
            text = (f"{fam}: fewer than two widths with a resolved bias, so no exponent can be fitted")
        else:
            answer = _worst(answers)
            m, man, r, _ = next(f for f in fits if f[3] == answer and np.isfinite(f[2]["exponent"]))
            key = num_ci(r["exponent"], r["exponent_lo"], r["exponent_hi"])
            verb = {AGREES: "falls as 1/width", DIFFERS: "does not fall as 1/width",
                    INCONCLUSIVE: "may fall as 1/width or not at all"}[answer]
            text = (f"{fam}: the bias of {m}'s mean {verb}: exponent {key} (95% CI) {man} the data manifold, pooled over steps"
                    + ("; consistent with -1/2, the RMS of a random O(1/sqrt(width)) part" if r["exponent_lo"] <= -0.5 <= r["exponent_hi"]
                       and answer != AGREES else ""))
        out.append(Verdict(f"{q} ({fam})", answer, key, text, "; ".join(details) + "."))
    if not out:
        out.append(Verdict(q, INCONCLUSIVE, "n/a", "No model has an analytic prediction at two widths, so no exponent is fitted."))
    return out


# ----- the augmentation theorem --------------------------------------------------------------
def _final_and_pooled(s: Summary, a: str, b: str, lr: float, w: int) -> tuple[pd.Series, pd.Series]:
    rows = s.pairs[(s.pairs["a"] == a) & (s.pairs["b"] == b) & (s.pairs["lr"] == lr) & (s.pairs["width"] == w)]
    last = compare.pooled_gaps(rows[rows["step"] == rows["step"].max()], ["a", "b", "lr", "width"]).iloc[0]
    last["step"] = int(rows["step"].max())
    return last, _row(s.pair_all, a=a, b=b, lr=lr, width=w)


def controls(s: Summary, family: str, lr: float) -> list[dict]:
    """The family's positive controls at their largest width: pairs of kind ``control``, at any
    learning rate (a control shows what the family's ensembles resolve; a non-augmented model
    may need its own lr, ``compare.pair_gaps``)."""
    c = s.pair_all[s.pair_all["kind"] == "control"] if len(s.pair_all) else s.pair_all
    out = []
    for (a, b), g in c.groupby(["a", "b"], sort=False) if len(c) else []:
        if THEOREM_FAMILY.get(s.arch(a)) != family or THEOREM_FAMILY.get(s.arch(b)) != family:
            continue
        top = g.loc[g["width"].idxmax()]
        out.append(dict(a=a, b=b, width=int(top["width"]), gap_se=float(top["gap_se"]), analytic=float(top["theory_rel_gap"]),
                        resolved=bool(top["gap_se"] >= CONTROL_RESOLVE_SE)))
    return out


def gap_exponent(s: Summary, a: str, b: str, lr: float) -> tuple[float, float, float]:
    """Exponent in width of the pair's relative gap (noise removed, pooled over steps) with its
    95% interval: a gap that exists only at finite width falls towards 0 as width grows."""
    g = s.pair_all[(s.pair_all["a"] == a) & (s.pair_all["b"] == b) & (s.pair_all["lr"] == lr)].sort_values("width")
    return compare.fit_exponent(g["width"], g["rel_gap_est"] ** 2, g["rel_gap_lo"] ** 2, g["rel_gap_hi"] ** 2)


def theorem(s: Summary) -> list[Verdict]:
    """Per augmented model and GCNN counterpart with equal analytic means: the relative gap of
    the ensemble means (noise removed) at the largest width, final step and pooled, and its
    exponent in width; inconclusive unless one of the family's positive controls is resolved
    (that the family's ensembles show a difference they must show; the power of the equality
    itself is its own interval's upper end)."""
    q = QUESTION["theorem"]
    aug = s.pair_all[s.pair_all["kind"] == "augmentation"] if len(s.pair_all) else s.pair_all
    if not len(aug):
        return [Verdict(q, INCONCLUSIVE, "n/a", "The study has no augmented model with a GCNN counterpart of the same "
                        "group and width (with equal analytic means); the theorem is not tested.")]
    out = []
    for (a, b, lr), g in aug.groupby(["a", "b", "lr"], sort=False):
        w = int(g["width"].max())
        last, pooled = _final_and_pooled(s, a, b, lr, w)
        analytic = pooled["theory_rel_gap"]
        if np.isfinite(analytic) and analytic >= THEOREM_RTOL:
            continue  # analytic means differ (a control when far enough apart): not a test of the theorem
        family = THEOREM_FAMILY.get(s.arch(a), "")
        ctrl = controls(s, family, lr)
        ctrl_text = "; ".join(f"control {c['a']} vs {c['b']} (analytic means {pct2(c['analytic'])} apart) "
                              f"{'resolved' if c['resolved'] else 'NOT resolved'} at {fmt(c['gap_se'])} combined SE, width {c['width']}"
                              for c in ctrl)
        measured = _status([last["rel_gap_lo"], pooled["rel_gap_lo"]], [last["rel_gap_hi"], pooled["rel_gap_hi"]])
        gap_last = pct_ci(last["rel_gap_est"], last["rel_gap_lo"], last["rel_gap_hi"])
        gap_pooled = pct_ci(pooled["rel_gap_est"], pooled["rel_gap_lo"], pooled["rel_gap_hi"])
        key = f"{gap_last} at step {last['step']}"
        head = f"{a} vs {b} at width {w}"
        exponent = gap_exponent(s, a, b, lr)
        if not ctrl:
            answer = INCONCLUSIVE
            text = (f"{head}: no positive control in the {family} family (add a non-augmented {s.arch(a)} of group "
                    f"{s.models.loc[a, 'group']}, or a GCNN whose analytic mean differs), so an equality would mean nothing")
        elif not any(c["resolved"] for c in ctrl):
            answer = INCONCLUSIVE
            best = max(ctrl, key=lambda c: c["gap_se"])
            text = (f"{head}: no positive control is resolved (the best, {best['a']} vs {best['b']}, "
                    f"{pct2(best['analytic'])} apart in theory, reaches {fmt(best['gap_se'])} combined SE, below "
                    f"{CONTROL_RESOLVE_SE:g}); gap {gap_last} at the final step")
        elif measured == DIFFERS:
            answer = DIFFERS
            text = (f"{head}: augmented and GCNN means differ by {gap_last} at the final step ({gap_pooled} pooled over steps)"
                    + (f"; the gap falls with width as width^{fmt(exponent[0], 2)} [{fmt(exponent[1], 2)}, "
                       f"{fmt(exponent[2], 2)}], a finite-width difference" if np.isfinite(exponent[0]) and exponent[2] < 0 else ""))
        else:
            answer = measured
            text = (f"{head}: augmented and GCNN means equal within {pct2(last['rel_gap_hi'])} (95% CI) at the final step, "
                    f"within {pct2(pooled['rel_gap_hi'])} pooled over steps"
                    + ("" if answer == AGREES else f"; that bound exceeds {pct2(POWER_REL)}"))
        sets = s.pair_pooled[(s.pair_pooled["a"] == a) & (s.pair_pooled["b"] == b) & (s.pair_pooled["lr"] == lr)
                             & (s.pair_pooled["width"] == w)]
        details = (f"Relative gap of the ensemble means, noise removed: {gap_last} at the final step, {gap_pooled} pooled over "
                   f"steps after initialisation (per eval set, pooled: "
                   + ", ".join(f"{r.eval_set} {pct_ci(r.rel_gap_est, r.rel_gap_lo, r.rel_gap_hi)}" for r in sets.itertuples())
                   + f"); in combined SE {fmt(pooled['gap_se'])} pooled; analytic relative difference {fmt(analytic)}"
                   + f"; exponent of the gap in width {num_ci(*exponent)} (widths whose gap is resolved)"
                   + ("" if np.isfinite(analytic) else " (no analytic prediction: SGD or cross-entropy, where the theorem is not proved)")
                   + (f". Controls: {ctrl_text}." if ctrl else "."))
        out.append(Verdict(f"{q} ({a} vs {b})", answer, key, text, details))
    if not out:
        out.append(Verdict(q, INCONCLUSIVE, "n/a", "No augmented model has a GCNN counterpart with equal analytic means; "
                           "the theorem is not tested."))
    return out


# ----- emergent invariance -------------------------------------------------------------------
def invariance(s: Summary) -> list[Verdict]:
    """Per augmented model at its largest width: the systematic part of the orbit spread of
    the ensemble mean (noise removed) with its interval, final step and pooled."""
    q = QUESTION["invariance"]
    if not len(s.spread):
        return [Verdict(q, INCONCLUSIVE, "n/a", "No ensembles.")]
    inv = s.t["invariance"]
    out, others = [], []
    for model in s.model_order:
        spec = s.models.loc[model]
        for lr in s.lrs:
            sp = s.spread[(s.spread["model"] == model) & (s.spread["lr"] == lr)].sort_values("width")
            if not len(sp) or sp["order"].max() < 2:
                continue
            top = sp.iloc[-1]
            w = int(top["width"])
            rows = inv[(inv["model"] == model) & (inv["lr"] == lr) & (inv["width"] == w)]
            last = compare.pooled_spread(rows[rows["step"] == rows["step"].max()], ["model", "lr", "width"]).iloc[0]
            step = int(rows["step"].max())
            trend = ", ".join(f"{pct_ci(r.spread_sys, r.spread_sys_lo, r.spread_sys_hi)} at width {r.width}" for r in sp.itertuples())
            if spec["augmentation"] == "none":
                kind = "equivariant by construction" if spec["arch"] in EQUIVARIANT_ARCHS else "not augmented"
                others.append(f"{model} ({kind}): systematic spread {trend}; analytic {fmt(top['theory_spread'])}"
                              + (": invariant up to rounding" if top["spread"] < ROUNDING_SPREAD else ""))
                continue
            answer = _status([last["spread_sys_lo"], top["spread_sys_lo"]], [last["spread_sys_hi"], top["spread_sys_hi"]],
                             floor=ROUNDING_SPREAD)
            key = f"{pct_ci(last['spread_sys'], last['spread_sys_lo'], last['spread_sys_hi'])} at step {step}"
            if answer == AGREES:
                text = (f"{model}: the ensemble mean is invariant within {pct2(last['spread_sys_hi'])} (95% CI) at width {w}, "
                        f"final step; within {pct2(top['spread_sys_hi'])} pooled over steps")
            elif answer == DIFFERS:
                text = (f"{model}: the ensemble mean is not invariant at width {w}: systematic orbit spread {key} "
                        f"({pct_ci(top['spread_sys'], top['spread_sys_lo'], top['spread_sys_hi'])} pooled over steps)")
            else:
                text = (f"{model}: a systematic orbit spread above {pct2(POWER_REL)} cannot be excluded at width {w}: {key}")
            out.append(Verdict(f"{q} ({model})", answer, key, text,
                               f"Systematic orbit spread (noise removed) pooled over steps after initialisation: {trend}; "
                               f"measured spread {fmt(top['spread'])} against its noise level {fmt(top['spread_noise'])}; "
                               f"analytic mean's spread {fmt(top['theory_spread'])}."))
    if not out:
        out.append(Verdict(q, INCONCLUSIVE, "n/a", "The study has no augmented model with an orbit to measure."))
    if others:
        out[-1].details += " Other models: " + "; ".join(others) + "."
    return out


# ----- escnn against canonical -------------------------------------------------------------
def escnn(s: Summary) -> list[Verdict]:
    """Per GCNN with escnn's basis and canonical counterpart: the measured relative gap of the
    means (noise removed) against the analytic one, at the largest width."""
    q = QUESTION["escnn"]
    pairs = s.pair_all
    out = []
    if len(pairs):
        basis = s.models["basis"].to_dict()
        esc = pairs[(pairs["a"].map(basis) != pairs["b"].map(basis))
                    & pairs["a"].map(s.arch).isin(EQUIVARIANT_ARCHS) & pairs["b"].map(s.arch).isin(EQUIVARIANT_ARCHS)
                    & (pairs["kind"] != "pairing")]
        for (a, b, lr), g in esc.groupby(["a", "b", "lr"], sort=False):
            top = g.loc[g["width"].idxmax()]
            measured = pct_ci(top["rel_gap_est"], top["rel_gap_lo"], top["rel_gap_hi"])
            analytic = top["theory_rel_gap"]
            key = f"{measured} (analytic {pct2(analytic)})" if np.isfinite(analytic) else measured
            head = f"{a} vs {b} at width {int(top['width'])}"
            if not np.isfinite(analytic):
                answer, text = INCONCLUSIVE, f"{head}: no analytic prediction (SGD or cross-entropy); measured gap {measured}"
            elif not top["rel_gap_lo"] > 0:
                answer, text = INCONCLUSIVE, (f"{head}: the measured gap {measured} does not resolve the analytic "
                                              f"{pct2(analytic)} from zero")
            elif top["rel_gap_lo"] <= analytic <= top["rel_gap_hi"]:
                answer, text = AGREES, f"{head}: the means differ by {measured} (95% CI), as theory predicts ({pct2(analytic)})"
            else:
                answer, text = DIFFERS, f"{head}: the means differ by {measured} (95% CI), theory predicts {pct2(analytic)}"
            out.append(Verdict(f"{q} ({a} vs {b})", answer, key, text,
                               f"Pooled over eval sets and steps after initialisation: gap {fmt(top['gap_se'])} combined SE, "
                               f"analytic {fmt(top['theory_gap_se'])} SE."))
    if not out:
        out.append(Verdict(q, INCONCLUSIVE, "n/a", "The study has no GCNN with escnn's basis and a canonical counterpart."))
    return out


# Each question's verdicts, in page order.
QUESTIONS = {"agreement": agreement, "width": width, "theorem": theorem, "invariance": invariance, "escnn": escnn}
