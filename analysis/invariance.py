"""Emergent invariance at finite width (docs/theory.md §3.4): how far an augmented ensemble's
mean is from invariant, per width and step, against what the analytic mean says.

For every augmented model (``augmentation`` not ``none``, an orbit of more than one point),
per (width, step) and manifold (eval sets pooled: the training inputs and held-out digits are
``on`` the data manifold, noise and photos ``off``, ``summary.manifold_of``); every size is
relative to ``RMS(mu)``, the analytic mean's RMS over the pool (noise-free, the same at every
width, so a width dependence is the ensemble's own):

- ``analytic``: the analytic mean's own orbit spread, ``RMS_g(mu(L_g x) - orbit average)``. Zero
  (to round-off) when the model's kernel is jointly invariant (``jointly_invariant``,
  ``study.spec.kernel_jointly_invariant``); otherwise whatever kernel GD with the model's own
  kernel on the full-orbit augmented set gives (``analysis.theory``, §3.4's proposition).
- ``spread``: the ensemble mean's orbit spread as measured, ``noise`` its noise level (from the
  draws' own orbit deviations, ``compare.orbit_spread``), and ``sys`` its systematic part with
  the noise removed and the 95% interval ``sys_lo``, ``sys_hi``: the one ``compare.pooled_spread``
  gives (``interval`` names it: the jackknife over the stored blocks of draws where the results
  have them, else the worst-case bound of ``compare.excess_interval``).
- ``diff = sys - analytic`` with the interval ``[sys_lo, sys_hi] - analytic`` (the analytic
  spread has no noise): how far the measured systematic spread is from the analytic one. Its
  size ``|diff|`` is fitted against width where its interval excludes 0 (``fit_table``,
  ``compare.fit_exponent``); for a jointly invariant kernel it is the spread itself.

(The pointwise distance ``RMS(E dev - dev_mu)`` would say more than ``|diff|``, which it bounds
from above, but its noise-removed interval is only the worst-case bound of
``compare.excess_interval``: too wide to resolve anything at these ensemble sizes.)

``step`` missing in a row pools the steps after initialisation. The verdicts (``verdicts``)
state, per model, whether the mean is invariant at every width and step and, where the kernel
is not jointly invariant, the measured spread against the analytic one and the exponent.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from study.config import study_from_dict
from study.spec import kernel_jointly_invariant

from . import compare
from .summary import Summary, manifold_of, num_ci, pct2, pct_ci
from .verdicts import AGREES, DIFFERS, INCONCLUSIVE, POWER_REL, ROUNDING_SPREAD, Verdict

QUESTION = "Is the augmented ensemble's mean invariant at finite width (docs/theory.md §3.4)?"
WIDTH_COLUMNS = ["model", "filter_support", "tap_variance", "jointly_invariant", "lr", "manifold", "width", "step",
                 "draws", "interval", "analytic", "spread", "noise", "sys", "sys_lo", "sys_hi", "diff", "diff_lo", "diff_hi"]
FIT_COLUMNS = ["model", "lr", "manifold", "step", "widths", "exponent", "exponent_lo", "exponent_hi"]


def _ratio(ss, mu_ss) -> np.ndarray:
    ss, mu_ss = np.asarray(ss, dtype=np.float64), np.asarray(mu_ss, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mu_ss > 0, np.sqrt(np.maximum(ss, 0.0) / mu_ss), np.nan)


def _pooled(inv: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """The spread's sums and interval pooled by ``compare.pooled_spread`` (steps after
    initialisation); sizes relative to RMS(mu)."""
    a = compare.pooled_spread(inv, by)
    # the spread's noise as compare has it: exact from the draws' own orbit deviations where stored
    noise_ss = a["dev_se_ss"].where(np.isfinite(a["dev_se_ss"]), (1 - 1 / a["order"]) * a["se_ss"])
    mu = a["mu_ss"]
    a["analytic"] = _ratio(a["dev_mu_ss"], mu)
    a["spread"] = _ratio(a["dev_ss"], mu)
    a["noise"] = _ratio(noise_ss, mu)
    # compare's interval for the systematic spread (relative to RMS(mean) there), moved to RMS(mu)
    for c in ("", "_lo", "_hi"):
        a[f"sys2{c}"] = a[f"spread_sys{c}"] ** 2 * a["mean_ss"]
        a[f"sys{c}"] = _ratio(a[f"sys2{c}"], mu)
    # the difference of the spreads: an interval for sys is one for sys - analytic
    a["diff"], a["diff_lo"], a["diff_hi"] = (a[f"sys{c}"] - a["analytic"] for c in ("", "_lo", "_hi"))
    if "interval" not in a:
        a["interval"] = "worst-case bound"
    return a


def width_table(inv: pd.DataFrame, resolved: dict) -> pd.DataFrame:
    """One row per augmented model, lr, manifold, width and step after initialisation, and with
    ``step`` missing for the steps pooled; columns ``WIDTH_COLUMNS`` and the squared systematic
    spread ``sys2`` with its bounds (absolute). ``inv``: the analysis's ``invariance`` table
    (``compare.orbit_spread``, with the jackknife's columns where the results have blocks)."""
    specs = {s.name: s for s in study_from_dict(resolved["config"]).model_specs}
    aug = [m for m, s in specs.items() if s.augmentation != "none" and s.group_obj.order > 1]
    inv = inv[inv["model"].isin(aug) & np.isfinite(inv["mu_ss"]) & (inv["mu_ss"] > 0)]
    if not len(inv):
        return pd.DataFrame(columns=WIDTH_COLUMNS)
    manifold = manifold_of(resolved)
    inv = inv.assign(manifold=inv["eval_set"].map(manifold).fillna("off"))
    key = ["model", "lr", "manifold", "width"]
    out = pd.concat([_pooled(inv, key + ["step"]), _pooled(inv, key).assign(step=pd.NA)], ignore_index=True)
    out["step"] = out["step"].astype("Int64")
    out["filter_support"] = out["model"].map(lambda m: _field(specs[m], "filter_support"))
    out["tap_variance"] = out["model"].map(lambda m: _field(specs[m], "tap_variance"))
    out["jointly_invariant"] = out["model"].map(lambda m: kernel_jointly_invariant(specs[m]))
    order = {**{m: i for i, m in enumerate(specs)}, "on": 0, "off": 1}  # study order, on the manifold first
    out = out.sort_values(["model", "lr", "manifold", "step", "width"],
                          key=lambda c: c.map(order) if c.name in ("model", "manifold") else c, na_position="last")
    return out[WIDTH_COLUMNS + ["sys2", "sys2_lo", "sys2_hi"]].reset_index(drop=True)


def _field(spec, name: str) -> str:
    """A CNN filter field as the tables show it: its name, or ``custom`` for an explicit list or array."""
    if spec.arch != "cnn":
        return ""
    v = getattr(spec, name)
    return v if isinstance(v, str) else "custom"


def _diff_squares(g: pd.DataFrame) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``|sys - analytic|^2`` with its interval where that excludes 0 (else ``lo = 0``: unresolved)."""
    d, lo, hi = (g[c].to_numpy(np.float64) for c in ("diff", "diff_lo", "diff_hi"))
    apart = (lo > 0) | (hi < 0)
    near, far = np.minimum(np.abs(lo), np.abs(hi)), np.maximum(np.abs(lo), np.abs(hi))
    return d**2, np.where(apart, near**2, 0.0), far**2


def fit_table(width: pd.DataFrame) -> pd.DataFrame:
    """Exponent in width of ``|sys - analytic|``, the measured systematic spread's distance from
    the analytic one, with its 95% interval (``compare.fit_exponent``), per model, lr, manifold
    and step (``step`` missing: pooled), over the widths where the difference is resolved."""
    rows = []
    for key, g in width.groupby(["model", "lr", "manifold", "step"], sort=False, dropna=False):
        g = g.sort_values("width")
        rows.append(dict(zip(["model", "lr", "manifold", "step"], key), widths=" ".join(map(str, g["width"])),
                         **dict(zip(["exponent", "exponent_lo", "exponent_hi"],
                                    compare.fit_exponent(g["width"], *_diff_squares(g))))))
    out = pd.DataFrame(rows, columns=FIT_COLUMNS)
    out["step"] = out["step"].astype("Int64")
    return out


# ----- verdicts --------------------------------------------------------------------------------
def verdicts(width: pd.DataFrame, fits: pd.DataFrame) -> list[Verdict]:
    """Per augmented model: invariant at every width and step, or not, and where its kernel is
    not jointly invariant, the measured systematic spread against the analytic one and the
    exponent of their distance in width."""
    out = []
    for (model, lr), t in width.groupby(["model", "lr"], sort=False):
        steps = t[t["step"].notna()]
        pooled = t[t["step"].isna()]
        wmax = int(t["width"].max())
        top = pooled[pooled["width"] == wmax].set_index("manifold")
        invariant = bool(t["jointly_invariant"].iloc[0])
        what = _describe(t.iloc[0])
        resolved = steps[steps["sys_lo"] > ROUNDING_SPREAD]
        key = "; ".join(f"{m} {pct_ci(r.sys, r.sys_lo, r.sys_hi)}" for m, r in top.iterrows()) + f" at width {wmax}"
        if invariant:
            worst = steps.loc[steps["sys_hi"].idxmax()] if len(steps) else None
            if len(resolved):
                r = resolved.loc[resolved["sys_lo"].idxmax()]
                answer = DIFFERS
                text = (f"{model} ({what}): a systematic orbit spread is resolved although the kernel is jointly invariant: "
                        f"{pct_ci(r['sys'], r['sys_lo'], r['sys_hi'])} {r['manifold']} the data manifold at width "
                        f"{int(r['width'])}, step {int(r['step'])} ({len(resolved)} of {len(steps)} width-step-manifold intervals exclude 0)")
            else:
                answer = AGREES if (top["sys_hi"] <= POWER_REL).all() else INCONCLUSIVE
                text = (f"{model} ({what}): systematic orbit spread consistent with zero at every width and step "
                        f"({len(steps)} intervals, each containing 0; the largest 95% upper end "
                        f"{pct2(worst['sys_hi'])} {worst['manifold']} the data manifold at width {int(worst['width'])}, "
                        f"step {int(worst['step'])}); pooled over steps at width {wmax}: "
                        + ", ".join(f"{m} [0, {pct2(r.sys_hi)}]" for m, r in top.iterrows())
                        + ("" if answer == AGREES else f"; an upper end above {pct2(POWER_REL)}: a spread of that size "
                           "cannot be excluded"))
        else:
            answer = DIFFERS if len(resolved) else INCONCLUSIVE
            parts = []
            for man in top.index:
                pw = pooled[pooled["manifold"] == man].sort_values("width")
                f = fits[(fits["model"] == model) & (fits["lr"] == lr) & (fits["manifold"] == man) & fits["step"].isna()]
                f = f.iloc[0] if len(f) else None
                parts.append(
                    f"{man} the data manifold analytic {pct2(pw['analytic'].iloc[-1])}, measured "
                    + ", ".join(pct_ci(r.sys, r.sys_lo, r.sys_hi) for r in pw.itertuples())
                    + f" at widths {', '.join(str(int(w)) for w in pw['width'])}; exponent of |measured - analytic| in width "
                    + _exponent(f))
            head = (f"{model} ({what}; kernel not jointly invariant): "
                    + (f"not invariant, a systematic orbit spread resolved at {len(resolved)} of {len(steps)} width-step-manifold "
                       "points" if len(resolved) else "no systematic orbit spread resolved at any width and step"))
            text = head + "; pooled over steps: " + "; ".join(parts)
        out.append(Verdict(f"{QUESTION} ({model})", answer, key, text))
    return out


def _exponent(fit) -> str:
    if fit is None or not np.isfinite(fit["exponent"]):
        return "n/a (resolved at fewer than two widths)"
    return num_ci(fit["exponent"], fit["exponent_lo"], fit["exponent_hi"])


def _describe(row: pd.Series) -> str:
    if row["filter_support"]:
        return f"filter_support {row['filter_support']}, tap_variance {row['tap_variance']}"
    return "jointly invariant kernel" if row["jointly_invariant"] else "kernel not jointly invariant"


def tables(s: Summary) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(width_table, fit_table)`` of a report's ``Summary``, computed once per ``Summary``
    (the page and its figure both read them)."""
    if getattr(s, "_finite_invariance", None) is None:
        w = width_table(s.t["invariance"], s.resolved)
        s._finite_invariance = (w, fit_table(w))
    return s._finite_invariance


def fmt_table(width: pd.DataFrame) -> pd.DataFrame:
    """The page's table: pooled over steps, one row per model, manifold and width."""
    p = width[width["step"].isna()]
    return p[["model", "filter_support", "tap_variance", "manifold", "width", "draws", "analytic", "spread", "noise",
              "sys", "sys_lo", "sys_hi", "diff", "interval"]].reset_index(drop=True)

