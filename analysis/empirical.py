"""Ensemble statistics from a results directory's ``predictions`` dataset.

Each part row carries ``count``, ``sum`` and ``sumsq`` of its members' predictions at one
(step, eval set, sample, group element, output), so the ensemble statistics of a
(model, width, lr) ensemble aggregate exactly over its units (docs/results.md):

    M = sum(count),  mean = sum(sum) / M,  var = (sum(sumsq) - sum(sum)^2 / M) / (M - 1),
    se = sqrt(var / M),  orbit_devsq = sum(orbit_devsq) / M

(``orbit_devsq``: members' mean squared deviation from their own orbit average; NaN for
parts written before the column existed.)

Units whose record says ``diverged`` are excluded as a whole: their part stops at the step
where they blew up, so keeping their early steps would make the ensemble differ from step to
step. They, and failed or pending units, are listed by ``unit_table`` for the report.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from study.config import StudyConfig
from study.grid import expand
from study.store import ResultStore, read_predictions

# One ensemble statistic per row of these keys.
POINT_KEYS = ["model", "width", "lr", "step", "eval_set", "sample", "group_element", "output"]
_COLUMNS = POINT_KEYS + ["unit_id", "count", "sum", "sumsq"]
_OPTIONAL = ["orbit_devsq"]


def study_config(out: Path) -> StudyConfig:
    return StudyConfig(**ResultStore(out).resolved_study()["config"])


def unit_table(out: Path) -> pd.DataFrame:
    """Every unit of the study with its state (done, diverged, failed, pending) and record fields."""
    store = ResultStore(out)
    resolved = store.resolved_study()
    units = expand(StudyConfig(**resolved["config"]), resolved["data_digest"])
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


def ensemble_stats(out: Path, exclude_units: list[str] | tuple = ()) -> pd.DataFrame:
    """Ensemble mean, variance, standard error and member count per ``POINT_KEYS`` row.

    Reads only the columns it needs and aggregates in Arrow; ``exclude_units`` (unit ids,
    normally the diverged ones) are dropped before aggregating. Sorted by ``POINT_KEYS``.
    """
    flt = None
    if len(exclude_units):
        flt = ~pc.is_in(ds.field("unit_id"), value_set=pa.array(list(exclude_units), pa.string()))
    table = read_predictions(out, columns=_COLUMNS, filter=flt, optional=_OPTIONAL)
    optional = [c for c in _OPTIONAL if c in table.column_names]
    agg = table.group_by(POINT_KEYS).aggregate([(c, "sum") for c in ["count", "sum", "sumsq"] + optional])
    df = agg.to_pandas()
    df["model"] = df["model"].astype(str)
    df["eval_set"] = df["eval_set"].astype(str)
    for c in ("width", "step", "sample", "group_element", "output"):
        df[c] = df[c].astype(np.int64)
    m = df.pop("count_sum").to_numpy(np.float64)
    s = df.pop("sum_sum").to_numpy()
    ss = df.pop("sumsq_sum").to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s / m
        # sum of squared deviations; rounding can make it slightly negative where var ~ 0
        dev2 = np.maximum(ss - s * mean, 0.0)
        var = np.where(m > 1, dev2 / (m - 1), np.nan)
        se = np.sqrt(var / m)
    devsq = df.pop("orbit_devsq_sum").to_numpy() / m if optional else np.full(len(df), np.nan)
    df["members"] = m.astype(np.int64)
    df["orbit_devsq"] = devsq
    df["mean"], df["var"], df["se"] = mean, var, se
    df["time"] = df["lr"] * df["step"]
    return df.sort_values(POINT_KEYS, kind="stable").reset_index(drop=True)


def load_ensembles(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(stats, units)``: statistics over the units that finished (diverged ones left out), and the unit table."""
    units = unit_table(out)
    diverged = units.loc[units["state"] == "diverged", "unit_id"].tolist()
    if not (units["state"] == "done").any():
        return _empty_stats(), units
    return ensemble_stats(out, exclude_units=diverged), units


def _empty_stats() -> pd.DataFrame:
    """No finished unit: the columns of ``ensemble_stats`` with their types, and no rows."""
    types = dict(model=str, width=np.int64, lr=np.float64, step=np.int64, eval_set=str, sample=np.int64,
                 group_element=np.int64, output=np.int64, members=np.int64, mean=np.float64, var=np.float64,
                 se=np.float64, orbit_devsq=np.float64, time=np.float64)
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in types.items()})
