"""Kernel regression on molecular energies (docs/theory.md §7, molecules): per-atom kernels
summed over atoms, their symmetries, MAE/RMSE learning curves with confidence intervals, the
per-element baseline, the ``molecules`` study source, and a tiny study end to end.

Fast: no PySCF. The end-to-end study reads a ``MoleculeSet`` saved as ``.npz`` (``set: npz``)
built from the code's geometries with made-up energies; the built-in PySCF set is exercised by
``eqntk run study/builtin/molecules.yaml`` (docs/study.md)."""

import math
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from analysis.regression import (
    atom_engine, cached_molecule_kernels, ci95, fit_baseline, learning_curves, molecule_kernel,
    molecule_matrix, paired_differences, psd_projected, regression_metrics, summarize,
)
from study import molecules as M
from eqntk.cli import main
from study.config import MoleculesSource, StudyError, parse_study
from study.spec import ModelSpec

SO3 = ModelSpec(name="so3", arch="so3_gcnn", group="SO3", depth=2, bands=(3, 3), so3_grid=3,
                kernel_mode="relative", sigma_b=0.1)
MLP = ModelSpec(name="mlp", arch="sphere_mlp", group="SO3", depth=2, sigma_b=0.1)
NAMES = ["H2O", "NH3", "CH4", "HCN", "CH3OH", "H2CO", "HF", "CH3F"]


def _atoms(spec, x1, x2=None):
    return atom_engine(spec, x1.shape[1:], 1)(x1, x2)


# ----- the molecule kernel is the double sum over atoms ---------------------------------
def test_molecule_kernel_is_the_double_sum_over_atoms(tmp_path):
    rng = np.random.default_rng(0)
    L, C, A = 3, 2, 4
    mask_p = np.array([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], bool)
    mask_t = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
    xp = rng.standard_normal((3, A, C, 2 * L, 2 * L)) * mask_p[..., None, None, None]
    xt = rng.standard_normal((2, A, C, 2 * L, 2 * L)) * mask_t[..., None, None, None]
    # padding atoms hold garbage: the masks alone must keep them out
    xp[~mask_p] = 7.0
    xt[~mask_t] = -3.0
    a = molecule_matrix(mask_p).toarray()
    assert a.shape == (3, mask_p.sum()) and np.array_equal(a.sum(axis=1), mask_p.sum(axis=1))
    for spec in (MLP, SO3):
        out = cached_molecule_kernels(tmp_path, spec, xp, mask_p, xt, mask_t, use_ray=False, block_size=3,
                                      log=lambda *_: None)
        for kname in ("nngp", "ntk"):
            for X, mX, key in ((xp, mask_p, "pool"), (xt, mask_t, "test")):
                want = np.zeros((len(X), len(xp)))
                for m in range(len(X)):
                    for n in range(len(xp)):
                        for i in np.flatnonzero(mX[m]):
                            for j in np.flatnonzero(mask_p[n]):
                                want[m, n] += _atoms(spec, X[m, i][None], xp[n, j][None])[kname][0, 0]
                np.testing.assert_allclose(out[f"{kname}_{key}"], want, rtol=1e-10, atol=1e-10 * np.abs(want).max())
        again = cached_molecule_kernels(tmp_path, spec, xp, mask_p, xt, mask_t, use_ray=False, log=lambda *_: None)
        assert again["cached"] and np.array_equal(again["ntk_pool"], out["ntk_pool"])


def test_psd_projection_clips_only_negative_eigenvalues():
    rng = np.random.default_rng(1)
    v = np.linalg.qr(rng.standard_normal((5, 5)))[0]
    k = (v * np.array([-1e-3, 0.0, 0.5, 1.0, 2.0])) @ v.T
    p, clipped = psd_projected(k)
    assert np.linalg.eigvalsh(p)[0] > -1e-12 and clipped == pytest.approx(-1e-3 / np.mean(np.diag(k)))
    assert np.abs(p - k).max() <= 1e-3 + 1e-12
    same, none = psd_projected(p + 1e-9 * np.eye(5))
    assert none == 0.0 and np.allclose(same, p + 1e-9 * np.eye(5), atol=1e-15)


# ----- symmetries: rotating or renumbering the atoms of every molecule -----------------
def _set(mols, energy=None):
    energy = np.zeros(len(mols)) if energy is None else energy
    return M.MoleculeSet.from_molecules(mols, energy, [f"m{i}" for i in range(len(mols))])


def _inputs(tmp_path, mols, name, L=3):
    from study.regression_data import load_molecules

    path = tmp_path / f"{name}.npz"
    _set(mols).save(path)
    src = MoleculesSource(source="molecules", set="npz", path=str(path), L=L)
    return load_molecules(src, 0, tmp_path)[0]


def test_so3_molecule_kernel_is_invariant_under_rotations_and_atom_order(tmp_path):
    """Each molecule turned by its own Haar rotation: the SO(3) GCNN molecule kernel stays
    within 1e-3 of its largest entry (measured 3e-4 at L = B = 3: the relative-mode quadrature;
    band-limited environments rotate exactly), while the sphere MLP's, which is not invariant
    to rotating one input, moves by > 1e-2 (measured 5e-2). Renumbering the atoms of every
    molecule changes neither kernel beyond round-off."""
    from study.regression_data import standardize_channels
    from study.sphere import dh_grid, random_rotations

    mols = [M.conformer(n, 0, 0) for n in NAMES]
    R = random_rotations(len(mols), 5)
    rng = np.random.default_rng(2)
    perms = [rng.permutation(len(z)) for z, _ in mols]
    variants = {
        "base": mols,
        "rotated": [(z, p @ R[i].T) for i, (z, p) in enumerate(mols)],
        "renumbered": [(z[q], p[q]) for (z, p), q in zip(mols, perms)],
    }
    sets = {k: _inputs(tmp_path, v, k) for k, v in variants.items()}
    base = sets["base"]
    envs, _ = standardize_channels(base.env, base.mask, *[(s.env, s.mask) for s in sets.values()],
                                   weights=dh_grid(3).weights)
    kernels = {}
    for spec in (SO3, MLP):
        for (name, s), env in zip(sets.items(), envs[1:]):
            k = _atoms(spec, env[s.mask])["ntk"]
            kernels[spec.name, name] = molecule_kernel(k, s.mask, s.mask)
    rel = lambda a, b: np.abs(a - b).max() / np.abs(a).max()
    so3_rot, mlp_rot = rel(kernels["so3", "base"], kernels["so3", "rotated"]), rel(kernels["mlp", "base"], kernels["mlp", "rotated"])
    print(f"\nrotation: so3 {so3_rot:.1e}, mlp {mlp_rot:.1e}")
    assert so3_rot < 1e-3
    assert mlp_rot > 1e-2
    for spec in ("so3", "mlp"):
        assert rel(kernels[spec, "base"], kernels[spec, "renumbered"]) < 1e-12


# ----- metrics, confidence intervals, baseline -----------------------------------------
def test_regression_metrics_and_student_t_intervals():
    mae, rmse = regression_metrics(np.array([[1.0], [2.0], [4.0]]), np.array([[1.5], [2.0], [2.0]]))
    assert mae == pytest.approx(2.5 / 3) and rmse == pytest.approx(math.sqrt(4.25 / 3))
    v = np.array([0.3, 0.5, 0.4, 0.8, 0.6])
    m, lo, hi = ci95(v)
    half = stats.t.ppf(0.975, 4) * v.std(ddof=1) / math.sqrt(5)
    assert (m, lo, hi) == pytest.approx((0.52, 0.52 - half, 0.52 + half))
    rows = []
    for d, (a, b) in enumerate(zip(v, v + np.array([0.1, 0.2, 0.1, 0.3, 0.2]))):
        for model, mae in (("so3", a), ("mlp", b)):
            rows.append(dict(model=model, kernel="ntk", time=math.inf, size=10, draw=d, test_mae=mae,
                             test_rmse=2 * mae, baseline_mae=1.0, baseline_rmse=1.5))
    t = pd.DataFrame(rows)
    s = summarize(t).set_index("model")
    assert s.loc["so3", "test_mae"] == pytest.approx(m) and s.loc["so3", "test_mae_lo"] == pytest.approx(lo)
    assert s.loc["so3", "test_rmse_hi"] == pytest.approx(2 * hi) and s.loc["so3", "draws"] == 5
    assert "test_accuracy" not in s.columns and s.loc["mlp", "baseline_mae"] == 1.0
    p = paired_differences(t)
    assert set(p.metric) == {"test_mae", "test_rmse"}  # baselines are the same for both models
    d = p[p.metric == "test_mae"].iloc[0]
    assert (d.a_model, d.b_model) == ("so3", "mlp")
    dm, dlo, dhi = ci95(-np.array([0.1, 0.2, 0.1, 0.3, 0.2]))
    assert (d.mean_diff, d.ci_lo, d.ci_hi) == pytest.approx((dm, dlo, dhi)) and d.significant


def test_per_element_baseline_and_regression_learning_curves():
    """Targets exactly linear in the element counts: the baseline fitted on a training subset
    predicts the test set exactly, and the kernel, left with zero residuals, adds nothing."""
    rng = np.random.default_rng(3)
    counts = rng.integers(0, 4, size=(40, 5)).astype(float)
    per_atom = np.array([-0.5, -3.0, -2.5, -2.0, -1.5])
    y = (counts @ per_atom)[:, None]
    coef = fit_baseline(counts[:30], y[:30], np.arange(20))
    np.testing.assert_allclose(counts[30:] @ coef, y[30:], atol=1e-10)
    x = rng.standard_normal((40, 3))
    k = x @ x.T + 1.0
    kernels = {"m": {"ntk_pool": k[:30, :30], "nngp_pool": k[:30, :30], "ntk_test": k[30:, :30], "nngp_test": k[30:, :30]}}
    kw = dict(sizes=[10, 30], draws=3, kernel_names=["ntk"], times=[math.inf], diag_reg=1e-4, seed=0, task="regression")
    t = learning_curves(kernels, {"m": MLP}, y[:30], y[30:], baseline=(counts[:30], counts[30:]), **kw)
    assert len(t) == 3 + 1 and {"test_mae", "test_rmse", "baseline_mae", "baseline_rmse"} <= set(t.columns)
    assert t.baseline_mae.max() < 1e-9 and t.test_mae.max() < 1e-9
    # no baseline: the kernel regresses the raw energies, and does worse than the baseline did
    raw = learning_curves(kernels, {"m": MLP}, y[:30], y[30:], **kw)
    assert "baseline_mae" not in raw.columns and raw.test_mae.min() > 1e-3
    with pytest.raises(ValueError, match="baseline"):
        learning_curves(kernels, {"m": MLP}, y[:30], y[30:], baseline=(counts[:30], counts[30:]),
                        **{**kw, "task": "classification"})


# ----- the study file and a tiny study end to end ----------------------------------------
STUDY = """
name: mol
kind: kernel_regression
seed: 0
group: SO3
data:
  train: {source: molecules, set: npz, path: mols.npz, n: 24, L: 3}
regression:
  test: {source: molecules, set: npz, path: mols.npz, n: 8, start: 24, L: 3}
  sizes: [6, 12, 24]
  draws: 3
  kernels: [ntk, nngp]
  times: [inf]
  diag_reg: 1.0e-4
  block_size: 40
models:
  - {name: so3_gcnn, arch: so3_gcnn, depth: 2, bands: [2, 2], so3_grid: 2, kernel_mode: relative, sigma_b: 0.1}
  - {name: sphere_mlp, arch: sphere_mlp, depth: 2, sigma_b: 0.1}
"""


def _fake_set(path: Path) -> None:
    """32 conformers of the built-in molecules with made-up, rotation-invariant energies: a
    per-element part plus a smooth function of the interatomic distances."""
    mols, energy = [], []
    per = {1: -0.4, 6: -4.0, 7: -3.5, 8: -3.0, 9: -2.0}
    for k in range(4):
        for n in NAMES:
            z, p = M.conformer(n, k, 0)
            d = np.linalg.norm(p[:, None] - p[None], axis=-1)[np.triu_indices(len(z), 1)]
            mols.append((z, p))
            energy.append(sum(per[int(a)] for a in z) + np.sum(np.exp(-d)) - 0.3 * np.sum(d < 1.2))
    _set(mols, np.array(energy)).save(path)


def _write(d: Path, text: str) -> Path:
    p = d / "study.yaml"
    p.write_text(textwrap.dedent(text))
    return p


@pytest.fixture(scope="module")
def mol_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("mol")
    _fake_set(d / "mols.npz")
    out = d / "out"
    assert main(["run", str(_write(d, STUDY)), "--out", str(out)]) == 0
    return d, out


def test_tiny_molecule_study_end_to_end(mol_run, capsys):
    d, out = mol_run
    t = pd.read_parquet(out / "regression.parquet")
    assert len(t) == 2 * 2 * (3 + 3 + 1)  # models x kernels x (draws at 6, 12; one at the whole pool)
    assert {"test_mae", "test_rmse", "baseline_mae", "baseline_rmse"} <= set(t.columns)
    assert "test_accuracy" not in t.columns and (t.test_mae > 0).all() and (t.test_rmse >= t.test_mae).all()
    s = pd.read_csv(out / "regression_summary.csv")
    assert {"test_mae_lo", "test_mae_hi"} <= set(s.columns)
    pairs = pd.read_csv(out / "regression_pairs.csv")
    assert {"so3_gcnn"} == set(pairs[pairs.a_model != pairs.b_model].a_model)  # a - b = so3_gcnn - sphere_mlp
    page = (out / "report" / "index.html").read_text()
    assert "lowest test MAE" in page and "eV" in page and "baseline per_element" in page
    assert (out / "report" / "learning_curves.png").stat().st_size > 1000
    with np.load(out / "inputs.npz") as z:
        assert z["train_x"].shape[:2] == z["train_z"].shape and z["train_x"].shape[2:] == (15, 6, 6)
        assert z["test_y"].shape == (8, 1)
    # a rerun reuses both models' kernels
    capsys.readouterr()
    assert main(["run", str(d / "study.yaml"), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("kernels from cache") == 2


BAD = [
    ("test set overlapping the pool", STUDY.replace("n: 8, start: 24", "n: 8, start: 20"), ["regression.test", "overlap"]),
    ("molecules against digits", STUDY.replace("test: {source: molecules, set: npz, path: mols.npz, n: 8, start: 24, L: 3}",
                                               "test: {source: digits, n: 8}"), ["regression.test", "molecules"]),
    ("set npz without a path", STUDY.replace("set: npz, path: mols.npz, n: 24", "set: npz, n: 24"), ["path", "add path"]),
    ("builtin with a path", STUDY.replace("set: npz, path: mols.npz, n: 24", "set: builtin, path: x.npz, n: 24"), ["path", "builtin"]),
    ("different L", STUDY.replace("start: 24, L: 3", "start: 24, L: 2"), ["regression.test", "L"]),
    ("too many molecules", STUDY.replace("start: 24, L: 3", "start: 30, L: 3"), ["start", "exceeds", "32"]),
    ("baseline in a classification study", None, ["regression.baseline", "molecules"]),
    ("normalize with molecules", STUDY.replace("group: SO3", "group: SO3\n# x").replace("L: 3}\nregression", "L: 3}\n  normalize: none\nregression"),
     ["data.normalize", "remove"]),
]


@pytest.mark.parametrize("case,text,words", BAD, ids=[c[0] for c in BAD])
def test_bad_molecule_studies_refused(tmp_path, refused, regression_small_study, case, text, words):
    if text is None:
        text = regression_small_study.replace("block_size: 12", "block_size: 12\n  baseline: mean")
    _fake_set(tmp_path / "mols.npz")
    refused(_write(tmp_path, text), tmp_path / "out", words)


def test_molecules_only_in_kernel_regression_studies():
    text = textwrap.dedent("""
        name: e
        data: {train: {source: molecules, n: 10}}
        widths: [8]
        ensemble_size: 2
        lr: 0.1
        steps: 1
        log_steps: [1]
        models: [{name: m, arch: mlp}]
    """)
    with pytest.raises(StudyError, match="source molecules is only for kind: kernel_regression"):
        parse_study(text)
