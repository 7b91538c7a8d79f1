"""The report: plots, a summary table and one verdict per question, as ``DIR/report/index.html``.

Every statement in a verdict is computed from the analysis tables (``analysis.compare``,
``analysis.summary``, ``analysis.verdicts``); the thresholds that turn numbers into words are
constants of ``analysis.verdicts``, and the page states them. The page needs nothing but the
PNG files (``analysis.plots``) beside it.
"""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd

from study.atomic import atomic_path

from . import plots, verdicts
from .summary import Summary, fmt, summary_table
from .verdicts import GAP_SE_LIMIT, NOISE_FLOOR_FACTOR, RESOLVE_SE, Z_AGREE_FACTOR

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
    return "<div class='scroll'>" + df.to_html(index=False, classes=cls, border=0, na_rep="n/a", float_format=lambda x: fmt(x),
                      escape=True) + "</div>"


def write_report(out: Path, tables: dict[str, pd.DataFrame], resolved: dict) -> Path:
    """Write ``out/report/``: ``index.html``, ``summary.csv`` and the plots' PNG files; returns the page."""
    out = Path(out)
    rdir = out / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    for name in plots.PLOTS:  # a plot that has nothing to show this time must not survive from an earlier report
        (rdir / f"{name}.png").unlink(missing_ok=True)
    s = Summary(tables, resolved)
    summary = summary_table(s)
    with atomic_path(rdir / "summary.csv") as tmp:
        summary.to_csv(tmp, index=False)

    figures = []
    for name, draw in plots.PLOTS.items():
        caption = draw(s, rdir / f"{name}.png")
        if caption:
            figures.append((f"{name}.png", caption))

    questions = [
        ("Does the finite ensemble agree with theory at the largest width?", lambda: verdicts.agreement(s)),
        ("Does the error fall with width?", lambda: verdicts.width(s, summary)),
        ("Does the augmentation theorem hold at finite width?", lambda: verdicts.theorem(s)),
        ("Does invariance emerge in the augmented ensembles' mean?", lambda: verdicts.invariance(s)),
        ("Does escnn's default basis differ from the canonical GCNN, and do the ensembles resolve it?",
         lambda: verdicts.escnn(s)),
    ]
    nothing = "No ensemble has a finished unit yet, so nothing can be measured (see the units below)."
    answers = [(q, answer() if len(tables["points"]) else nothing) for q, answer in questions]
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
    for q, text in answers:
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
