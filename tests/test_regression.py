"""Kernel-regression studies (``kind: kernel_regression``): the study file, the rotated-digits
source, the docs/theory.md §6 identity on predictions, and small studies end to end (rotated
digits in local Ray mode, with kernel reuse on rerun; a PathMNIST-shaped stand-in .npz)."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from eqntk.cli import main
from study.config import EnsembleStudy, RegressionStudy, RotatedDigitsSource, parse_study

BUILTIN = Path(__file__).resolve().parents[1] / "study" / "builtin"

# a file, not a fixture: BAD below needs it at import (conftest's regression_small_study serves it too)
SMALL = (Path(__file__).parent / "studies" / "regression_small.yaml").read_text()


def write(d: Path, text: str, name="study.yaml") -> Path:
    p = d / name
    p.write_text(textwrap.dedent(text))
    return p


# ----- the study file --------------------------------------------------------------------
BAD = [
    ("augmented CNN whose kernel is not jointly invariant",
     SMALL.replace("{name: cnn_aug, arch: cnn, depth: 1, augmentation: full_orbit}",
                   "{name: cnn_aug, arch: cnn, depth: 1, augmentation: full_orbit, tap_variance: ramp}"),
     ["tap_variance", "jointly invariant", "filter_support"]),
    ("ensemble field in a regression study", SMALL.replace("seed: 1", "seed: 1\nwidths: [8]"), ["widths", "kernel_regression", "remove"]),
    ("no regression section", SMALL[: SMALL.index("regression:")] + SMALL[SMALL.index("models:"):],
     ["regression", "required", "add it"]),
    ("regression section in an ensemble study", SMALL.replace("kind: kernel_regression", "kind: ensemble"),
     ["regression", "kind: kernel_regression"]),
    ("unknown kind", SMALL.replace("kind: kernel_regression", "kind: regresion"), ["kind", "regresion"]),
    ("size beyond the pool", SMALL.replace("sizes: [6, 12]", "sizes: [6, 40]"), ["regression.sizes", "40", "24"]),
    ("unknown kernel", SMALL.replace("kernels: [ntk, nngp]", "kernels: [ntk, rbf]"), ["regression.kernels", "rbf"]),
    ("negative time", SMALL.replace("times: [inf, 50.0]", "times: [-1.0]"), ["regression.times", "positive"]),
    ("unlabelled test set", SMALL.replace("test: {source: rotated_digits, n: 12, start: 1000}", "test: {source: gaussian, n: 4}"),
     ["regression.test", "no labels"]),
    ("rotated digits under a group inexact on the grid", SMALL.replace("n: 24}", "n: 24, group: C8}"), ["rotated_digits", "C8"]),
]


@pytest.mark.parametrize("case,text,words", BAD, ids=[c[0] for c in BAD])
def test_bad_regression_study_refused(tmp_path, refused, case, text, words):
    refused(write(tmp_path, text), tmp_path / "out", words)


def test_ensemble_study_still_needs_its_fields():
    text = textwrap.dedent(SMALL)
    text = text[: text.index("regression:")] + text[text.index("models:"):]
    text = text.replace("kind: kernel_regression\n", "")
    with pytest.raises(ValueError, match="widths: required field is missing; add it"):
        parse_study(text)


def test_regression_study_needs_no_ensemble_fields():
    cfg = parse_study(textwrap.dedent(SMALL))
    assert isinstance(cfg, RegressionStudy) and cfg.kind == "kernel_regression"
    # its schema has none of the ensemble's fields, and the ensemble's has no regression
    assert not {"widths", "ensemble_size", "members_per_unit", "lr", "steps", "log_steps"} & set(RegressionStudy.model_fields)
    assert "eval" not in type(cfg.data).model_fields and "regression" not in EnsembleStudy.model_fields
    assert cfg.regression.resolved_sizes == [6, 12]
    assert cfg.regression.resolved_times == [np.inf, 50.0]
    log = parse_study(textwrap.dedent(SMALL).replace("sizes: [6, 12]", "sizes: {min: 10, max: 500, count: 8}"))
    s = log.regression.resolved_sizes
    assert s[0] == 10 and s[-1] == 500 and len(s) == 8


# ----- rotated digits ---------------------------------------------------------------------
def test_rotated_digits_are_digits_turned_by_group_elements():
    from study.data import _digits, _rotated_digits
    from study.groups import Group

    src = RotatedDigitsSource(source="rotated_digits", n=60, start=100)
    x, lab, classes = _rotated_digits(src, 0, "C4")
    x0, lab0, _ = _digits(src, 0)
    g = Group.parse("C4")
    assert classes == 10 and np.array_equal(lab, lab0)
    found = []
    for a in range(len(x)):
        hits = [e for e in range(4) if np.array_equal(g.act_image(x0[a], e), x[a])]
        assert hits, a
        found.append(hits[0])
    assert len(set(found)) == 4  # every rotation occurs among 60 digits
    again, _, _ = _rotated_digits(src, 0, "C4")
    assert np.array_equal(x, again)  # seeded
    # a digit is turned the same way whichever slice includes it
    wide, _, _ = _rotated_digits(RotatedDigitsSource(source="rotated_digits", n=80, start=80), 0, "C4")
    assert np.array_equal(wide[20:80], x)


# ----- docs/theory.md §6 on the regression predictions -----------------------------------
def test_augmented_cnn_and_canonical_gcnn_predict_the_same():
    """The orbit-averaged CNN kernel equals the canonical C4 GCNN kernel (identity and full
    support), so NTK and NNGP regression predict the same at every size and time. Tolerance
    1e-8 on predictions of order 1: the kernels agree to ~1e-14 relative (float64 rounding),
    amplified by at most cond(K + 1e-4 I) <= ~1e4 (the ridge is relative to the mean diagonal)."""
    from analysis.kernels import mean_kernel_fn
    from analysis.regression import draw_indices, normalised, predict_curve
    from study.data import _normalize, _rotated_digits
    from study.spec import ModelSpec

    x, lab, _ = _rotated_digits(RotatedDigitsSource(source="rotated_digits", n=30), 0, "C4")
    xt, _, _ = _rotated_digits(RotatedDigitsSource(source="rotated_digits", n=8, start=1000), 0, "C4")
    x, xt = _normalize(x), _normalize(xt)
    y = np.eye(10)[lab] - 0.1
    specs = [ModelSpec(name="cnn_aug", arch="cnn", depth=1, augmentation="full_orbit"),
             ModelSpec(name="gcnn", arch="gcnn", depth=1, support="identity"),
             ModelSpec(name="gcnn_full", arch="gcnn", depth=1, support="full")]
    preds = {}
    for s in specs:
        kf = mean_kernel_fn(s, x.shape[1:], 10)
        kp, kt = kf(x, None), kf(xt, x)
        for k in ("ntk", "nngp"):
            p, t = normalised(kp[k], kt[k])
            preds[s.name, k] = np.stack([
                predict_curve(p, t, y, draw_indices(0, 30, n, 0), [np.inf, 5.0, 100.0], 1e-4) for n in (5, 15, 30)
            ])
    for k in ("ntk", "nngp"):
        ref = preds["cnn_aug", k]
        assert np.abs(ref).max() > 0.05  # not trivially zero
        for other in ("gcnn", "gcnn_full"):
            np.testing.assert_allclose(preds[other, k], ref, rtol=0, atol=1e-8)


# ----- end to end ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("reg")
    study = write(d, SMALL)
    out = d / "out"
    assert main(["run", str(study), "--out", str(out)]) == 0
    return d, study, out


def test_small_study_tables_and_report(small_run):
    d, study, out = small_run
    t = pd.read_parquet(out / "regression.parquet")
    assert len(t) == 3 * 2 * 2 * 2 * 3  # models x kernels x times x sizes x draws
    assert {"model", "kernel", "time", "size", "draw", "test_accuracy", "test_mse"} <= set(t.columns)
    assert t.test_accuracy.between(0, 1).all() and (t.test_mse > 0).all()
    assert (out / "regression.csv").is_file()
    assert (out / "report" / "learning_curves.png").stat().st_size > 1000
    page = (out / "report" / "index.html").read_text()
    assert "best test accuracy" in page and "learning_curves.png" in page
    # the same draws for every model: cnn_aug and gcnn coincide row by row (section 6)
    a = t[t.model == "cnn_aug"].reset_index(drop=True)
    b = t[t.model == "gcnn"].reset_index(drop=True)
    np.testing.assert_allclose(a.test_mse, b.test_mse, rtol=1e-9)
    pairs = pd.read_csv(out / "regression_pairs.csv")
    same = pairs[(pairs.a_model == "cnn_aug") & (pairs.b_model == "gcnn")]
    assert len(same) and (same.mean_diff.abs() < 1e-9).all()


def test_rerun_with_more_sizes_reuses_kernels(small_run, capsys):
    d, study, out = small_run
    metas = sorted((out / "kernels").glob("*.json"))
    assert len(metas) == 3
    stamps = [m.stat().st_mtime_ns for m in metas]
    more = write(d, SMALL.replace("sizes: [6, 12]", "sizes: [3, 6, 12, 24]").replace("draws: 3", "draws: 4"), "more.yaml")
    assert main(["run", str(more), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.count("from cache") == 3
    assert [m.stat().st_mtime_ns for m in sorted((out / "kernels").glob("*.json"))] == stamps
    t = pd.read_parquet(out / "regression.parquet")
    assert sorted(t["size"].unique()) == [3, 6, 12, 24] and t.draw.nunique() == 4
    assert main(["status", str(out)]) == 0
    assert "3 of 3" in capsys.readouterr().out


def test_directory_of_one_kind_refuses_a_study_of_the_other(small_run, tmp_path, capsys):
    d, study, out = small_run
    ensemble = write(tmp_path, """
        name: tiny
        data: {train: {source: digits, n: 6}}
        models: [{name: mlp, arch: mlp, depth: 1}]
        widths: [8]
        ensemble_size: 2
        lr: 0.5
        steps: 2
        log_steps: [0, 2]
        """)
    assert main(["run", str(ensemble), "--out", str(out), "--no-progress"]) == 2
    assert "holds results of a different study" in capsys.readouterr().err
    ens_dir = tmp_path / "ens"
    ens_dir.mkdir()
    (ens_dir / "study.json").write_text(json.dumps({"config": {"kind": "ensemble"}}))
    assert main(["run", str(study), "--out", str(ens_dir)]) == 2
    assert "holds an ensemble study" in capsys.readouterr().err


# ----- PathMNIST-shaped data ----------------------------------------------------------------
def _pathmnist_standin(path: Path, n_train=16, n_test=8, seed=0):
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", n_train), ("val", 4), ("test", n_test)):
        arrays[f"{split}_images"] = rng.integers(0, 256, size=(n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 9, size=(n, 1)).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def test_pathmnist_study_missing_file_says_where(tmp_path, capsys):
    study = tmp_path / "pathmnist.yaml"
    study.write_text((BUILTIN / "pathmnist.yaml").read_text())
    assert main(["validate", str(study)]) == 2
    err = capsys.readouterr().err
    assert "data.path" in err and str(tmp_path / "data" / "pathmnist.npz") in err and "MedMNIST" in err


def test_pathmnist_standin_runs_unchanged_but_smaller(tmp_path):
    """The shipped PathMNIST study, only its counts shrunk (28x28x3 kernels are dear; the
    models, data source, kernels and regression settings are the shipped ones, minus the D4
    model to stay inside the test budget), runs on a generated MedMNIST-layout file."""
    cfg = yaml.safe_load((BUILTIN / "pathmnist.yaml").read_text())
    cfg["data"]["train"]["n"] = 6
    cfg["regression"]["test"]["n"] = 3
    cfg["regression"]["sizes"] = [3, 6]
    cfg["regression"]["draws"] = 2
    cfg["regression"]["block_size"] = 6
    cfg["models"] = [m for m in cfg["models"] if m["name"] in ("cnn", "gcnn")]
    study = tmp_path / "pathmnist.yaml"
    study.write_text(yaml.safe_dump(cfg))
    _pathmnist_standin(tmp_path / "data" / "pathmnist.npz")
    out = tmp_path / "out"
    assert main(["run", str(study), "--out", str(out)]) == 0
    t = pd.read_parquet(out / "regression.parquet")
    assert len(t) == 2 * 2 * 1 * (2 + 1)  # models x kernels x times x (2 draws at n = 3, 1 at n = 6 = the pool)
    with np.load(out / "inputs.npz") as z:
        assert z["train_x"].shape == (6, 3, 28, 28) and z["train_y"].shape == (6, 9)
    assert (out / "report" / "index.html").is_file()
