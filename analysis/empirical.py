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

from dataclasses import dataclass

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

# One ensemble statistic per row of these keys.
POINT_KEYS = ["model", "width", "lr", "step", "eval_set", "sample", "group_element", "output"]
# The columns ``ensemble_stats`` reads, and those that older results may lack.
COLUMNS = POINT_KEYS + ["unit_id", "count", "sum", "sumsq"]
OPTIONAL = ["orbit_devsq", "pair_sumsq", "pair_orbit_devsq"]
# What ``ensemble_blocks`` reads besides ``COLUMNS`` (older results lack the blocks).
BLOCK_COLUMNS = ["member_start", "block_sum", "block_count"]
ENSEMBLE = ["model", "width", "lr"]


@dataclass(frozen=True)
class Blocks:
    """One ensemble's independent draws in blocks: ``sums`` ``[points, K]`` (rows in the order of
    ``ensemble_stats``'s rows of that ensemble, ``block_row``) and the block sizes ``counts`` ``[K]``."""

    counts: np.ndarray
    sums: np.ndarray


def ensemble_stats(table: pa.Table) -> pd.DataFrame:
    """Ensemble mean, variance, standard error and member count per ``POINT_KEYS`` row of the
    part rows in ``table`` (the ``COLUMNS``, and the ``OPTIONAL`` ones where present),
    aggregated in Arrow. Sorted by ``POINT_KEYS``.
    """
    optional = [c for c in OPTIONAL if c in table.column_names]
    # one thread: Arrow's threaded aggregation adds a group's rows in an order that varies from
    # run to run and with the table's chunks (last-bit differences); in one thread it adds them
    # in row order, so the same rows (a compacted store's included) give the same bits
    agg = table.group_by(POINT_KEYS, use_threads=False).aggregate([(c, "sum") for c in ["count", "sum", "sumsq"] + optional])
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
    df = df.sort_values(POINT_KEYS, kind="stable").reset_index(drop=True)
    df["block_row"] = df.groupby(ENSEMBLE, sort=False).cumcount().astype(np.int64)
    return df


def ensemble_blocks(table: pa.Table) -> dict[tuple, Blocks]:
    """``(model, width, lr) -> Blocks`` from the part rows in ``table`` (``COLUMNS`` and
    ``BLOCK_COLUMNS``): each point's blocks are its parts' blocks in member order. Ensembles
    whose parts lack blocks (written before they existed) or whose points disagree on the
    blocks are left out; their intervals fall back to the worst-case bound."""
    if not all(c in table.column_names for c in BLOCK_COLUMNS):
        return {}
    keys = table.select(POINT_KEYS + ["member_start"]).to_pandas()
    keys["model"] = keys["model"].astype(str)
    keys["eval_set"] = keys["eval_set"].astype(str)
    keys = keys.sort_values(POINT_KEYS + ["member_start"], kind="stable")
    order = keys.index.to_numpy()
    keys = keys.reset_index(drop=True)
    sums, counts = table["block_sum"].take(pa.array(order)), table["block_count"].take(pa.array(order))
    lengths = pc.fill_null(pc.list_value_length(sums), -1).to_numpy(zero_copy_only=False)
    if (lengths < 0).any():
        return {}
    flat_s = pc.list_flatten(sums).to_numpy(zero_copy_only=False).astype(np.float64)
    flat_n = pc.list_flatten(counts).to_numpy(zero_copy_only=False)
    starts = np.concatenate([[0], np.cumsum(lengths)])
    out = {}
    for key, rows in keys.groupby(ENSEMBLE, sort=False).indices.items():
        # a point's rows are consecutive (sorted by point, then member); all points have the same blocks
        point = keys.iloc[rows][POINT_KEYS[3:]].to_numpy()
        first = np.r_[True, (point[1:] != point[:-1]).any(axis=1)]
        per_point = np.add.reduceat(lengths[rows], np.flatnonzero(first))
        if len(per_point) == 0 or (per_point != per_point[0]).any() or per_point[0] == 0:
            continue
        k = int(per_point[0])
        lo, hi = starts[rows[0]], starts[rows[-1] + 1]
        n = flat_n[lo:hi].reshape(-1, k)
        if (n != n[0]).any():
            continue
        out[(str(key[0]), int(key[1]), float(key[2]))] = Blocks(counts=n[0].astype(np.float64), sums=flat_s[lo:hi].reshape(-1, k))
    return out


def empty_stats() -> pd.DataFrame:
    """No finished unit: the columns of ``ensemble_stats`` with their types, and no rows."""
    types = dict(model=str, width=np.int64, lr=np.float64, step=np.int64, eval_set=str, sample=np.int64,
                 group_element=np.int64, output=np.int64, members=np.int64, draws=np.int64, mean=np.float64, var=np.float64,
                 se=np.float64, orbit_devsq=np.float64, time=np.float64)
    return pd.DataFrame({c: pd.Series(dtype=t) for c, t in types.items()})
