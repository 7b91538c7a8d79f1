"""Ensemble statistics from the moments of a study's ``predictions`` dataset.

Each part row carries ``count``, ``sum`` and ``sumsq`` of its members' predictions at one
(step, eval set, sample, group element, output), so the ensemble statistics of a
(model, width, lr) ensemble aggregate exactly over its units (docs/results.md):

    M = sum(count),  mean = sum(sum) / M,  var = (sum(sumsq) - sum(sum)^2 / M) / (M - 1),
    se = sqrt(var / M),  orbit_devsq = sum(orbit_devsq) / M,  draws = M

(``orbit_devsq``: members' mean squared deviation from their own orbit average; NaN for
parts written before the column existed.)

Antithetic ensembles (``pairing: antithetic``; docs/theory.md §5) have members in pairs
whose readouts are opposite, so members are not independent but the P = M / 2 pair means
are. The parts then also carry the pair means' sums (``pair_sumsq``, ``pair_orbit_devsq``)
and the statistics rest on the pairs:

    var_pairs = (sum(pair_sumsq) - P mean^2) / (P - 1),   se = sqrt(var_pairs / P),
    var = var_pairs + (sum(sumsq) / 2 - sum(pair_sumsq)) / P,
    orbit_devsq = sum(pair_orbit_devsq) / P,   draws = P

``var`` is the members' own (marginal) variance, unbiased: a member's variance is that of
its pair's mean plus that of the pair's half difference ``(a - b) / 2``, whose mean is 0.
``draws`` is the number of independent draws behind ``se`` and ``orbit_devsq``.

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
OPTIONAL = ["orbit_devsq", "pair_sumsq", "pair_orbit_devsq"]


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
    present = ["count", "sum", "sumsq"] + optional
    summed = {c: df.pop(f"{c}_sum").to_numpy(np.float64) if c in present else np.full(len(df), np.nan)
              for c in ["count", "sum", "sumsq"] + OPTIONAL}
    m, s, ss = summed["count"], summed["sum"], summed["sumsq"]
    with np.errstate(divide="ignore", invalid="ignore"):
        mean = s / m
        # sum of squared deviations; rounding can make it slightly negative where var ~ 0
        var = np.where(m > 1, np.maximum(ss - s * mean, 0.0) / (m - 1), np.nan)
        se = np.sqrt(var / m)
        devsq = summed["orbit_devsq"] / m
        # antithetic pairs (pair sums finite): the same statistics over the P = M / 2 pair means
        pss = summed["pair_sumsq"]
        paired = np.isfinite(pss)
        p = m / 2
        var_pairs = np.where(p > 1, np.maximum(pss - p * mean**2, 0.0) / (p - 1), np.nan)
        half_diff = np.maximum(ss / 2 - pss, 0.0) / p
        var = np.where(paired, var_pairs + half_diff, var)
        se = np.where(paired, np.sqrt(var_pairs / p), se)
        devsq = np.where(paired, summed["pair_orbit_devsq"] / p, devsq)
    df["members"] = m.astype(np.int64)
    df["draws"] = np.where(paired, m // 2, m).astype(np.int64)
    df["orbit_devsq"] = devsq
    df["mean"], df["var"], df["se"] = mean, var, se
    df["time"] = df["lr"] * df["step"]
    return df.sort_values(POINT_KEYS, kind="stable").reset_index(drop=True)


def empty_stats() -> pd.DataFrame:
    """No finished unit: the columns of ``ensemble_stats`` with their types, and no rows."""
    types = dict(model=str, width=np.int64, lr=np.float64, step=np.int64, eval_set=str, sample=np.int64,
                 group_element=np.int64, output=np.int64, members=np.int64, draws=np.int64, mean=np.float64, var=np.float64,
                 se=np.float64, orbit_devsq=np.float64, time=np.float64)
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in types.items()})
