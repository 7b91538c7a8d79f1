"""Intervals from blocks of independent draws (analysis/jackknife.py, docs/theory.md §5.6).

- the blocks' estimate equals ``sum (mean - c)^2 - sum se^2`` when each block is one draw, and
  the leave-one-block-out values equal a recomputation without that block (to round-off);
- the same for the gap between two independent ensembles;
- the 95% interval covers the true squared size in at least 95% of Monte Carlo draws, with
  points correlated as one ensemble's points are (a shared component), which the worst-case
  bound it replaces had to assume;
- the parts store the blocks and ``ensemble_blocks`` gets them back exactly, paired or not,
  with or without per-member rows, across units;
- results without blocks keep the worst-case bound.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from analysis import compare, jackknife
from analysis.empirical import BLOCK_COLUMNS, COLUMNS, OPTIONAL, ensemble_blocks, ensemble_stats
from eqntk.store import MAX_BLOCKS, PartWriter
from study.grid import UnitSpec
from study.spec import ModelSpec


def _mean_minus_se(draws: np.ndarray, c: np.ndarray) -> float:
    k = draws.shape[0]
    return float(((draws.mean(0) - c) ** 2).sum() - (draws.var(0, ddof=1) / k).sum())


def test_one_draw_blocks_give_the_noise_removed_sum_and_its_leave_one_out_values():
    rng = np.random.default_rng(0)
    draws = rng.normal(size=(12, 40)) + 0.3
    c = rng.normal(size=40) * 0.1
    u, loo = jackknife.u_statistic((draws - c).T, np.ones(12), np.zeros(40, int), 1)
    assert u[0] == pytest.approx(_mean_minus_se(draws, c), rel=1e-12)
    for j in range(12):
        assert loo[0, j] == pytest.approx(_mean_minus_se(np.delete(draws, j, 0), c), rel=1e-10)


def test_slices_pool_by_adding():
    """Two slices of one ensemble: the statistic and its leave-one-out values of the pool are
    the sums of the slices' (the normalisation depends only on the blocks)."""
    rng = np.random.default_rng(1)
    y, n = rng.normal(size=(30, 9)), rng.integers(1, 4, size=9)
    codes = np.repeat([0, 1], 15)
    u, loo = jackknife.u_statistic(y, n, codes, 2)
    u1, loo1 = jackknife.u_statistic(y, n, np.zeros(30, int), 1)
    assert u.sum() == pytest.approx(u1[0], rel=1e-12)
    np.testing.assert_allclose(loo.sum(0), loo1[0], rtol=1e-12)


def test_unequal_blocks_are_unbiased():
    """Blocks of 1-3 draws: the estimate averages to the true squared size."""
    rng = np.random.default_rng(2)
    n = np.array([1, 2, 3, 2, 1, 3, 2, 2])
    b = np.linspace(-0.2, 0.2, 20)
    est = [jackknife.u_statistic(np.stack([rng.normal(size=(k, 20)).sum(0) + k * b for k in n], 1), n,
                                 np.zeros(20, int), 1)[0][0] for _ in range(4000)]
    # the estimate's sd is about 0.16 here, so 4000 draws pin its mean to +-0.008 (3 SE)
    assert np.mean(est) == pytest.approx((b**2).sum(), abs=0.008)


def test_gap_of_two_ensembles_and_its_leave_one_out_values():
    rng = np.random.default_rng(3)
    da, db = rng.normal(size=(10, 25)) + 0.1, rng.normal(size=(14, 25))
    g, la, lb = jackknife.gap_statistic(da.T, np.ones(10), db.T, np.ones(14), np.zeros(25, int), 1)

    def direct(a, b):
        return float(((a.mean(0) - b.mean(0)) ** 2).sum() - (a.var(0, ddof=1) / len(a) + b.var(0, ddof=1) / len(b)).sum())

    assert g[0] == pytest.approx(direct(da, db), rel=1e-12)
    assert la[0, 3] == pytest.approx(direct(np.delete(da, 3, 0), db), rel=1e-10)
    assert lb[0, 7] == pytest.approx(direct(da, np.delete(db, 7, 0)), rel=1e-10)


@pytest.mark.parametrize("structure", ["independent", "shared"])
@pytest.mark.parametrize("bias", [0.0, 0.3])
def test_interval_covers_the_true_size(structure, bias):
    """16 blocks, 100 points; "shared": every point carries the draw's common component (the
    points of one ensemble share its members). 400 draws: the binomial SE of a 95% coverage is
    1.1%, so 0.92 is nearly 3 SE below nominal; measured 0.97-1.0 (the jackknife's variance
    errs upwards)."""
    rng = np.random.default_rng(4)
    k, p = 16, 100
    b = bias * np.linspace(-1, 1, p)
    covered = 0
    for _ in range(400):
        noise = rng.normal(size=(k, p)) * 0.3
        if structure == "shared":
            noise += rng.normal(size=(k, 1))
        u, loo = jackknife.u_statistic((noise + b).T, np.ones(k), np.zeros(p, int), 1)
        lo, hi, _ = jackknife.one_sample(u[0], loo[0])
        covered += lo <= (b**2).sum() <= hi
    assert covered / 400 >= 0.92


def test_too_few_blocks_give_no_interval():
    lo, hi, k = jackknife.one_sample(1.0, np.ones(jackknife.MIN_BLOCKS - 1))
    assert np.isnan(lo) and np.isnan(hi) and k == jackknife.MIN_BLOCKS - 1


def _unit(spec, start, stop, uid, store_members):
    return UnitSpec(unit_id=uid, study_seed=0, model=spec, width=8, member_start=start, member_stop=stop, lr=0.5,
                    steps=10, log_steps=[0], dtype="float64", device="cpu", store_members=store_members)


def _parts(spec, preds, splits, store_members, tmp_path):
    tables = []
    for start, stop, uid in splits:
        w = PartWriter(_unit(spec, start, stop, uid, store_members), tmpdir=str(tmp_path))
        w.log(0, "train", preds[start:stop])
        tables.append(pq.read_table(pa.BufferReader(w.finish({}))))
    # units in reverse order: the reader must put blocks in member order itself
    table = pa.concat_tables(tables[::-1])
    table = table.append_column("model", pa.array(["m"] * table.num_rows))
    return table.append_column("width", pa.array([8] * table.num_rows, pa.int32()))


@pytest.mark.parametrize("store_members", [False, True])
@pytest.mark.parametrize("pairing", ["independent", "antithetic"])
def test_parts_store_the_blocks(tmp_path, store_members, pairing):
    rng = np.random.default_rng(5)
    members = 2 * MAX_BLOCKS + 8  # the first unit's draws need grouping when unpaired
    preds = rng.standard_normal((members, 3, 4, 2))
    spec = ModelSpec(name="m", arch="mlp", pairing=pairing)
    table = _parts(spec, preds, [(0, members - 8, "a"), (members - 8, members, "b")], store_members, tmp_path)
    stats = ensemble_stats(table.select(COLUMNS + OPTIONAL))
    blocks = ensemble_blocks(table.select(COLUMNS + BLOCK_COLUMNS))
    b = blocks[("m", 8, 0.5)]
    draws = preds.reshape(members // 2, 2, 3, 4, 2).mean(1) if pairing == "antithetic" else preds
    draws = draws.reshape(len(draws), -1)  # rows in (sample, group element, output) order, as the stats
    assert b.counts.sum() == len(draws)
    assert b.sums.shape == (len(stats), len(b.counts))
    if store_members:
        assert (b.counts == 1).all()
    else:
        assert len(b.counts) <= 2 * MAX_BLOCKS
    np.testing.assert_allclose(b.sums[stats["block_row"]].sum(1) / b.counts.sum(), stats["mean"], rtol=1e-12)
    # block sums are sums of consecutive draws, in member order
    edges = np.concatenate([[0], np.cumsum(b.counts.astype(int))])
    for k in (0, len(b.counts) - 1):
        np.testing.assert_allclose(b.sums[stats["block_row"], k], draws[edges[k]:edges[k + 1]].sum(0), rtol=1e-12)


def test_results_without_blocks_keep_the_worst_case_bound(tmp_path):
    rng = np.random.default_rng(6)
    preds = rng.standard_normal((16, 3, 4, 1))
    table = _parts(ModelSpec(name="m", arch="mlp"), preds, [(0, 16, "a")], False, tmp_path)
    assert ensemble_blocks(table.select(COLUMNS)) == {}
    stats = ensemble_stats(table.select(COLUMNS + OPTIONAL)).assign(mu=0.3, var_theory=1.0, z=0.0, z_theory=0.0)
    old = compare.agreement(stats)
    new = compare.agreement(stats, ensemble_blocks(table.select(COLUMNS + BLOCK_COLUMNS)))
    assert (old["interval"] == "worst-case bound").all()
    assert new["interval"].str.startswith("jackknife").all()
    # the same estimate (one draw a block), a much shorter interval
    np.testing.assert_allclose(new["bias2"], old["bias2"], rtol=1e-10)
    assert (new["bias2_hi"] < old["bias2_hi"]).all()
    pooled = compare.pooled_errors(new.assign(step=1), ["model", "lr", "width"])
    assert pooled["interval"].iloc[0].startswith("jackknife") and np.isfinite(pooled["rel_bias_hi"]).all()
    assert isinstance(pd.read_parquet(_roundtrip(new, tmp_path))["bias2_loo"].iloc[0], np.ndarray)


def _roundtrip(frame: pd.DataFrame, tmp_path) -> str:
    path = str(tmp_path / "agreement.parquet")
    frame.to_parquet(path, index=False)
    return path
