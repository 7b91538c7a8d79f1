"""The report: plots, a summary table and verdicts, as ``DIR/report/index.html``.

Each verdict opens with its answer (agrees / differs / inconclusive) and key number; the
verdicts are also written machine-readable to ``DIR/report/verdicts.json`` (a list of
``{question, answer, key, text}`` in page order).

Every statement in a verdict is computed from the analysis tables (``analysis.compare``,
``analysis.summary``, ``analysis.verdicts``); the thresholds that turn numbers into words are
constants of ``analysis.verdicts``, and the page states them. The page needs nothing but the
PNG files (``analysis.plots``) beside it.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import pandas as pd

from study.atomic import atomic_path

from . import invariance, plots, verdicts
from .summary import Summary, details_table, fmt, summary_table
from .verdicts import (CONTROL_RESOLVE_SE, INCONCLUSIVE, POWER_REL, RESOLVE_SE, THEOREM_RTOL, Z_AGREE_FACTOR, Verdict)

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
.answer{font-weight:bold;text-transform:uppercase}
.agrees{color:#286}.differs{color:#b33}.inconclusive{color:#a70}
.details{font-size:13px;color:#444}
"""


def _table_html(df: pd.DataFrame, cls: str) -> str:
    return "<div class='scroll'>" + df.to_html(index=False, classes=cls, border=0, na_rep="n/a", float_format=lambda x: fmt(x),
                      escape=True) + "</div>"


def _finite_invariance(s: Summary, rdir: Path) -> list[str]:
    """The page's section on emergent invariance at finite width (``analysis.invariance``), and its
    files ``invariance_width.csv``, ``invariance_fit.csv`` and ``invariance.json`` (the verdicts);
    nothing when the study has no augmented model."""
    width, fits = invariance.tables(s)
    names = ("invariance_width.csv", "invariance_fit.csv", "invariance.json")
    for name in names:
        (rdir / name).unlink(missing_ok=True)
    if not len(width):
        return []
    answers = invariance.verdicts(width, fits)
    for name, frame in zip(names, (width, fits)):
        with atomic_path(rdir / name) as tmp:
            frame.to_csv(tmp, index=False)
    with atomic_path(rdir / names[2]) as tmp:
        tmp.write_text(json.dumps([v.record() for v in answers], indent=1))
    h = ["<h2>Emergent invariance at finite width</h2><p>Per augmented model, the orbit spread of the ensemble mean with "
         "the noise removed (<code>sys</code>, 95% interval) against the analytic mean's own (<code>analytic</code>: 0 when "
         "the kernel is jointly invariant, docs/theory.md §3.4) and their difference <code>diff</code>, relative to RMS(mu), "
         "pooled over the eval sets on and off the data manifold "
         "and over the steps after initialisation; per step in <a href='invariance_width.csv'>invariance_width.csv</a>, "
         "the exponents in width in <a href='invariance_fit.csv'>invariance_fit.csv</a>.</p>"]
    for v in answers:
        h.append(f"<div class='verdict'><b>{html.escape(v.question)}</b><p><span class='answer {v.answer}'>{v.answer}</span>: "
                 f"{html.escape(v.key)}. {html.escape(v.text.rstrip('.'))}.</p></div>")
    h.append(_table_html(invariance.fmt_table(width), "invariance"))
    return h


def write_report(out: Path, tables: dict[str, pd.DataFrame], resolved: dict) -> Path:
    """Write ``out/report/``: ``index.html``, ``summary.csv`` and the plots' PNG files; returns the page."""
    out = Path(out)
    rdir = out / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    for name in plots.PLOTS:  # a plot that has nothing to show this time must not survive from an earlier report
        (rdir / f"{name}.png").unlink(missing_ok=True)
    s = Summary(tables, resolved)
    summary = summary_table(s)
    for name, frame in (("summary", summary), ("details", details_table(s)), ("width_fit", s.width_fit)):
        with atomic_path(rdir / f"{name}.csv") as tmp:
            frame.to_csv(tmp, index=False)

    figures = []
    for name, draw in plots.PLOTS.items():
        caption = draw(s, rdir / f"{name}.png")
        if caption:
            figures.append((f"{name}.png", caption))

    if len(tables["points"]):
        answers = [v for question in verdicts.QUESTIONS.values() for v in question(s)]
    else:
        nothing = "No ensemble has a finished unit yet, so nothing can be measured (see the units below)"
        answers = [Verdict(verdicts.QUESTION[name], INCONCLUSIVE, "n/a", nothing) for name in verdicts.QUESTIONS]
    with atomic_path(rdir / "verdicts.json") as tmp:
        tmp.write_text(json.dumps([v.record() for v in answers], indent=1))
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
        pair_top = pair_top[pair_top["width"] == wmax][["a", "b", "kind", "width", "eval_set", "gap_se",
                                                        "rel_gap_est", "rel_gap_lo", "rel_gap_hi", "theory_rel_gap"]]
    conv = s.t["convergence"]
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
    for v in answers:
        h.append(f"<div class='verdict'><b>{html.escape(v.question)}</b><p><span class='answer {v.answer}'>{v.answer}</span>: "
                 f"{html.escape(v.key)}. {html.escape(v.text.rstrip('.'))}.</p>"
                 + (f"<p class='details'>{v.details}</p>" if v.details else "") + "</div>")
    h.append("<h2>Summary</h2><p>Per model at its largest width (all eval sets, steps after initialisation; "
             "<code>rel_bias</code>: the bias of the mean with the noise removed, relative to RMS(mu), and the upper end "
             "of its 95% interval); <a href='summary.csv'>summary.csv</a>, every other number per model in "
             "<a href='details.csv'>details.csv</a>, the exponents in width per step and manifold in "
             "<a href='width_fit.csv'>width_fit.csv</a>; <a href='verdicts.json'>verdicts.json</a>.</p>")
    h.append(_table_html(summary, "summary"))
    h.append("<h2>Plots</h2>")
    for fname, caption in figures:
        h.append(f"<figure><img src='{fname}' alt='{html.escape(fname)}'><figcaption>{html.escape(caption)}</figcaption></figure>")
    h.append("<h2>Convergence in width</h2><p>Exponent of the bias of the mean in width (noise removed, 95% interval) and "
             "the slope of log relative error against log width, pooled over steps after initialisation (per step: "
             "<code>analysis/convergence.csv</code>).</p>")
    h.append(_table_html(conv[["model", "eval_set", "widths", "slope_err", "exponent_bias", "exponent_bias_lo",
                               "exponent_bias_hi", "rel_err_largest", "rel_noise_largest"]], "convergence"))
    h += _finite_invariance(s, rdir)
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
<li>Noise removed, with 95% intervals (docs/theory.md §5.4, §5.6): over any pool of points, E = sum (mean - mu)^2 and S = sum SE^2;
E - S estimates the squared systematic part B^2. Where the results store blocks of independent draws (8 or more), the estimate
is the blocks' unbiased one and the interval the delete-one-block jackknife's (Student t), which holds whatever the correlation
between points; otherwise it is every B^2 &ge; 0 with |E - S - B^2| &le; 1.96 sqrt(2 S^2 + var(S) + 4 B^2 S), the noise variance
of E when all points are perfectly correlated. The <code>interval</code> column of the tables says which. Relative sizes divide by RMS(mu). The same for pair gaps (mean_A - mean_B, relative to RMS of both
analytic means) and orbit spreads. The exponent in width is a weighted least-squares fit of log B against log width over the
widths whose B is resolved.</li>
<li>Answers: <b>differs</b> when an interval excludes 0 (at the final step or pooled over steps); <b>agrees</b> when it does not
and its upper end is at most {POWER_REL:.0%} (for the theorem: at least one of the family's positive controls, pairs whose analytic
means differ by more than 5%, is resolved at &ge; {CONTROL_RESOLVE_SE:g} combined SE at the largest width); <b>inconclusive</b> otherwise.
A theorem gap that differs is also fitted against width (its exponent: a gap that exists only at finite width falls towards 0).
Theorem pairs have analytic means equal to {THEOREM_RTOL:g}. Exponent: agrees when its interval holds -1 and not 0.</li>
<li>Orbit spread: RMS over g of (mean(L_g x) - orbit average) / RMS(mean); the noise level is
sqrt(sum var(d_j) / M) / RMS(mean), with d_j a member's prediction minus its own orbit average.</li>
<li>Details: median |z| is flagged above {Z_AGREE_FACTOR} x null; a gap is resolved above {RESOLVE_SE:g} SE.</li>
<li>Tables: <code>analysis/*.parquet</code> and <code>.csv</code> (the per-point table <code>points</code> as Parquet only).</li>
</ul></div>""")
    h.append("</body></html>")
    page = rdir / "index.html"
    with atomic_path(page) as tmp:
        tmp.write_text("\n".join(h))
    return page
