"""The report of a kernel-regression study: learning curves (PNG), a table of means with 95%
confidence intervals, paired differences on the same draws, and verdicts computed from them,
as ``DIR/report/index.html`` (same style as ``analysis.report``)."""

from __future__ import annotations

import html
import json
import math
from pathlib import Path

import pandas as pd

from study.atomic import atomic_path

from .plots import figure
from .regression import is_regression_table, paired_differences, summarize

_STYLE = """<style>
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;font-size:13px}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}
.verdict{background:#f4f6fa;border-left:4px solid #4a6fa5;padding:.4em 1em;margin:.8em 0}
.scroll{overflow-x:auto}img{max-width:100%}</style>"""


def _t(t) -> str:
    return "inf" if math.isinf(float(t)) else f"{float(t):g}"


def _fmt(x, digits=3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}g}"


# (column, axis label) of the two rows of learning-curve panels
_PLOTTED = {False: (("test_accuracy", "test accuracy"), ("test_mse", "test MSE")),
            True: (("test_mae", "test MAE (meV)"), ("test_rmse", "test RMSE (meV)"))}
# energies are stored in eV and plotted in meV, the unit of QM9 learning curves
_SCALE = {False: 1.0, True: 1000.0}


def plot_learning_curves(summary: pd.DataFrame, path: Path) -> str:
    regression = "test_mae" in summary.columns
    plotted = _PLOTTED[regression]
    c = _SCALE[regression]
    panels = list(dict.fromkeys(zip(summary.kernel, summary.time)))
    # a column per (kernel, time), a row per metric; matplotlib's default sizes (style={})
    titles = [f"{k.upper()}, t = {_t(t)}" for k, t in panels] * len(plotted)
    with figure(path, len(plotted) * len(panels), ncols=len(panels), panel=(4.5, 3.5), titles=titles, dpi=110,
                style={}) as (fig, axes):
        for j, (k, t) in enumerate(panels):
            sub = summary[(summary.kernel == k) & (summary.time == t)]
            for model, g in sub.groupby("model", sort=False):
                g = g.sort_values("size")
                for i, (m, _) in enumerate(plotted):
                    ax = axes[i, j]
                    line, = ax.plot(g["size"], c * g[m], marker="o", ms=3, label=model)
                    ax.fill_between(g["size"], c * g[f"{m}_lo"], c * g[f"{m}_hi"], color=line.get_color(), alpha=0.2)
            if regression and "baseline_mae" in sub.columns:
                # the baseline is fitted on the same draws for every model: show it once
                g = sub[sub.model == sub.model.iloc[0]].sort_values("size")
                for i, m in enumerate(("baseline_mae", "baseline_rmse")):
                    axes[i, j].plot(g["size"], c * g[m], ls="--", color="0.5", label="baseline alone")
            for i, (_, label) in enumerate(plotted):
                ax = axes[i, j]
                ax.set_xscale("log")
                if i == 1 or regression:
                    ax.set_yscale("log")
                ax.set_xlabel("training-set size")
                ax.set_ylabel(label)
                ax.grid(alpha=0.3)
        axes[0, 0].legend(fontsize=8)
        fig.suptitle("Kernel regression learning curves (mean and 95% CI over draws)")
    return path.name


def verdicts(summary: pd.DataFrame, pairs: pd.DataFrame) -> list[tuple[str, str]]:
    """Which model wins at which sizes, per kernel and time, from the numbers."""
    out = []
    for (k, t), sub in summary.groupby(["kernel", "time"], sort=False):
        parts = []
        for size, g in sub.groupby("size"):
            g = g.sort_values("test_accuracy", ascending=False)
            best = g.iloc[0]
            tied = g[(g.test_accuracy - best.test_accuracy).abs() < 1e-9]
            rest = g[(g.test_accuracy - best.test_accuracy).abs() >= 1e-9]
            text = f"n = {size}: {' = '.join(tied.model)} {100 * best.test_accuracy:.1f}%"
            if len(rest):
                second = rest.iloc[0]
                pr = pairs[(pairs.metric == "test_accuracy") & (pairs.time == t) & (pairs["size"] == size)
                           & (pairs.a_kernel == k) & (pairs.b_kernel == k)
                           & (((pairs.a_model == best.model) & (pairs.b_model == second.model))
                              | ((pairs.a_model == second.model) & (pairs.b_model == best.model)))]
                sig = bool(pr.significant.iloc[0]) if len(pr) else False
                text += (f" vs {second.model} {100 * second.test_accuracy:.1f}%"
                         + (" (paired 95% CI excludes 0)" if sig else " (not significant)"))
            parts.append(text)
        out.append((f"{k.upper()} regression, t = {_t(t)}: best test accuracy at each size", "; ".join(parts) + "."))
    # NTK against NNGP per model
    kp = pairs[(pairs.metric == "test_accuracy") & (pairs.a_model == pairs.b_model)]
    if len(kp):
        parts = []
        for (m, t), g in kp.groupby(["a_model", "time"], sort=False):
            better = (g.significant & (g.mean_diff > 0)).sum()
            worse = (g.significant & (g.mean_diff < 0)).sum()
            parts.append(f"{m} (t = {_t(t)}): NTK better at {better}, NNGP better at {worse} of {len(g)} sizes")
        out.append(("NTK against NNGP (paired, significant accuracy differences)", "; ".join(parts) + "."))
    return out


def regression_verdicts(summary: pd.DataFrame, pairs: pd.DataFrame) -> list[tuple[str, str]]:
    """For regression targets: the lowest test MAE at each size with the paired difference
    to the runner-up (eV, 95% CI over draws), and a tally per pair of models."""
    out = []
    for (k, t), sub in summary.groupby(["kernel", "time"], sort=False):
        parts = []
        for size, g in sub.groupby("size"):
            g = g.sort_values("test_mae")
            best = g.iloc[0]
            text = f"n = {size}: {best.model} {best.test_mae:.3f} eV"
            if len(g) > 1:
                second = g.iloc[1]
                text += f" vs {second.model} {second.test_mae:.3f} eV"
                pr = pairs[(pairs.metric == "test_mae") & (pairs.time == t) & (pairs["size"] == size)
                           & (pairs.a_kernel == k) & (pairs.b_kernel == k)
                           & (pairs.a_model == best.model) & (pairs.b_model == second.model)]
                sign = 1.0
                if not len(pr):  # the pair is stored the other way round
                    pr = pairs[(pairs.metric == "test_mae") & (pairs.time == t) & (pairs["size"] == size)
                               & (pairs.a_kernel == k) & (pairs.b_kernel == k)
                               & (pairs.a_model == second.model) & (pairs.b_model == best.model)]
                    sign = -1.0
                if len(pr):
                    r = pr.iloc[0]
                    lo, hi = sorted((sign * r.ci_lo, sign * r.ci_hi))
                    text += (f", difference {sign * r.mean_diff:+.3f} eV [{_fmt(lo, 3)}, {_fmt(hi, 3)}]"
                             + (" (paired 95% CI excludes 0)" if r.significant else " (not significant)"))
            if "baseline_mae" in g.columns:
                text += f"; baseline alone {best.baseline_mae:.3f} eV"
            parts.append(text)
        out.append((f"{k.upper()} regression, t = {_t(t)}: lowest test MAE at each size", "; ".join(parts) + "."))
    mp = pairs[(pairs.metric == "test_mae") & (pairs.a_kernel == pairs.b_kernel) & (pairs.a_model != pairs.b_model)]
    if len(mp):
        parts = []
        for (a, b, k, t), g in mp.groupby(["a_model", "b_model", "a_kernel", "time"], sort=False):
            lower = (g.significant & (g.mean_diff < 0)).sum()
            higher = (g.significant & (g.mean_diff > 0)).sum()
            parts.append(f"{a} - {b} ({k.upper()}, t = {_t(t)}): {a} significantly lower MAE at {lower}, "
                         f"higher at {higher} of {len(g)} sizes")
        out.append(("Pairs of models (paired test-MAE differences on the same draws)", "; ".join(parts) + "."))
    kp = pairs[(pairs.metric == "test_mae") & (pairs.a_model == pairs.b_model)]
    if len(kp):
        parts = []
        for (m, t), g in kp.groupby(["a_model", "time"], sort=False):
            better = (g.significant & (g.mean_diff < 0)).sum()
            worse = (g.significant & (g.mean_diff > 0)).sum()
            parts.append(f"{m} (t = {_t(t)}): NTK better at {better}, NNGP better at {worse} of {len(g)} sizes")
        out.append(("NTK against NNGP (paired, significant MAE differences)", "; ".join(parts) + "."))
    return out


def _table_html(df: pd.DataFrame) -> str:
    return "<div class='scroll'>" + df.to_html(index=False, border=0, na_rep="n/a",
                                               float_format=lambda x: _fmt(x, 4)) + "</div>"


def write_regression_report(out: Path) -> Path:
    out = Path(out)
    table = pd.read_parquet(out / "regression.parquet")
    resolved = json.loads((out / "study.json").read_text())
    cfg = resolved["config"]
    summary = summarize(table)
    pairs = paired_differences(table)
    rdir = out / "report"
    rdir.mkdir(exist_ok=True)
    fig = plot_learning_curves(summary, rdir / "learning_curves.png")
    seconds = []
    for meta in sorted((out / "kernels").glob("*.json")):
        m = json.loads(meta.read_text())
        if m["model"] in set(table.model):
            seconds.append(f"{m['model']} {m['seconds']:.0f} s")
    regression = is_regression_table(table)
    main_metric = "test_mae" if regression else "test_accuracy"
    shown = summary.copy()
    shown["time"] = shown["time"].map(_t)
    for m in [c for c in shown.columns if f"{c}_lo" in shown.columns]:
        shown[m] = [f"{v:.4f} [{lo:.4f}, {hi:.4f}]" for v, lo, hi in zip(shown[m], shown[f"{m}_lo"], shown[f"{m}_hi"])]
        shown = shown.drop(columns=[f"{m}_lo", f"{m}_hi"])
    sig = pairs[pairs.metric == main_metric].copy()
    sig["time"] = sig["time"].map(_t)
    r = cfg["regression"]
    h = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>eqntk kernel regression: {html.escape(cfg['name'])}</title>",
         _STYLE, "</head><body>",
         f"<h1>eqntk kernel regression: {html.escape(cfg['name'])}</h1>",
         f"<p>data digest {html.escape(resolved['data_digest'])}; group {html.escape(cfg['group'])}; "
         f"sizes {html.escape(str(resolved['sizes']))}, {r['draws']} draws each; kernels {html.escape(str(r['kernels']))}; "
         f"times {html.escape(str(r['times']))}; diag_reg {r['diag_reg']:g} (relative to the mean diagonal); "
         f"kernel time: {html.escape(', '.join(seconds) or 'n/a')}.</p>"]
    h.append("<h2>Verdicts</h2>")
    for q, text in (regression_verdicts if regression else verdicts)(summary, pairs):
        h.append(f"<div class='verdict'><b>{html.escape(q)}</b><p>{html.escape(text)}</p></div>")
    what = ("Test MAE and RMSE (meV) against the training-set size; the dashed line is the baseline alone"
            if regression else "Test accuracy and MSE against the training-set size")
    h.append(f"<figure><img src='{fig}' alt='learning curves'><figcaption>{what}; bands are 95% confidence "
             "intervals over draws.</figcaption></figure>")
    if regression:
        h.append(f"<p>Targets: energies in eV; baseline {html.escape(str(r.get('baseline') or 'per_element'))}, fitted on "
                 "each draw's training molecules, the kernel regresses what it leaves. Molecule kernels are per-atom "
                 "kernels summed over both molecules' atoms.</p>")
    h.append("<h2>Learning curves (mean [95% CI] over draws)</h2>" + _table_html(shown))
    label = "test MAE, eV" if regression else "test accuracy"
    h.append(f"<h2>Paired differences in {label} (a - b, same draws)</h2>" + _table_html(sig))
    h.append("</body></html>")
    page = rdir / "index.html"
    with atomic_path(page) as tmp:
        tmp.write_text("\n".join(h))
    return page
