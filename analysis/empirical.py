"""Ensemble statistics from the moments of a study's ``predictions`` dataset.

Each part row carries ``count``, ``sum`` and ``sumsq`` of its members' predictions at one
(step, eval set, sample, group element, output), so the ensemble statistics of a
(model, width, lr) ensemble aggregate exactly over its units (docs/results.md):

    M = sum(count),  mean = sum(sum) / M,  var = (sum(sumsq) - sum(sum)^2 / M) / (M - 1),
    se = sqrt(var / M),  orbit_devsq = sum(orbit_devsq) / M

(``orbit_devsq``: members' mean squared deviation from their own orbit average; NaN for
parts written before the column existed.)

The caller reads the dataset (``eqntk.pipeline``) and leaves out the units whose record
says ``diverged``: their part stops at the step where they blew up, so keeping their early
steps would make the ensemble differ from step to step.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa

# One ensemble statistic per row of these keys.
POINT_KEYS = ["model", "width", "lr", "step", "eval_set", "sample", "group_element", "output"]
# The columns ``ensemble_stats`` reads, and those that older results may lack.
COLUMNS = POINT_KEYS + ["unit_id", "count", "sum", "sumsq"]
OPTIONAL = ["orbit_devsq"]


def ensemble_stats(table: pa.Table) -> pd.DataFrame:
    """Ensemble mean, variance, standard error and member count per ``POINT_KEYS`` row of the
    part rows in ``table`` (the ``COLUMNS``, and the ``OPTIONAL`` ones where present),
    aggregated in Arrow. Sorted by ``POINT_KEYS``.
    """
    optional = [c for c in OPTIONAL if c in table.column_names]
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


def empty_stats() -> pd.DataFrame:
    """No finished unit: the columns of ``ensemble_stats`` with their types, and no rows."""
    types = dict(model=str, width=np.int64, lr=np.float64, step=np.int64, eval_set=str, sample=np.int64,
                 group_element=np.int64, output=np.int64, members=np.int64, mean=np.float64, var=np.float64,
                 se=np.float64, orbit_devsq=np.float64, time=np.float64)
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in types.items()})
