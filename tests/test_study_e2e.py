"""A tiny study end to end in local Ray mode: the documented columns, the row count the
grid implies, identical values on rerun with the same seed, and resume semantics."""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from eqntk.cli import main
from eqntk.store import PART_SCHEMA

@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_study) -> Path:
    d = tmp_path_factory.mktemp("tiny")
    p = d / "tiny.yaml"
    p.write_text(tiny_study())
    return p


@pytest.fixture(scope="module")
def first_run(study):
    out = study.parent / "run1"
    assert main(["run", str(study), "--out", str(out), "--no-progress", "--no-analysis"]) == 0
    return out


def load(out: Path) -> pd.DataFrame:
    df = pd.read_parquet(out / "predictions")
    df["model"] = df["model"].astype(str)
    return df.sort_values(["model", "width", "member_start", "step", "eval_set", "sample", "group_element", "output"]).reset_index(drop=True)


def test_columns_and_row_count(first_run):
    df = load(first_run)
    assert set(df.columns) == set(PART_SCHEMA.names) | {"model", "width"}
    units = 2 * 2 * 2  # models x widths x member chunks
    per_unit = 4 * (6 + 3) * 4 * 10  # log steps x (train + noise inputs) x |C4| x outputs
    assert len(df) == units * per_unit
    assert sorted(df["step"].unique()) == [0, 1, 5, 20]
    assert (df["count"] == 2).all()
    assert np.isfinite(df["sum"]).all()
    assert len(list((first_run / "predictions").rglob("part-*.parquet"))) == units


def test_rerun_same_seed_identical(study, first_run):
    out = study.parent / "run2"
    assert main(["run", str(study), "--out", str(out), "--no-progress", "--no-analysis"]) == 0
    a, b = load(first_run), load(out)
    pd.testing.assert_frame_equal(a, b)


def test_finished_directory_not_overwritten(study, first_run, capsys):
    assert main(["run", str(study), "--out", str(first_run), "--no-progress", "--no-analysis"]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["run", str(study), "--out", str(first_run), "--no-progress", "--no-analysis", "--resume"]) == 0
    assert len(list((first_run / "predictions").rglob("part-*.parquet"))) == 8


def test_status(first_run, capsys):
    assert main(["status", str(first_run)]) == 0
    assert "8 done, 0 diverged, 0 failed, 0 pending" in capsys.readouterr().out


def test_corrupt_part_named_by_analyze(first_run, tmp_path, capsys):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(first_run, out)
    part = sorted((out / "predictions").rglob("part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[: len(part.read_bytes()) // 2])
    assert main(["analyze", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(part) in err and "eqntk run" in err
