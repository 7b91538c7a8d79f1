"""README.md's numbers, tables and figures, rendered from results directories.

    .venv/bin/python scripts/readme.py --builtin DIR [--so3 DIR] [--regression DIR] [--molecules DIR] [--invariance DIR]
    .venv/bin/python scripts/readme.py --check --builtin DIR ...   # exit 1 naming the stale blocks
    .venv/bin/python scripts/readme.py --run [builtin so3 regression molecules invariance]

Each block of README.md between ``<!-- generated: NAME -->`` and ``<!-- end generated: NAME -->``
is rewritten from a results directory's own outputs; the text around the blocks stays as it is
written. The same directory gives the same bytes: timings are the recorded ones, and the one
thing read from the clock, the load average when the blocks were generated, sits on a comment
line that ``--check`` does not compare.

``--run`` runs the committed studies (``eqntk run STUDY --out TMP``) into a fresh temporary
directory first and records beside each one, in ``readme_run.json``, what a results directory
does not hold: wall seconds end to end, the largest process's peak memory, the report's seconds,
the machine and its load average before the run.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd
import torch

from analysis.compare import pooled_gaps
from analysis.regression import DESCRIPTOR_ARCHS, ci95
from analysis.summary import fmt
from eqntk.plan import Resources, current_load, plan_study

ROOT = Path(__file__).resolve().parent.parent
STUDIES = {name: ROOT / "study" / "builtin" / f"{name}.yaml" for name in ("builtin", "so3", "regression", "molecules",
                                                                                "invariance", "pairing", "qm9")}
RUN_RECORD = "readme_run.json"  # written by --run beside the results it measured
IGNORED = re.compile(r"^<!-- load average.*-->\n", re.M)  # the one clock reading: not compared


class BadInput(Exception):
    """One line naming the field and the fix."""


def block_pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- generated: {re.escape(name)} -->\n)(.*?)(<!-- end generated: {re.escape(name)} -->)", re.S)


# ----- numbers as the README shows them ------------------------------------------------------
def fixed(digits: int) -> Callable:
    """``x`` with ``digits`` decimals; very small non-zero values as one significant digit (2e-8)."""
    def f(x) -> str:
        if x is None or pd.isna(x):
            return "n/a"
        x = float(x)
        if x != 0 and abs(x) < 10 ** -digits:
            return f"{x:.0e}".replace("e-0", "e-").replace("e+0", "e+")
        return f"{x:.{digits}f}"
    return f


def sig3(x) -> str:
    """Three significant digits (the report's format), integers as integers."""
    if x is None or pd.isna(x):
        return "n/a"
    if isinstance(x, (int, np.integer)) or (isinstance(x, float) and x.is_integer() and abs(x) < 1e6):
        return str(int(x))
    return fmt(x) if isinstance(x, (float, np.floating)) else str(x)


def percent(x) -> str:
    return "n/a" if x is None or pd.isna(x) else f"{100 * float(x):.0f}%"


def percent2(x) -> str:
    """Two significant digits below 10%, whole percent above."""
    if x is None or pd.isna(x):
        return "n/a"
    v = 100 * float(x)
    return f"{v:.0f}%" if abs(v) >= 10 or v == 0 else f"{v:.2g}%"


def seconds(s) -> str:
    s = float(s)
    if s < 100:
        return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"
    m, r = divmod(round(s), 60)
    return f"{m} min {r} s"


def cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def markdown_table(header: list[str], rows: list[list[str]], right: list[bool]) -> str:
    lines = ["| " + " | ".join(cell(h) for h in header) + " |",
             "|" + "|".join("---:" if r else "---" for r in right) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# ----- the ensemble summary table (report/summary.csv) ---------------------------------------
# Known columns: header and format; a value shown with its reference in brackets names both.
# Columns not listed here are rendered under their own name, so a new column is never dropped.
SUMMARY_COLUMNS = {
    "model": ("model", str, None),
    "width": ("width", sig3, None),
    "members": ("members", sig3, None),
    "draws": ("draws", sig3, None),
    "median_abs_z": ("median |z| (null)", fixed(2), "median_abs_z_null"),
    "frac_abs_z_lt2": ("|z| < 2 (null)", percent, "frac_abs_z_lt2_null"),
    "median_abs_z_theory_se": ("median |z|, analytic SE", fixed(2), None),
    "rel_err": ("rel err (noise)", fixed(3), "rel_noise"),
    "rel_bias": ("rel bias (95% upper end)", percent2, "rel_bias_hi"),
    "slope_err": ("slope vs width", fixed(2), None),
    "slope_bias": ("bias slope", fixed(2), None),
    "orbit_spread": ("orbit spread (noise)", fixed(3), "spread_noise"),
    "var_ratio": ("var ratio", sig3, None),
}
# The model's own description (its name stands for it; the study file has the rest) and the
# references shown in brackets beside their value.
SUMMARY_HIDDEN = {"arch", "group", "support", "basis", "augmentation", "loss", "optimizer", "batch_size"} | {
    ref for _, _, ref in SUMMARY_COLUMNS.values() if ref}


def summary_block(path: Path) -> str:
    """One row per model at its largest width, the columns of ``summary.csv`` in its order."""
    df = pd.read_csv(path)
    if "lr" in df.columns and not df["model"].duplicated().any():
        df = df.drop(columns="lr")  # one learning rate per model: the study file says which
    header, right, columns = [], [], []
    for c in df.columns:
        if c in SUMMARY_HIDDEN:
            continue
        name, f, ref = SUMMARY_COLUMNS.get(c, (c, sig3, None))
        if ref and ref not in df.columns:  # its reference is gone: the value alone, no brackets
            name, ref = name.split(" (")[0], None
        header.append(name)
        right.append(c != "model" and pd.api.types.is_numeric_dtype(df[c]))
        columns.append((c, f, ref))
    rows = [[f(r[c]) + (f" ({f(r[ref])})" if ref else "") for c, f, ref in columns] for _, r in df.iterrows()]
    return markdown_table(header, rows, right)


# ----- the built-in study's blocks ------------------------------------------------------------
def verdicts_block(out: Path, name: str = "verdicts.json") -> str:
    path = out / "report" / name
    if not path.is_file():
        return (f"*No verdicts: this results directory has no `report/{name}` (the report "
                "writes one per question); see `report/index.html`.*\n")
    try:
        items = json.loads(path.read_text())
        assert isinstance(items, list) and all(isinstance(v, dict) and "text" in v for v in items)
    except (ValueError, AssertionError):
        raise BadInput(f"--builtin: {path} is not a list of {{question, answer, key, text}} objects; rerun `eqntk report {out}`")
    lines = []
    for v in items:
        text = " ".join(html.unescape(str(v["text"])).split())
        key = str(v.get("key") or "").strip()
        parts = [f"**{v['question'].strip()}**" if v.get("question") else "",
                 f"*{v['answer'].strip()}*" + (f" ({key})" if key and key not in text else "") + ":" if v.get("answer") else "",
                 text]
        lines.append("- " + " ".join(p for p in parts if p))
    return "\n".join(lines) + "\n"


def unit_records(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((out / "units").glob("*.json"))]


def machine() -> dict:
    """This machine, as the run facts name it."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    return dict(platform=platform.platform(), cpus=os.cpu_count(), memory_gib=round(mem / 2**30) if mem else None, gpu=gpu)


def load_average() -> Optional[list[float]]:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def run_record(out: Path) -> dict:
    p = out / RUN_RECORD
    return json.loads(p.read_text()) if p.is_file() else {}


def machine_words(m: dict) -> str:
    words = [f"{m['cpus']} CPUs"]
    if m.get("memory_gib"):
        words.append(f"{m['memory_gib']} GiB")
    words.append(f"GPU {m['gpu']}" if m.get("gpu") else "no GPU")
    return f"{m['platform']}, " + ", ".join(words)


def run_facts(out: Path) -> str:
    """Where and how long: the recorded seconds, the machine (recorded by --run, else this one)."""
    rec = run_record(out)
    lines = []
    units = unit_records(out)
    if units:
        status = pd.Series([u.get("status", "?") for u in units]).value_counts()
        secs = [float(u["seconds"]) for u in units if u.get("seconds") is not None]
        devices = sorted({u.get("device", "?") for u in units})
        text = f"training: {len(units)} units ({', '.join(f'{n} {s}' for s, n in sorted(status.items()))}), "
        if rec.get("training_seconds") is not None:
            text += f"{seconds(rec['training_seconds'])} wall, "
        text += f"{seconds(sum(secs))} summed over units (longest {seconds(max(secs))}), on {', '.join(devices)}"
        lines.append(text)
    manifest = out / "analysis" / "manifest.json"
    if manifest.is_file():
        s = json.loads(manifest.read_text()).get("seconds", {})
        steps = sorted((k for k in s if k != "total"), key=lambda k: (["read", "theory", "compare"] + [k]).index(k))
        parts = [f"{k} {seconds(s[k])}" for k in steps]
        lines.append(f"analysis: {seconds(s['total'])}" + (f" ({', '.join(parts)})" if parts else ""))
    kernels = sorted((out / "kernels").glob("*.json")) if (out / "kernels").is_dir() else []
    if kernels:
        metas = [json.loads(p.read_text()) for p in kernels]
        order = {m["name"]: i for i, m in enumerate(json.loads((out / "study.json").read_text())["config"]["models"])}
        metas.sort(key=lambda m: order.get(m["model"], len(order)))
        lines.append("kernels: " + ", ".join(f"{m['model']} {seconds(m['seconds'])}" for m in metas)
                     + f", {seconds(sum(m['seconds'] for m in metas))} in all")
    if rec.get("report_seconds") is not None:
        lines.append(f"report: {seconds(rec['report_seconds'])}")
    if rec.get("wall_seconds") is not None:
        lines.append(f"end to end: {seconds(rec['wall_seconds'])}")
    if rec.get("peak_rss_bytes"):
        lines.append(f"peak memory: {rec['peak_rss_bytes'] / 1e9:.1f} GB (largest process)")
    m = rec.get("machine") or machine()
    lines.append(f"machine: {machine_words(m)}"
                 + (f"; load average before the run {', '.join(map(str, rec['load_average']))} (1, 5, 15 min)"
                    if rec.get("load_average") else ""))
    text = "".join(f"- {line}\n" for line in lines)
    if not rec.get("load_average") and load_average():
        text += f"<!-- load average when generated: {', '.join(map(str, load_average()))} (1, 5, 15 min) -->\n"
    return text


FIGURES = {
    "trajectories": "Ensemble means against the analytic NTK prediction over training time",
    "error_vs_width": "Error of the ensemble mean against width, per eval set",
}


def figure_block(out: Path, name: str, prefix: str) -> tuple[str, dict[str, Path]]:
    src = out / "report" / f"{name}.png"
    if not src.is_file():
        raise BadInput(f"--{prefix}: {src} not found; run `eqntk report {out}` first")
    target = f"docs/img/{prefix}_{name}.png"
    return f"![{FIGURES[name]}]({target})\n", {target: src}


# ----- the SO(3) ensemble study ---------------------------------------------------------------
def gaps_block(out: Path) -> str:
    """Measured against predicted gap of each pair at its largest common width, per eval set
    (combined SE, pooled over the logged steps after initialisation)."""
    p = pd.read_csv(out / "analysis" / "pairs.csv")
    if not len(p):
        return ""
    top = p.groupby(["a", "b"])["width"].transform("max")
    g = pooled_gaps(p[p["width"] == top], ["a", "b", "width", "eval_set"])
    cfg = json.loads((out / "study.json").read_text())["config"]
    order = ["train"] + [e["name"] for e in cfg["data"].get("eval", [])]  # the study's order
    order = [e for e in order if e in set(p["eval_set"])] + sorted(set(p["eval_set"]) - set(order))
    pairs = list(dict.fromkeys(zip(p["a"], p["b"])))
    rows = []
    for a, b in pairs:
        sub = g[(g["a"] == a) & (g["b"] == b)].set_index("eval_set")
        rows.append([f"{a} vs {b}", sig3(sub["width"].iloc[0])]
                    + [f"{fixed(2)(sub.loc[e, 'gap_se'])} ({fixed(2)(sub.loc[e, 'theory_gap_se'])})" if e in sub.index
                       else "n/a" for e in order])
    return ("Gap between the two ensembles' means in combined SE, measured (predicted by the analytic means):\n\n"
            + markdown_table(["pair", "width"] + order, rows, [False] + [True] * (1 + len(order))))


# ----- emergent invariance at finite width (study/builtin/invariance.yaml) ----------------------
def invariance_table(out: Path) -> str:
    """Per augmented model and manifold, pooled over steps after initialisation: the analytic
    mean's orbit spread, the measured systematic spread at each width with its 95% interval, and
    the exponent in width of their difference (``report/invariance_width.csv``, ``invariance_fit.csv``)."""
    w = pd.read_csv(need(out / "report" / "invariance_width.csv", "--invariance", f"run `eqntk report {out}` first"))
    f = pd.read_csv(out / "report" / "invariance_fit.csv")
    w, f = w[w["step"].isna()], f[f["step"].isna()]
    widths = sorted(w["width"].unique())
    rows = []
    for (model, man), g in w.groupby(["model", "manifold"], sort=False):
        g = g.set_index("width")
        fit = f[(f["model"] == model) & (f["manifold"] == man)]
        exp = (f"{fixed(2)(fit['exponent'].iloc[0])} [{fixed(2)(fit['exponent_lo'].iloc[0])}, {fixed(2)(fit['exponent_hi'].iloc[0])}]"
               if len(fit) and pd.notna(fit["exponent"].iloc[0]) else "n/a")
        first = g.iloc[0]
        analytic = first["analytic"]
        if bool(first["jointly_invariant"]) and analytic < 1e-9:  # round-off of an invariant kernel
            analytic = f"0 ({analytic:.0e})"
        else:
            analytic = percent2(analytic)
        rows.append([model, str(first["filter_support"]), str(first["tap_variance"]), man, sig3(int(first["draws"])), analytic]
                    + [f"{percent2(g.loc[x, 'sys'])} [{percent2(g.loc[x, 'sys_lo'])}, {percent2(g.loc[x, 'sys_hi'])}]"
                       if x in g.index else "n/a" for x in widths] + [exp])
    header = (["model", "filter support", "tap variance", "manifold", "draws", "analytic"]
              + [f"width {sig3(x)}" for x in widths] + ["exponent of |measured - analytic|"])
    return markdown_table(header, rows, [False] * 4 + [True] * (len(header) - 4))


def invariance_blocks(out: Path) -> dict[str, str]:
    need(out / "study.json", "--invariance", "give a results directory of `eqntk run study/builtin/invariance.yaml`")
    return {"invariance-run": run_facts(out), "invariance-table": invariance_table(out),
            "invariance-verdicts": verdicts_block(out, "invariance.json")}


# ----- antithetic pairs against independent members (study/builtin/pairing.yaml) ---------------
def pairing_table(out: Path) -> str:
    """Per family and width, pooled over the logged steps after initialisation and the eval sets:
    the independent ensemble's squared standard error over the antithetic pairs' at equal member
    count, and the gap between the two means (both unbiased: about 1 combined SE, and a relative
    size whose 95% interval holds 0)."""
    p = pd.read_parquet(need(out / "analysis" / "pairs.parquet", "--pairing", f"run `eqntk analyze {out}` first"))
    p = p[p["kind"] == "pairing"]
    g = pooled_gaps(p, ["a", "b", "width"])
    rows = [[b, sig3(r["width"]), sig3(int(r["members_b"])), fixed(1)(r["se2_ratio"]), fixed(2)(r["gap_se"]),
             f"{percent2(r['rel_gap_est'])} [{percent2(r['rel_gap_lo'])}, {percent2(r['rel_gap_hi'])}]"]
            for (a, b), sub in g.groupby(["a", "b"], sort=False) for _, r in sub.sort_values("width").iterrows()]
    return markdown_table(["model (pairs)", "width", "members", "SE^2 independent / pairs", "gap (combined SE)",
                           "relative gap [95% CI]"], rows, [False, True, True, True, True, True])


def pairing_blocks(out: Path) -> dict[str, str]:
    need(out / "study.json", "--pairing", "give a results directory of `eqntk run study/builtin/pairing.yaml`")
    return {"pairing-run": run_facts(out), "pairing-table": pairing_table(out)}


# ----- kernel-regression studies ----------------------------------------------------------------
def regression_tables(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    s, p = out / "regression_summary.csv", out / "regression_pairs.csv"
    if not s.is_file() or not p.is_file():
        raise BadInput(f"DIR: {out} has no regression_summary.csv / regression_pairs.csv; run `eqntk run STUDY --out {out}`")
    cfg = json.loads((out / "study.json").read_text())["config"]
    return pd.read_csv(s), pd.read_csv(p), cfg


def metric_of(summary: pd.DataFrame) -> tuple[str, Callable, str]:
    """The main metric, its cell format and its unit."""
    if "test_mae" in summary.columns:
        return "test_mae", lambda m, lo, hi: f"{m:.3f}" + (f" [{lo:.2f}, {hi:.2f}]" if np.isfinite(hi) else ""), "eV"
    return ("test_accuracy",
            lambda m, lo, hi: f"{100 * m:.1f}" + (f" ± {100 * (hi - m):.1f}" if np.isfinite(hi) else ""), "points")


def same_models(summary: pd.DataFrame, metric: str) -> list[list[str]]:
    """Models whose summaries coincide (cnn_aug and gcnn: docs/theory.md §6), in study order."""
    groups: list[list[str]] = []
    rows = {m: g.sort_values(["kernel", "time", "size"])[metric].to_numpy() for m, g in summary.groupby("model", sort=False)}
    for m, v in rows.items():
        for g in groups:
            if np.allclose(rows[g[0]], v, rtol=0, atol=1e-9):
                g.append(m)
                break
        else:
            groups.append([m])
    return groups


def t_label(t) -> str:
    return "inf" if math.isinf(float(t)) else f"{float(t):g}"


def regression_table(out: Path) -> str:
    summary, _, cfg = regression_tables(out)
    metric, f, unit = metric_of(summary)
    groups = same_models(summary, metric)
    panels = list(dict.fromkeys(zip(summary["kernel"], summary["time"])))
    several_times = len({t for _, t in panels}) > 1
    header = [("training molecules" if unit == "eV" else "n")]
    cols = []
    for k, t in panels:
        for g in groups:
            header.append(f"{' = '.join(g)} {k.upper()}" + (f", t = {t_label(t)}" if several_times else ""))
            cols.append((g[0], k, t))
    rows = []
    for size in sorted(summary["size"].unique()):
        row = [str(size)]
        for m, k, t in cols:
            r = summary[(summary["model"] == m) & (summary["kernel"] == k) & (summary["time"] == t) & (summary["size"] == size)]
            r = r.iloc[0]
            hi = r[f"{metric}_hi"] if r["draws"] > 1 else float("nan")
            row.append(f(r[metric], r[f"{metric}_lo"], hi))
        rows.append(row)
    draws = cfg["regression"]["draws"]
    what = ("Test MAE in eV, mean [95% CI]" if unit == "eV" else "Test accuracy (%), mean ± 95% CI half-width")
    return (f"{what} over {draws} draws (one draw where the size is the whole pool):\n\n"
            + markdown_table(header, rows, [True] * len(header)))


def signed(x: float, digits: int) -> str:
    """``+1.2``, ``-0.3``; zero at this precision as ``0.0`` (never ``-0.0``)."""
    r = round(float(x), digits)
    return f"{r:+.{digits}f}" if r != 0 else f"{0:.{digits}f}"


def span(values: np.ndarray, scale: float, digits: int) -> str:
    lo, hi = signed(scale * np.min(values), digits), signed(scale * np.max(values), digits)
    return lo if lo == hi else f"{lo} to {hi}"


def regression_pairs(out: Path) -> str:
    """Paired differences (same draws) between distinct models under each kernel, and NTK
    against NNGP for each model: their range over sizes and where the paired 95% CI excludes 0."""
    summary, pairs, _ = regression_tables(out)
    metric, _, unit = metric_of(summary)
    scale, digits = (1.0, 3) if unit == "eV" else (100.0, 1)
    groups = same_models(summary, metric)
    name = {g[0]: " = ".join(g) for g in groups}
    p = pairs[pairs["metric"] == metric]
    lines = []

    def describe(rows: pd.DataFrame, label: str) -> str:
        rows = rows.sort_values("size")
        multi = rows[rows["draws"] > 1]
        text = f"- {label}: {span(rows['mean_diff'], scale, digits)} {unit}"
        if len(multi):
            big = multi.loc[multi["mean_diff"].abs().idxmax()]
            sig = multi[multi["significant"].astype(bool)]["size"].tolist()
            text += (f" (largest {signed(scale * big['mean_diff'], digits)} at n = {big['size']}); paired 95% CI excludes 0 at "
                     + (f"n = {', '.join(map(str, sig))} ({len(sig)} of" if sig else "none of")
                     + f" the {len(multi)} sizes with {int(multi['draws'].max())} draws" + (")" if sig else ""))
        single = rows[rows["draws"] <= 1]
        if len(single):
            text += "; " + ", ".join(f"{signed(scale * r['mean_diff'], digits)} at n = {r['size']} (one draw)"
                                     for _, r in single.iterrows())
        return text + "\n"

    kernels = list(dict.fromkeys(p["a_kernel"]))

    def rows_of(a: str, b: str, ka: str, kb: str, t) -> pd.DataFrame:
        """Differences first minus second, whichever way round the table stores the pair."""
        sel = p[(p["a_model"] == a) & (p["b_model"] == b) & (p["a_kernel"] == ka) & (p["b_kernel"] == kb) & (p["time"] == t)]
        if len(sel) or (a, ka) == (b, kb):
            return sel
        sel = p[(p["a_model"] == b) & (p["b_model"] == a) & (p["a_kernel"] == kb) & (p["b_kernel"] == ka) & (p["time"] == t)]
        return sel.assign(mean_diff=-sel["mean_diff"])
    for t in dict.fromkeys(p["time"]):
        tl = f", t = {t_label(t)}" if p["time"].nunique() > 1 else ""
        for i, a in enumerate(groups):
            for b in groups[i + 1:]:
                for k in kernels:
                    rows = rows_of(a[0], b[0], k, k, t)
                    if len(rows):
                        lines.append(describe(rows, f"{name[a[0]]} - {name[b[0]]}, {k.upper()}{tl}"))
        if len(kernels) > 1:
            for g in groups:
                rows = rows_of(g[0], g[0], kernels[0], kernels[1], t)
                if len(rows):
                    lines.append(describe(rows, f"{name[g[0]]}, {kernels[0].upper()} - {kernels[1].upper()}{tl}"))
    what = "test MAE" if unit == "eV" else "test accuracy"
    return (f"Paired differences in {what} (first minus second, same draws), over the sizes:\n\n" + "".join(lines))


# ----- QM9 (study/builtin/qm9.yaml): MAE in meV, who wins where, kernel speed -----------------
def qm9_predictors(out: Path) -> dict[str, pd.DataFrame]:
    """Each predictor's test MAE per (size, draw) in meV, in study order: the per-element
    baseline alone, each model under each kernel, each descriptor kernel once (it is filed
    under both kernel names)."""
    p = out / "regression.parquet"
    if not p.is_file():
        raise BadInput(f"--qm9: {p} not found; run `eqntk run study/builtin/qm9.yaml --out {out}`")
    t = pd.read_parquet(p)
    t = t[np.isinf(t["time"])]
    first = t[(t.model == t.model.iloc[0]) & (t.kernel == t.kernel.iloc[0])]
    out_ = {"per-element linear": first.assign(mev=1000 * first.baseline_mae)[["size", "draw", "mev"]]}
    for (m, k), g in t.groupby(["model", "kernel"], sort=False):
        if g.arch.iloc[0] in DESCRIPTOR_ARCHS:
            if k == t.kernel.iloc[0]:
                out_[f"{m}"] = g.assign(mev=1000 * g.test_mae)[["size", "draw", "mev"]]
        else:
            out_[f"{m} {k.upper()}"] = g.assign(mev=1000 * g.test_mae)[["size", "draw", "mev"]]
    return out_


def mev(x: float) -> str:
    return "n/a" if not np.isfinite(x) else (f"{x:.0f}" if abs(x) >= 100 else f"{x:.1f}")


def qm9_table(out: Path) -> str:
    preds = qm9_predictors(out)
    sizes = sorted(next(iter(preds.values()))["size"].unique())
    rows = []
    for size in sizes:
        row = [str(size)]
        for g in preds.values():
            m, lo, hi = ci95(g[g["size"] == size]["mev"])
            row.append(mev(m) + (f" [{mev(lo)}, {mev(hi)}]" if np.isfinite(hi) else ""))
        rows.append(row)
    draws = json.loads((out / "study.json").read_text())["config"]["regression"]["draws"]
    return (f"Test MAE in meV on the test molecules, mean [95% CI] over {draws} seeded draws of the training set "
            "(one draw where the size is the whole pool); every kernel regresses what the per-element baseline leaves:\n\n"
            + markdown_table(["training molecules", *preds], rows, [True] * (len(preds) + 1)))


def qm9_wins(out: Path) -> str:
    """At each size the lowest mean MAE, and every other predictor's paired difference to it."""
    preds = qm9_predictors(out)
    lines = []
    for size in sorted(next(iter(preds.values()))["size"].unique()):
        at = {k: g[g["size"] == size].set_index("draw")["mev"] for k, g in preds.items()}
        best = min(at, key=lambda k: at[k].mean())
        behind, tied = [], []
        for k, v in at.items():
            if k == best:
                continue
            d = (v - at[best]).dropna()
            m, lo, hi = ci95(d)
            text = f"{k} {signed(m, 1 if abs(m) < 100 else 0)}" + (f" [{mev(lo)}, {mev(hi)}]" if np.isfinite(hi) else "")
            (behind if np.isfinite(lo) and lo > 0 else tied).append(text)
        n = len(at[best])
        head = f"- n = {size}: **{best}** {mev(at[best].mean())} meV"
        if n < 2:
            lines.append(head + f" (one draw, no interval; others: {', '.join(behind + tied)})\n")
            continue
        lines.append(head + (f"; significantly behind it (paired difference, meV [95% CI]): {', '.join(behind)}" if behind else "")
                     + (f"; not distinguishable from it: {', '.join(tied)}" if tied else "")
                     + "\n")
    return "Lowest test MAE at each training size, and the others' paired differences to it (same draws, meV):\n\n" + "".join(lines)


def qm9_speed(out: Path) -> str:
    """Per-atom-pair kernel time of the run, and its wall time on more CPUs: the kernel CPU
    time (kernel wall x the run's CPUs, all of them busy with blocks) over N CPUs plus the rest
    of the run (data, learning curves, report), which does not spread."""
    rec = run_record(out)
    if rec.get("wall_seconds") is None:
        raise BadInput(f"--qm9: {out / RUN_RECORD} not found; run `scripts/readme.py --run qm9` to measure the run")
    cpus = (rec.get("machine") or machine())["cpus"]
    metas = [json.loads(p.read_text()) for p in sorted((out / "kernels").glob("*.json"))]
    atom = [m for m in metas if m.get("atom_pairs_computed")]
    lines = []
    cpu_total = 0.0
    for m in atom:
        wall_per = m["seconds"] * cpus / m["atom_pairs_computed"]
        # the CPU time the blocks took, where recorded; else wall x CPUs (an upper bound on a shared machine)
        cpu = m.get("cpu_seconds") if np.isfinite(m.get("cpu_seconds", np.nan)) else m["seconds"] * cpus
        cpu_total += cpu
        cached = m["blocks"] - m["blocks_computed"]
        text = (f"- {m['model']}: {m['atom_pairs_computed']:.3g} atom pairs computed (the pool's symmetric block once) "
                f"in {seconds(m['seconds'])} on {cpus} CPUs, {1e6 * wall_per:.2f} us of wall time per atom pair per CPU")
        if m.get("cpu_seconds") is not None:
            text += f", {1e6 * cpu / m['atom_pairs_computed']:.2f} us of CPU time"
        lines.append(text + (f" ({cached} of {m['blocks']} blocks from the cache)" if cached else f", {m['blocks']} Ray tasks")
                     + "\n")
    kernel = sum(m["seconds"] for m in metas)
    other = sum(m["seconds"] for m in metas if not m.get("atom_pairs_computed"))
    wall = float(rec["wall_seconds"])
    rest = max(0.0, wall - kernel)
    pred = ", ".join(f"{n} CPUs ~{seconds(rest + other + cpu_total / n)}" for n in (1, 16, 64))
    load = rec.get("load_average")
    lines.append(f"- `eqntk run study/builtin/qm9.yaml`: {seconds(wall)} end to end on {cpus} CPUs"
                 + (f" (load average before the run {', '.join(map(str, load))})" if load else "")
                 + f", of which kernels {seconds(kernel)}; predicted on {pred} (the atom kernels' CPU time over the CPUs "
                 f"plus the {seconds(rest + other)} that does not spread: data, descriptor kernel, learning curves, report)\n")
    return "".join(lines)


def qm9_blocks(out: Path) -> tuple[dict[str, str], dict[str, Path]]:
    need(out / "study.json", "--qm9", "give a results directory of `eqntk run study/builtin/qm9.yaml`")
    png = need(out / "report" / "learning_curves.png", "--qm9", f"run `eqntk report {out}` first")
    target = "docs/img/qm9_learning_curves.png"
    blocks = {"qm9-run": run_facts(out), "qm9-speed": qm9_speed(out), "qm9-table": qm9_table(out),
              "qm9-figure": f"![QM9 learning curves: test MAE (meV) against training molecules, 95% CI bands]({target})\n",
              "qm9-wins": qm9_wins(out)}
    return blocks, {target: png}


# ----- blocks of each kind of directory ---------------------------------------------------------
def need(path: Path, option: str, fix: str) -> Path:
    if not path.is_file():
        raise BadInput(f"{option}: {path} not found; {fix}")
    return path


def ensemble_blocks(out: Path, prefix: str, figures: bool, verdicts: bool) -> tuple[dict[str, str], dict[str, Path]]:
    opt = f"--{prefix}"
    need(out / "study.json", opt, f"give a results directory of `eqntk run study/builtin/{prefix}.yaml`")
    summary = need(out / "report" / "summary.csv", opt, f"run `eqntk report {out}` first")
    blocks = {f"{prefix}-summary": summary_block(summary), f"{prefix}-run": run_facts(out)}
    images: dict[str, Path] = {}
    if verdicts:
        blocks[f"{prefix}-verdicts"] = verdicts_block(out)
    if figures:
        for name in FIGURES:
            blocks[f"{prefix}-figure-{name.replace('_', '-')}"], img = figure_block(out, name, prefix)
            images.update(img)
    else:
        need(out / "analysis" / "pairs.csv", opt, f"run `eqntk analyze {out}` first")
        blocks[f"{prefix}-gaps"] = gaps_block(out)
    return blocks, images


def regression_blocks(out: Path, prefix: str) -> dict[str, str]:
    need(out / "study.json", f"--{prefix}", f"give a results directory of `eqntk run study/builtin/{prefix}.yaml`")
    return {f"{prefix}-run": run_facts(out), f"{prefix}-table": regression_table(out), f"{prefix}-pairs": regression_pairs(out)}


def render(dirs: dict[str, Path]) -> tuple[dict[str, str], dict[str, Path]]:
    """Every block the directories give, and the images to copy (README-relative path -> source)."""
    blocks: dict[str, str] = {}
    images: dict[str, Path] = {}
    for prefix, out in dirs.items():
        if not out.is_dir():
            raise BadInput(f"--{prefix}: {out} is not a directory; give a results directory")
        if prefix in ("builtin", "so3"):
            b, i = ensemble_blocks(out, prefix, figures=prefix == "builtin", verdicts=prefix == "builtin")
            blocks.update(b)
            images.update(i)
        elif prefix == "invariance":
            blocks.update(invariance_blocks(out))
        elif prefix == "pairing":
            blocks.update(pairing_blocks(out))
        elif prefix == "qm9":
            b, i = qm9_blocks(out)
            blocks.update(b)
            images.update(i)
        else:
            blocks.update(regression_blocks(out, prefix))
    return blocks, images


# ----- the cost model: predicted against measured, paper-scale plans, scale test ---------------
# These blocks are rendered where the README has their markers (a README without them, such as
# a test's, is left alone). docs/cost.md describes the model; `eqntk plan` prints it.
COST_STUDIES = ("builtin", "so3", "regression")  # whose --run records the prediction made before it
BENCHMARK_RECORDS = {"scale": ROOT / "benchmarks" / "scale.json", "paper": ROOT / "benchmarks" / "paper_plan.json",
                     "bounded": ROOT / "benchmarks" / "bounded.json"}


def predicted_seconds(study: Path, cpus: int, load: float = 0.0) -> float:
    """``eqntk plan``'s total for ``study`` on ``cpus`` CPUs of this machine (its cached
    calibration), with other jobs' ``load`` on them."""
    return round(plan_study(study, Resources(cpus=int(cpus), load=float(load))).total_seconds, 1)


COST_HEADER = ["study", "machine", "predicted, machine to itself", "predicted at other jobs' load",
               "measured end to end", "measured / predicted alone", "measured / predicted at load", "predicted"]


def cost_table(dirs: dict[str, Path], previous: str = "") -> Optional[str]:
    """Predicted against measured wall time of each results directory a --run recorded: the
    machine to itself, and at other jobs' load just before the run (``eqntk.plan.current_load``;
    the 1-minute load average for a run that did not record it). A study not among ``dirs``
    keeps its row of the ``previous`` table, so a --run of some studies updates only theirs."""
    header = markdown_table(COST_HEADER, [], [False, False, True, True, True, True, True, False])
    kept = {}
    if previous.startswith(header):
        for line in previous[len(header):].splitlines():
            for name in COST_STUDIES:
                if line.startswith(f"| `study/builtin/{name}.yaml` |"):
                    kept[name] = line
    lines = []
    for name in COST_STUDIES:
        rec = run_record(dirs[name]) if name in dirs else {}
        if not rec.get("wall_seconds"):
            if name in kept:
                lines.append(kept[name])
            continue
        cpus = (rec.get("machine") or {}).get("cpus") or os.cpu_count()
        load = rec.get("load_now", (rec.get("load_average") or [0.0])[0])
        recorded = rec.get("predicted_seconds") is not None
        alone = rec["predicted_seconds"] if recorded else predicted_seconds(dirs[name] / "study.yaml", cpus)
        loaded = (rec.get("predicted_at_load_seconds") if recorded
                  else predicted_seconds(dirs[name] / "study.yaml", cpus, load))
        wall = rec["wall_seconds"]
        row = [f"`{rec.get('study', name)}`", f"{cpus} CPUs", seconds(alone), f"{seconds(loaded)} (load {load:g})",
               seconds(wall), f"{wall / alone:.2f}", f"{wall / loaded:.2f}",
               "before the run" if recorded else "after, from this machine's calibration"]
        lines.append("| " + " | ".join(cell(c) for c in row) + " |")
    if not lines:
        return None
    return header + "".join(line + "\n" for line in lines)


def scale_table(path: Path) -> str:
    """benchmarks/scale.py's record: per cluster and size, the runner's and the store's figures,
    and the overhead per unit from the growth between the two sizes (start-up costs cancel)."""
    rec = json.loads(path.read_text())
    rows = []
    by = {}
    for r in rec["rows"]:
        by.setdefault(r["cluster"], []).append(r)
    for cluster, rs in by.items():
        rs.sort(key=lambda r: r["units"])
        for i, r in enumerate(rs):
            marginal = "n/a"
            if i:
                p = rs[i - 1]
                marginal = fixed(0)(1000 * ((r["training_seconds"] - p["training_seconds"]) * r["slots"]
                                            / (r["units"] - p["units"]) - r["unit_seconds_mean"]))
            rows.append([cluster, sig3(r["units"]), seconds(r["training_seconds"]), fixed(0)(r["overhead_ms_per_unit"]),
                         marginal, fixed(0)(1000 * r["unit_seconds_mean"]), f"{r['driver_peak_rss_bytes'] / 1e6:.0f} MB",
                         f"{r['part_files']} ({r['part_bytes'] / 1e6:.1f} MB)", seconds(r["analyze_read_seconds"]),
                         seconds(r["analyze_wall_seconds"])]
                        + compacted_cells(r) + [fixed(1)(r["load_average"])])
    return (f"`{rec['command']}` ({rec['machine']['cpus']} CPUs, {rec['machine']['memory_gib']} GiB):\n\n"
            + markdown_table(["Ray", "units", "training wall", "overhead per unit (ms)", "overhead, growth (ms)",
                              "unit's own (ms)", "driver peak", "Parquet parts", "analyze: read", "analyze: all",
                              "eqntk compact", "compacted files", "compacted: read", "compacted: all", "tables",
                              "load"], rows, [False] + [True] * 15))


def compacted_cells(r: dict) -> list[str]:
    """A scale row's compaction (benchmarks/scale.py): its time, the files after it, analyze's
    read and wall time on them, and whether the tables stayed bit for bit the same."""
    if "compacted_files" not in r:  # a record from before compaction existed
        return ["n/a"] * 5
    return [seconds(r["compact_seconds"]), f"{r['compacted_files']} ({r['compacted_bytes'] / 1e6:.1f} MB)",
            seconds(r["compacted_analyze_read_seconds"]), seconds(r["compacted_analyze_wall_seconds"]),
            "identical" if r["tables_identical"] else "differ"]


def refused_table(path: Path) -> str:
    """benchmarks/bounded.py's record: each bad or absurd study file, what ``eqntk validate``
    and ``eqntk plan`` answered (a fresh process each) and how long they took."""
    rec = json.loads(path.read_text())

    def took(r: dict) -> str:
        return f"exit {r['exit']}, {seconds(r['wall_seconds'])} ({seconds(r['cpu_seconds'])} CPU)"

    def answer(row: dict) -> str:
        text = row["plan"]["answer"] if row["plan"]["exit"] == 0 else row["validate"]["answer"]
        text = text.removeprefix("eqntk: error: ").removeprefix("STUDY: ").removeprefix("wall time: ")
        return text if len(text) <= 110 else text[:107] + "..."
    rows = [[r["case"], took(r["validate"]), took(r["plan"]), answer(r)] for r in rec["rows"]]
    slowest = max(max(r["validate"]["wall_seconds"], r["plan"]["wall_seconds"]) for r in rec["rows"])
    load = rec["load_average_before"]
    return (f"`{rec['command']}` ({rec['machine']['cpus']} CPUs; load average {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f} "
            f"before; the slowest answer {seconds(slowest)}):\n\n"
            + markdown_table(["study file", "eqntk validate", "eqntk plan", "answer (plan's for a valid study)"],
                             rows, [False, True, True, False]))


def paper_blocks(path: Path) -> dict[str, str]:
    rec = json.loads(path.read_text())
    out = {"plan-paper": f"```\n$ eqntk plan {rec['paper_here']['study']}\n{rec['paper_here']['text']}\n```\n",
           "plan-paper-cluster": f"```\n$ eqntk plan {rec['paper_cluster']['study']} --gpus 16 --nodes 2 --cpus 64\n"
                                 f"{rec['paper_cluster']['text']}\n```\n"}
    run = rec.get("slice_run")
    if run:
        loaded = run.get("predicted_at_load_seconds")
        load = run.get("load_now", run["load_average_before"][0])
        at = f", {seconds(loaded)} at other jobs' load just before the run ({load:g})" if loaded else ""
        ratio = run["wall_seconds"] / (loaded or run["predicted_seconds"])
        out["paper-slice"] = (
            f"- `{rec['slice_plan']['study']}` ({run['units']} units): predicted {seconds(run['predicted_seconds'])} "
            f"with the machine to itself{at}; measured {seconds(run['wall_seconds'])} end to end (measured / "
            f"predicted{' at that load' if loaded else ''} {ratio:.2f}); {seconds(run['unit_seconds'])} summed over units, "
            f"{run['part_bytes'] / 1e6:.0f} MB of Parquet parts; load average "
            f"{', '.join(map(str, run['load_average_before']))} before, "
            f"{', '.join(map(str, run['load_average_after']))} after (1, 5, 15 min)\n")
    return out


def cost_blocks(text: str, dirs: dict[str, Path]) -> dict[str, str]:
    """The cost-model blocks whose markers ``text`` has."""
    wanted = lambda name: block_pattern(name).search(text) is not None  # noqa: E731
    blocks: dict[str, str] = {}
    if wanted("cost-measured"):
        table = cost_table(dirs, block_pattern("cost-measured").search(text).group(2))
        if table:
            blocks["cost-measured"] = table
    if wanted("scale") and BENCHMARK_RECORDS["scale"].is_file():
        blocks["scale"] = scale_table(BENCHMARK_RECORDS["scale"])
    if BENCHMARK_RECORDS["paper"].is_file():
        blocks.update({k: v for k, v in paper_blocks(BENCHMARK_RECORDS["paper"]).items() if wanted(k)})
    if wanted("refused-inputs") and BENCHMARK_RECORDS["bounded"].is_file():
        blocks["refused-inputs"] = refused_table(BENCHMARK_RECORDS["bounded"])
    return blocks


# ----- README ---------------------------------------------------------------------------------
def stale_blocks(text: str, blocks: dict[str, str], images: dict[str, Path], root: Path) -> list[str]:
    stale = []
    for name, body in blocks.items():
        m = block_pattern(name).search(text)
        if IGNORED.sub("", m.group(2)) != IGNORED.sub("", body):
            stale.append(name)
    for target, src in images.items():
        dst = root / target
        if not dst.is_file() or dst.read_bytes() != src.read_bytes():
            stale.append(target)
    return stale


def rewrite(text: str, blocks: dict[str, str]) -> str:
    """Replace the stale blocks; a block whose numbers are unchanged keeps its bytes, the load
    average of when they were generated included."""
    for name in stale_blocks(text, blocks, {}, Path()):
        text = block_pattern(name).sub(lambda m: m.group(1) + blocks[name] + m.group(3), text, count=1)
    return text


def check_markers(text: str, blocks: dict[str, str], readme: Path) -> None:
    for name in blocks:
        if not block_pattern(name).search(text):
            raise BadInput(f"--readme: {readme} has no block '<!-- generated: {name} -->' ... "
                           f"'<!-- end generated: {name} -->'; add the two marker lines where the block goes")


# ----- --run ----------------------------------------------------------------------------------
def run_study(name: str, out: Path) -> None:
    """``eqntk run STUDY --out out``, recording what the results directory does not hold."""
    before_load, rss_before = load_average(), resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # what `eqntk plan` predicts for this machine before the run, alone and at other jobs' load
    # now (README "cost-measured")
    predicted = {}
    if name in COST_STUDIES:
        cpus, now = os.cpu_count() or 1, current_load()
        try:
            predicted = dict(predicted_seconds=predicted_seconds(STUDIES[name], cpus), load_now=now,
                             predicted_at_load_seconds=predicted_seconds(STUDIES[name], cpus, now))
        except Exception as e:  # a prediction must never stop the run it predicts
            print(f"readme.py: no prediction for {name} ({type(e).__name__}: {e})", file=sys.stderr)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "eqntk.cli", "run", str(STUDIES[name]), "--out", str(out), "--no-progress"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - t0
    log = proc.stdout
    sys.stdout.write(log)
    if proc.returncode != 0:
        raise SystemExit(f"eqntk run {STUDIES[name]} failed with exit code {proc.returncode}; see its output above")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # kB on Linux; the largest process so far
    found = {key: re.search(pattern, log, re.M) for key, pattern in (
        ("training_seconds", r"^\d+ units: .* in ([\d.]+) s"), ("report_seconds", r"^report: .* \(([\d.]+) s\)$"))}
    record = dict(study=str(STUDIES[name]).removeprefix(f"{ROOT}/"), wall_seconds=round(wall, 1),
                  peak_rss_bytes=rss * 1024 if rss > rss_before else None, machine=machine(), load_average=before_load,
                  **predicted,
                  **{k: float(m.group(1)) for k, m in found.items() if m})
    (out / RUN_RECORD).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


# ----- command line -----------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2
        print(f"readme.py: {message}", file=sys.stderr)
        raise SystemExit(2)


def main(argv: Optional[list[str]] = None) -> int:
    ap = Parser(description="Render README.md's generated blocks from results directories.")
    for name in STUDIES:
        ap.add_argument(f"--{name}", type=Path, metavar="DIR", help=f"results directory of study/builtin/{name}.yaml")
    ap.add_argument("--check", action="store_true", help="exit 1 naming the stale blocks; write nothing")
    ap.add_argument("--ignore", action="append", default=[], metavar="BLOCK", help="with --check: a block not to compare")
    ap.add_argument("--run", nargs="*", choices=list(STUDIES), metavar="STUDY",
                    help="run these committed studies (default: all) into a fresh temporary directory first")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the README to rewrite (default: the repository's)")
    a = ap.parse_args(argv)
    dirs = {name: getattr(a, name) for name in STUDIES if getattr(a, name) is not None}
    to_run = [] if a.run is None else (a.run or list(STUDIES))
    clash = sorted(set(to_run) & set(dirs))
    if clash:
        ap.error(f"--run {clash[0]} and --{clash[0]} DIR: give one or the other")
    if not dirs and not to_run:
        ap.error("no results: give --builtin DIR (and/or --so3, --regression, --molecules, --invariance), or --run")
    try:
        readme = a.readme
        if not readme.is_file():
            raise BadInput(f"--readme: {readme} not found; give the README to rewrite")
        text = readme.read_text()
        if to_run:
            tmp = Path(tempfile.mkdtemp(prefix="readme-results-"))
            print(f"running {', '.join(to_run)} into {tmp}")
            for name in to_run:
                run_study(name, tmp / name)
                dirs[name] = tmp / name
        blocks, images = render(dirs)
        blocks.update(cost_blocks(text, dirs))
        check_markers(text, blocks, readme)
    except BadInput as e:
        print(e, file=sys.stderr)
        return 2
    if a.check:
        stale = [s for s in stale_blocks(text, blocks, images, readme.parent) if s not in a.ignore]
        if stale:
            print("stale: " + " ".join(stale))
            return 1
        print(f"{readme}: {len(blocks)} blocks up to date")
        return 0
    for target, src in images.items():
        (readme.parent / target).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, readme.parent / target)
    # read again: --run takes minutes, and the README may have been edited meanwhile
    text = readme.read_text()
    try:
        check_markers(text, blocks, readme)
    except BadInput as e:
        print(e, file=sys.stderr)
        return 2
    new = rewrite(text, blocks)
    if new != text:
        readme.write_text(new)
    print(f"{readme}: {len(blocks)} blocks written ({', '.join(blocks)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
