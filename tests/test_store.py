"""The Parquet store: schema, exact moments, atomic parts, clear errors on corrupt parts."""

import numpy as np
import pandas as pd
import pytest

from study.config import StudyError
from study.grid import UnitSpec
from study.spec import ModelSpec
from study.atomic import atomic_path
from eqntk.store import PART_SCHEMA, PartWriter, ResultStore, part_bytes_metadata, read_predictions


def unit(start=0, stop=3, members=False, uid="u0"):
    return UnitSpec(
        unit_id=uid, study_seed=0, model=ModelSpec(name="m", arch="mlp"), width=8,
        member_start=start, member_stop=stop, lr=0.5, steps=10, log_steps=[0, 10],
        dtype="float32", device="cpu", store_members=members,
    )


def commit(store, u, preds_by_step):
    w = PartWriter(u)
    for step, p in preds_by_step.items():
        w.log(step, "train", p)
    store.commit(u, w.finish({"status": "done", "steps_reached": 10}), {"status": "done", "node_id": "n"})


def test_moments_aggregate_exactly_across_units(tmp_path):
    rng = np.random.default_rng(0)
    preds = rng.standard_normal((5, 2, 4, 3))  # members, samples, |G|, outputs
    store = ResultStore(tmp_path)
    commit(store, unit(0, 3, uid="a"), {0: preds[:3]})
    commit(store, unit(3, 5, uid="b"), {0: preds[3:]})
    df = pd.read_parquet(tmp_path / "predictions")
    assert set(PART_SCHEMA.names) | {"model", "width"} == set(df.columns)
    assert len(df) == 2 * 2 * 4 * 3  # units x samples x orbit x outputs
    g = df.groupby(["sample", "group_element", "output"])[["count", "sum", "sumsq"]].sum()
    mean = (g["sum"] / g["count"]).to_numpy().reshape(2, 4, 3)
    var = ((g["sumsq"] - g["sum"] ** 2 / g["count"]) / (g["count"] - 1)).to_numpy().reshape(2, 4, 3)
    np.testing.assert_allclose(mean, preds.mean(0), rtol=1e-12)
    np.testing.assert_allclose(var, preds.var(0, ddof=1), rtol=1e-10)
    devsq = df.groupby(["sample", "group_element", "output"])["orbit_devsq"].sum().to_numpy().reshape(2, 4, 3)
    own = preds - preds.mean(axis=2, keepdims=True)  # each member against its own orbit mean
    np.testing.assert_allclose(devsq, (own**2).sum(0), rtol=1e-12)
    assert (df["time"] == 0).all() and (df["width"] == 8).all() and (df["model"] == "m").all()


def test_member_rows(tmp_path):
    preds = np.arange(2 * 1 * 2 * 1, dtype=float).reshape(2, 1, 2, 1)
    store = ResultStore(tmp_path)
    commit(store, unit(4, 6, members=True), {10: preds})
    df = pd.read_parquet(tmp_path / "predictions").sort_values(["member", "group_element"])
    assert df["member"].tolist() == [4, 4, 5, 5]
    assert df["prediction"].tolist() == preds.reshape(-1).tolist()
    assert (df["time"] == 5.0).all()


def test_part_is_atomic_and_metadata_travels(tmp_path):
    u = unit()
    w = PartWriter(u)
    w.log(0, "train", np.zeros((3, 1, 1, 1)))
    store = ResultStore(tmp_path)
    assert not store.is_done(u)
    part = w.finish({"status": "diverged", "steps_reached": 7})
    assert part_bytes_metadata(part)["steps_reached"] == 7
    store.commit(u, part, {"status": "diverged", "steps_reached": 7})
    assert store.is_done(u)
    assert store.unit_states([u]) == {"u0": "diverged"}
    assert not list(tmp_path.rglob(".*"))  # no temp files left behind


def test_corrupt_part_named(tmp_path):
    store = ResultStore(tmp_path)
    commit(store, unit(), {0: np.zeros((3, 1, 1, 1))})
    part = store.part_path(unit())
    part.write_bytes(part.read_bytes()[:40])  # truncated
    with pytest.raises(StudyError) as e:
        read_predictions(tmp_path)
    assert str(part) in str(e.value) and "eqntk run" in str(e.value)


def test_lock_refuses_second_driver(tmp_path):
    a, b = ResultStore(tmp_path), ResultStore(tmp_path)
    a.lock()
    with pytest.raises(StudyError, match="in use"):
        b.lock()
    a.unlock()
    b.lock()
    b.unlock()


def test_atomic_path_whole_file_or_none(tmp_path):
    """Analysis and report files: a writer that fails midway leaves neither a half file nor its temp."""
    target = tmp_path / "out" / "table.csv"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.suffix == ".csv" and tmp.parent == target.parent
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert list(target.parent.iterdir()) == []
    with atomic_path(target) as tmp:
        pd.DataFrame({"a": [1]}).to_csv(tmp, index=False)
    assert target.read_text() == "a\n1\n" and list(target.parent.iterdir()) == [target]


def test_compacted_units_are_done_and_read_once(tmp_path):
    """A unit is stored when its part exists or a compacted file lists it; a part a compacted file
    also lists (a compaction killed before deleting it) is skipped, never read twice."""
    from eqntk.compact import compact

    rng = np.random.default_rng(2)
    store = ResultStore(tmp_path)
    units = [unit(2 * i, 2 * i + 3, uid=f"u{i}") for i in range(3)]
    for u in units:
        commit(store, u, {0: rng.standard_normal((3, 1, 2, 1))})
    ref = read_predictions(tmp_path).to_pandas()
    saved = {u.unit_id: store.part_path(u).read_bytes() for u in units}
    assert compact(store).files == 1
    assert all(store.is_done(u) and not store.part_path(u).exists() for u in units)
    assert store.unit_states(units) == {u.unit_id: "done" for u in units}
    store.part_path(units[1]).write_bytes(saved["u1"])  # a leftover part
    pd.testing.assert_frame_equal(read_predictions(tmp_path).to_pandas(), ref, check_exact=True)
    assert store.finished_ids() == {"u0", "u1", "u2"}
    assert compact(store).leftovers == 1 and not store.part_path(units[1]).exists()
    # a corrupt compacted file is named, with how to regenerate its units
    (f,) = tmp_path.rglob("compact-*.parquet")
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(StudyError) as e:
        store.unit_states(units)
    assert str(f) in str(e.value) and "eqntk run" in str(e.value)
