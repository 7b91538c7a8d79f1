"""The numbers a report shares: ``Summary`` (computed once from the analysis tables), the
per-model summary table (``report/summary.csv``, narrow enough for the page), its detail table
(``report/details.csv``), the bias's exponent in width on and off the data manifold
(``report/width_fit.csv``), and the number formats the page uses."""

from __future__ import annotations

import numpy as np
import pandas as pd

from study.config import study_from_dict
from study.spec import GROUP_ARCHS

from . import compare

# Architecture families, in the order verdicts and plots show them (SO3 models last).
FAMILIES = ["mlp", "cnn", "group_mlp", "gcnn", "sphere_mlp", "so3_gcnn"]


def fmt(x, digits: int = 3) -> str:
    """A number as the page shows it: ``n/a`` for missing, exponent notation when very large or small."""
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


def pct(x) -> str:
    return "n/a" if x is None or not np.isfinite(x) else f"{100 * x:.0f}%"


def pct2(x) -> str:
    """A relative size in percent to two significant digits (``1.2%``, ``0.031%``)."""
    if x is None or not np.isfinite(x):
        return "n/a"
    return f"{100 * x:.0f}%" if abs(x) >= 0.1 else f"{100 * x:.2g}%"  # 140%, not 1.4e+02%


def pct_ci(est, lo, hi) -> str:
    """A relative size with its 95% interval, as ``1.2% [0%, 3.4%]``."""
    return f"{pct2(est)} [{pct2(lo)}, {pct2(hi)}]"


def num_ci(est, lo, hi) -> str:
    return f"{fmt(est, 2)} [{fmt(lo, 2)}, {fmt(hi, 2)}]"


def manifold_of(resolved: dict) -> dict[str, str]:
    """``on`` for the training inputs and every eval set drawn from the training data's source
    (held-out digits), ``off`` for the others (noise, photos)."""
    data = resolved["config"]["data"]
    source = data["train"].get("source")
    out = {"train": "on"}
    for e in data.get("eval", []):
        out[e["name"]] = "on" if e["data"].get("source") == source else "off"
    return out


def width_fits(agr: pd.DataFrame, manifold: dict[str, str]) -> pd.DataFrame:
    """Exponent of the bias of the mean in width with its 95% interval, per (model, lr,
    manifold, step) at fixed training time, and pooled over the steps after initialisation
    (``step`` missing); every eval set of the manifold pooled (docs/theory.md §5.4)."""
    cols = ["model", "lr", "manifold", "step", "widths", "exponent", "exponent_lo", "exponent_hi"]
    if not len(agr):
        return pd.DataFrame(columns=cols)
    a = agr.assign(manifold=agr["eval_set"].map(manifold).fillna("off"))
    per_step = compare.pooled_errors(a, ["model", "lr", "manifold", "step", "width"], steps="all")
    per_step = per_step[per_step["step"] > 0]
    pooled = compare.pooled_errors(a, ["model", "lr", "manifold", "width"]).assign(step=pd.NA)
    rows = []
    for frame in (per_step, pooled):
        for key, g in frame.groupby(["model", "lr", "manifold", "step"], sort=True, dropna=False):
            g = g.sort_values("width")
            rows.append(dict(zip(["model", "lr", "manifold", "step"], key), widths=" ".join(map(str, g["width"])),
                             **dict(zip(["exponent", "exponent_lo", "exponent_hi"],
                                        compare.fit_exponent(g["width"], g["bias2"], g["bias2_lo"], g["bias2_hi"])))))
    out = pd.DataFrame(rows, columns=cols)
    out["step"] = out["step"].astype("Int64")
    return out


def upgrade(tables: dict[str, pd.DataFrame], resolved: dict) -> dict[str, pd.DataFrame]:
    """Tables written by an earlier ``analyze`` (reused while their units are unchanged) with the
    columns this report reads: ``draws`` (one draw a member before antithetic pairs), and, when
    the noise-removed sizes, exponents or the ``control`` kind are missing, the comparison
    tables rebuilt from ``points`` and the study's models."""
    t = dict(tables)
    for name in ("points", "agreement"):
        t[name] = compare.with_draws(t[name])
    current = ("bias2" in t["agreement"] and "exponent_bias" in t["convergence"] and "spread_sys" in t["invariance"]
               and "rel_gap_lo" in t["pairs"])
    if current or not len(t["points"]):
        return t
    specs = study_from_dict(resolved["config"]).model_specs
    t["agreement"] = compare.agreement(t["points"])
    t["convergence"] = compare.convergence(t["agreement"])
    t["invariance"] = compare.orbit_spread(t["points"])
    t["pairs"] = compare.label_controls(compare.pair_gaps(t["points"], compare.model_pairs(specs)))
    return t


class Summary:
    """Numbers the plots and verdicts share, computed once from the tables."""

    def __init__(self, tables: dict[str, pd.DataFrame], resolved: dict):
        tables = upgrade(tables, resolved)
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
        self.manifold = manifold_of(resolved)
        # the bias at each logged step (all eval sets), and its exponent in width per manifold
        self.errors_by_step = (compare.pooled_errors(agr, ["model", "lr", "width", "step"], steps="all")
                               if len(agr) else agr)
        self.width_fit = width_fits(agr, self.manifold)
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
        if m["arch"] in GROUP_ARCHS:
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


def summary_table(s: Summary) -> pd.DataFrame:
    """The page's summary: one row per (model, lr) at its largest width, eight columns: the
    independent draws, median |z| against its Student-t reference, and the bias of the mean
    with the noise removed (pooled over eval sets and steps after initialisation) with the
    upper end of its 95% interval. The rest is in ``details_table``."""
    d = details_table(s)
    cols = ["model", "lr", "width", "draws", "median_abs_z", "median_abs_z_null", "rel_bias", "rel_bias_hi"]
    return d[cols] if len(d) else pd.DataFrame(columns=cols)


def details_table(s: Summary) -> pd.DataFrame:
    """One row per (model, lr) at its largest width: z-scores against the null, errors, slopes, spread."""
    rows = []
    for (model, lr), width in sorted(s.largest.items(), key=lambda kv: (s.model_order.index(kv[0][0]), kv[0][1])):
        spec = s.models.loc[model]
        p = s.top_points[(s.top_points["model"] == model) & (s.top_points["lr"] == lr)]
        members = int(p["members"].min()) if len(p) else 0
        draws = int(p["draws"].min()) if len(p) else 0
        null_med, null_frac = compare.t_null_pooled(p["draws"])
        e = s.errors[(s.errors["model"] == model) & (s.errors["lr"] == lr)].sort_values("width")
        et = e[e["width"] == width]
        sp = s.spread[(s.spread["model"] == model) & (s.spread["lr"] == lr) & (s.spread["width"] == width)]
        rows.append(dict(
            model=model, arch=spec["arch"], group=spec["group"], support=spec["support"], basis=spec["basis"],
            augmentation=spec["augmentation"], loss=spec.get("loss", "mse"), optimizer=spec.get("optimizer", "gd"),
            batch_size=spec.get("batch_size"), lr=lr, width=width, members=members, draws=draws,
            median_abs_z=p["z"].abs().median(), median_abs_z_null=null_med,
            frac_abs_z_lt2=(p["z"].abs() < 2)[p["z"].notna()].mean(), frac_abs_z_lt2_null=null_frac,
            median_abs_z_theory_se=p["z_theory"].abs().median(),
            rel_err=et["rel_err"].iloc[0] if len(et) else np.nan,
            rel_noise=et["rel_noise"].iloc[0] if len(et) else np.nan,
            rel_bias=et["rel_bias"].iloc[0] if len(et) else np.nan,
            rel_bias_lo=et["rel_bias_lo"].iloc[0] if len(et) else np.nan,
            rel_bias_hi=et["rel_bias_hi"].iloc[0] if len(et) else np.nan,
            slope_err=compare.fit_slope(e["width"], e["rel_err"]),
            slope_bias=compare.fit_slope(e["width"], e["rel_bias"]),
            orbit_spread=sp["spread"].iloc[0] if len(sp) else np.nan,
            spread_noise=sp["spread_noise"].iloc[0] if len(sp) else np.nan,
            var_ratio=p["var"].mean() / p["var_theory"].mean() if len(p) else np.nan,
        ))
    return pd.DataFrame(rows)
