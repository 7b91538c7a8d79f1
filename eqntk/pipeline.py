"""``eqntk analyze`` and ``eqntk report``: from a results directory to tables, plots and verdicts.

    analyze(DIR)  ensemble statistics (empirical), analytic predictions (theory, cached),
                  comparisons (compare) -> DIR/analysis/<table>.parquet and .csv
    report(DIR)   plots, summary and verdicts (report) -> DIR/report/index.html

``report`` reuses the tables of the last ``analyze`` when the units they were built from
have not changed since, and re-analyses otherwise.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from analysis import compare, empirical
from analysis import report as rep
from analysis import theory
from study.atomic import atomic_path
from study.config import study_from_dict
from study.grid import expand

from .store import ResultStore, read_predictions

TABLES = ["models", "units", "theory", "points", "agreement", "convergence", "invariance", "pairs"]
# The per-point table can be large (steps x sets x samples x orbit x outputs per ensemble):
# Parquet only. Every other table is small and also written as CSV.
NO_CSV = {"points"}
MANIFEST = "manifest.json"


def analysis_dir(out: Path) -> Path:
    return Path(out) / "analysis"


def unit_table(out: Path) -> pd.DataFrame:
    """Every unit of the study with its state (done, diverged, failed, pending) and record fields."""
    store = ResultStore(out)
    resolved = store.resolved_study()
    units = expand(study_from_dict(resolved["config"]), resolved["data_digest"])
    states = store.unit_states(units)
    rows = []
    for u in units:
        rec = store.record(u.unit_id) or {}
        rows.append(
            dict(
                unit_id=u.unit_id,
                model=u.model.name,
                width=u.width,
                lr=u.lr,
                member_start=u.member_start,
                member_stop=u.member_stop,
                state=states[u.unit_id],
                steps_reached=rec.get("steps_reached"),
                seconds=rec.get("seconds"),
                device=rec.get("device"),
                error=rec.get("error"),
            )
        )
    return pd.DataFrame(rows)


def load_ensembles(out: Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """``(stats, units, blocks)``: ensemble statistics over the units that finished, the unit
    table, and each ensemble's blocks of independent draws (``analysis.empirical``).

    Diverged units are left out as a whole (``analysis.empirical``); only the columns the
    statistics need are read."""
    units = unit_table(out)
    if not (units["state"] == "done").any():
        return empirical.empty_stats(), units, {}
    diverged = units.loc[units["state"] == "diverged", "unit_id"].tolist()
    flt = None
    if diverged:
        flt = ~pc.is_in(ds.field("unit_id"), value_set=pa.array(diverged, pa.string()))
    table = read_predictions(out, columns=empirical.COLUMNS, filter=flt,
                             optional=empirical.OPTIONAL + empirical.BLOCK_COLUMNS)
    return empirical.ensemble_stats(table), units, empirical.ensemble_blocks(table)


def _unit_states(out: Path) -> dict[str, str]:
    units = unit_table(out)
    return dict(zip(units["unit_id"], units["state"]))


def analyze(out: Path, *, kernel_fn: Optional[Callable] = None, workers: Optional[int] = None,
            log=print) -> dict[str, pd.DataFrame]:
    """Compute and write every analysis table; returns them.

    ``kernel_fn`` replaces ``analysis.kernels.kernel_fn``; ``workers`` processes compute the
    analytic predictions that are not cached (default: one per CPU).
    """
    out = Path(out)
    t0 = time.perf_counter()
    store = ResultStore(out)
    resolved = store.resolved_study()
    cfg = study_from_dict(resolved["config"])
    specs = cfg.model_specs
    stats, units, blocks = load_ensembles(out)
    t1 = time.perf_counter()
    theories = theory.study_theory(cfg, resolved["log_steps"], resolved["data_digest"], store.load_data,
                                   analysis_dir(out), kernel_fn=kernel_fn, log=log, workers=workers)
    t2 = time.perf_counter()
    tables = compare.build_tables(stats, theories, specs, {s.name: cfg.widths_of(s.name) for s in specs}, blocks)
    tables["units"] = units
    t3 = time.perf_counter()
    d = analysis_dir(out)
    d.mkdir(parents=True, exist_ok=True)
    for name in TABLES:
        df = tables[name]
        with atomic_path(d / f"{name}.parquet") as tmp:
            df.to_parquet(tmp, index=False)
        if name not in NO_CSV:
            # the leave-one-block-out arrays are for pooling, not for reading: Parquet only
            with atomic_path(d / f"{name}.csv") as tmp:
                df.drop(columns=[c for c in df if "_loo" in c]).to_csv(tmp, index=False)
    manifest = dict(
        units=dict(zip(units["unit_id"], units["state"])),
        seconds=dict(read=round(t1 - t0, 2), theory=round(t2 - t1, 2), compare=round(t3 - t2, 2),
                     total=round(time.perf_counter() - t0, 2)),
    )
    with atomic_path(d / MANIFEST) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    log(f"analysis: {d} ({manifest['seconds']['total']:.1f} s: read {manifest['seconds']['read']:.1f}, "
        f"theory {manifest['seconds']['theory']:.1f}, compare {manifest['seconds']['compare']:.1f})")
    return tables


def load_tables(out: Path) -> Optional[dict[str, pd.DataFrame]]:
    """The tables of the last ``analyze``, or None when they are missing or the units changed since."""
    d = analysis_dir(out)
    try:
        manifest = json.loads((d / MANIFEST).read_text())
        if manifest.get("units") != _unit_states(out):
            return None
        return {name: pd.read_parquet(d / f"{name}.parquet") for name in TABLES}
    except (OSError, ValueError):
        return None


def report(out: Path, *, kernel_fn: Optional[Callable] = None, workers: Optional[int] = None, log=print) -> Path:
    """Write ``DIR/report/index.html`` with its plots and summary; returns its path."""
    out = Path(out)
    tables = load_tables(out)
    if tables is None:
        tables = analyze(out, kernel_fn=kernel_fn, workers=workers, log=log)
    t0 = time.perf_counter()
    page = rep.write_report(out, tables, ResultStore(out).resolved_study())
    log(f"report: {page} ({time.perf_counter() - t0:.1f} s)")
    return page
