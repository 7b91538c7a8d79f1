"""QM9 from the qm9pack CSVs (docs/molecules.md, "QM9"): the reader, its one-line errors, the
fast relative-mode SO(3) atom kernel against the first implementation, molecule kernels in
cached blocks, the sorted-Coulomb-matrix baseline, and a quick QM9 study end to end.

Fast and without qm9pack: the CSVs are generated in the package's layout (the built-in
geometries, displaced and rotated, with made-up energies) in temporary folders. The real
package is read by the opt-in slow test (``--runslow``)."""

import json
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from analysis import kernel_so3 as K
from analysis.coulomb import laplacian_kernel, sorted_coulomb
from analysis.regression import atom_engine, cached_molecule_kernels, molecule_kernel
from eqntk.cli import main
from study import molecules as M
from study.config import StudyError
from study.molecules import qm9_csv
from study.sphere import SO3Spec, dh_grid, isht, random_rotations, sht
from study.spec import ModelSpec

COLUMNS = ["XYZ_file", "Index", "SMILES", "InChi", "N_atoms", "Stoichiometry", "Elements", "XYZ_Ang",
           "HOMO_au", "InternalEnergy_0K_au"]
NAMES = ["H2O", "NH3", "CH4", "HCN", "CH3OH", "H2CO", "HF", "CH3F", "C2H4", "C2H6"]
REF = M.QM9_ATOMREF_U0


def _fmt(v: float) -> str:
    # the package writes numbers such as 0. and 1. (not JSON): keep that form for round values
    return f"{v:.0f}." if v == round(v) else f"{v:.10f}"


def _binding(z, p) -> float:
    """A made-up, rotation-invariant binding energy in Hartree."""
    d = np.linalg.norm(p[:, None] - p[None], axis=-1)[np.triu_indices(len(z), 1)]
    return float(-0.05 * np.sum(np.exp(-d)) - 0.01 * np.sum(d < 1.2))


def write_qm9_csvs(folder: Path, n: int = 40, seed: int = 0) -> dict:
    """``n`` molecules in two ``qm9_part*.csv`` files of the qm9pack layout, ids shuffled across
    the files; returns ``{gdb id: (z, pos, U0)}``."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ids = rng.permutation(np.arange(1, n + 1) * 3)
    truth, rows = {}, []
    for k, gid in enumerate(ids):
        name = NAMES[k % len(NAMES)]
        z, p = M.conformer(name, k, seed)
        if k == 0:  # round coordinates, which the package writes as "0." and "1."
            z, p = np.array([9, 1]), np.array([[0.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
        u0 = sum(REF[int(a)] for a in z) + _binding(z, p)
        truth[int(gid)] = (z, p, u0)
        rows.append({"XYZ_file": f"dsgdb9nsd_{gid:06d}.xyz", "Index": int(gid), "SMILES": "C", "InChi": "InChI=1S/x",
                     "N_atoms": len(z), "Stoichiometry": "[0,0,0,0,0]",
                     "Elements": "[" + ",".join(f"'{M.SYMBOLS[int(a)]}'" for a in z) + "]",
                     "XYZ_Ang": "[" + ",".join("[" + ",".join(_fmt(v) for v in r) + "]" for r in p) + "]",
                     "HOMO_au": -0.25 - 0.001 * k, "InternalEnergy_0K_au": u0})
    df = pd.DataFrame(rows, columns=COLUMNS)
    half = len(df) // 2
    df.iloc[:half].to_csv(folder / "qm9_part1.csv", index=False)
    df.iloc[half:].to_csv(folder / "qm9_part2.csv", index=False)
    return truth


# ----- the reader -------------------------------------------------------------------------
def test_csvs_read_in_id_order_with_u0_atomisation_and_property_targets(tmp_path):
    truth = write_qm9_csvs(tmp_path / "csv")
    s = M.load_qm9_csv(tmp_path / "csv")
    ids = sorted(truth)
    assert s.names.tolist() == [f"gdb_{i}" for i in ids]
    for k, gid in enumerate(ids):
        z, p, u0 = truth[gid]
        zz, pp = s.molecule(k)
        assert np.array_equal(zz, z)
        np.testing.assert_allclose(pp, p, atol=1e-9)  # written with 10 decimals
        assert s.energy[k] == pytest.approx(M.qm9_atomisation_ev(z, u0), abs=1e-9)
        assert s.energy[k] == pytest.approx(_binding(z, p) * M.HARTREE_EV, abs=1e-6)
    assert s.meta["target"] == "U0_atomisation" and "eV" in s.meta["energy"]
    homo = M.load_qm9_csv(tmp_path / "csv", target="HOMO_au")
    assert homo.energy[0] == pytest.approx((-0.25 - 0.001 * list(truth).index(ids[0])) * M.HARTREE_EV)
    assert len(M.load_qm9_csv(tmp_path / "csv", limit=5)) == 5


def test_methane_u0_atomisation_matches_qm9():
    # gdb 1 (methane): U0 -40.478930 Ha, atomisation -0.631066 Ha = -17.172 eV (docs/molecules.md)
    assert M.qm9_atomisation_ev(np.array([6, 1, 1, 1, 1]), -40.478930) == pytest.approx(-17.1722, abs=1e-3)


@pytest.mark.parametrize("target,words", [("nope", ["target", "'nope'", "U0_atomisation", "HOMO_au"]),
                                          ("SMILES", ["target", "SMILES", "not numeric"])])
def test_unknown_or_text_target_is_one_line_naming_the_field(tmp_path, target, words):
    write_qm9_csvs(tmp_path / "csv", n=6)
    with pytest.raises(StudyError) as e:
        M.load_qm9_csv(tmp_path / "csv", target=target)
    assert len(str(e.value).splitlines()) == 1 and all(w in str(e.value) for w in words)


def test_missing_extra_names_the_install_command(monkeypatch):
    monkeypatch.setattr(qm9_csv.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(StudyError, match=r"qm9pack package is not installed; run .*qm9pack==1\.0\.3.*\.\[qm9\]"):
        M.load_qm9_csv()


def test_damaged_rows_are_one_line_errors(tmp_path):
    write_qm9_csvs(tmp_path / "csv", n=6)
    f = tmp_path / "csv" / "qm9_part1.csv"
    df = pd.read_csv(f)
    df.loc[0, "XYZ_Ang"] = "[[0.1,0.2],[x,1,2]]"
    df.to_csv(f, index=False)
    with pytest.raises(StudyError, match=r"XYZ_Ang: .* not a number"):
        M.load_qm9_csv(tmp_path / "csv")
    df.loc[0, "XYZ_Ang"], df.loc[0, "Elements"] = "[[0.1,0.2,0.3]]", "['C','Xe']"
    df.to_csv(f, index=False)
    with pytest.raises(StudyError, match=r"Elements: .*H, C, N, O, F"):
        M.load_qm9_csv(tmp_path / "csv")


# ----- the fast relative-mode kernel is the first implementation, to round-off -------------
@pytest.mark.parametrize("L", [3, 4])
def test_fast_relative_kernel_equals_the_reference(L):
    rng = np.random.default_rng(L)
    spec = SO3Spec(channels=5, L_in=L, bands=(L, L), B=L, sigma_b=0.1)
    x = isht(sht(rng.standard_normal((23, 5, 2 * L, 2 * L)), dh_grid(L), L - 1), dh_grid(L))
    old = K._so3_relative_reference(spec, x[:9], x)
    new = K._so3_relative(spec, x[:9], x)
    sym = K._so3_relative(spec, x)  # tiles on and above the diagonal only
    ref_sym = K._so3_relative_reference(spec, x)
    # The two implementations sum the same products in different orders (channel sums before
    # or after the synthesis): they agree to float64 round-off, measured ~5e-16 of the largest
    # entry; 1e-13 allows for the acos of the dual activations amplifying it near +-1.
    for a, b in zip(old + ref_sym, new + sym):
        assert float((a - b).abs().max() / a.abs().max()) < 1e-13
    assert torch.equal(sym[0], sym[0].T) and torch.equal(sym[1], sym[1].T)


def test_small_tiles_cover_every_pair(monkeypatch):
    # tiles of 1 x 1 pairs up to several per row, through the symmetric and the block paths
    rng = np.random.default_rng(1)
    spec = SO3Spec(channels=3, L_in=2, bands=(2, 2), B=2, sigma_b=0.1)
    x = isht(sht(rng.standard_normal((7, 3, 4, 4)), dh_grid(2), 1), dh_grid(2))
    want = K._so3_relative_reference(spec, x)
    for chunk in (8 * 64, 8 * 64 * 4, 8 * 64 * 9):  # P = 64 points: tiles of 1, 2 and 3 rows
        monkeypatch.setattr(K, "_PAIR_CHUNK_BYTES", chunk)
        for a, b in zip(want, K._so3_relative(spec, x)):
            assert float((a - b).abs().max() / a.abs().max()) < 1e-13


# ----- molecule kernels in cached blocks ---------------------------------------------------
SO3 = ModelSpec(name="so3", arch="so3_gcnn", group="SO3", depth=2, bands=(2, 2), so3_grid=2,
                kernel_mode="relative", sigma_b=0.1)
MLP = ModelSpec(name="mlp", arch="sphere_mlp", group="SO3", depth=2, sigma_b=0.1)


def test_blocked_molecule_kernels_equal_the_atom_matrix_sum_and_resume(tmp_path):
    rng = np.random.default_rng(0)
    L, C = 2, 3
    mask_p = rng.random((9, 5)) < 0.6
    mask_p[:, 0] = True
    mask_t = rng.random((4, 5)) < 0.6
    mask_t[:, 0] = True
    xp = rng.standard_normal((9, 5, C, 2 * L, 2 * L)) * mask_p[..., None, None, None]
    xt = rng.standard_normal((4, 5, C, 2 * L, 2 * L)) * mask_t[..., None, None, None]
    for spec in (SO3, MLP):
        kf = atom_engine(spec, (C, 2 * L, 2 * L), 1)
        full_p, full_t = kf(xp[mask_p]), kf(xt[mask_t], xp[mask_p])
        out = cached_molecule_kernels(tmp_path / spec.name, spec, xp, mask_p, xt, mask_t, use_ray=False,
                                      block_size=7, log=lambda *_: None)
        for k in ("nngp", "ntk"):
            want_p = molecule_kernel(full_p[k], mask_p, mask_p)
            # the pool block is symmetrised and made PSD: equal where it already was
            np.testing.assert_allclose(out[f"{k}_pool"], want_p, rtol=1e-12, atol=1e-12 * np.abs(want_p).max())
            np.testing.assert_allclose(out[f"{k}_test"], molecule_kernel(full_t[k], mask_t, mask_p), rtol=1e-12)
    # blocks are cached as they arrive: remove the whole-matrix cache and one block, and only it is recomputed
    for f in (tmp_path / "mlp").glob("*.npz"):
        f.unlink()
    blocks = sorted((tmp_path / "mlp" / "blocks").rglob("*.npz"))
    assert len(blocks) > 4
    blocks[0].unlink()
    logs = []
    again = cached_molecule_kernels(tmp_path / "mlp", MLP, xp, mask_p, xt, mask_t, use_ray=False, block_size=7, log=logs.append)
    assert not again["cached"] and np.allclose(again["ntk_test"], out["ntk_test"])
    assert any("1 of" in line and "blocks computed" in line for line in logs), logs
    meta = json.loads(next((tmp_path / "mlp").glob("*.json")).read_text())
    assert meta["blocks_computed"] == 1 and meta["blocks_loaded"] == meta["blocks"] - 1 and meta["cpu_seconds"] > 0


# ----- the Coulomb-matrix baseline ----------------------------------------------------------
def test_sorted_coulomb_matrix_values_and_invariances():
    z = np.array([[1, 1, 0]])
    pos = np.array([[[0, 0, 0], [0, 0, 0.741], [0, 0, 0]]], float)
    cm = sorted_coulomb(z, pos)
    # upper triangle of [[0.5, 1/0.741, 0], [., 0.5, 0], [., ., 0]]
    np.testing.assert_allclose(cm[0], [0.5, 1 / 0.741, 0, 0.5, 0, 0])
    zz, pp = M.conformer("CH3OH", 0, 0)
    R = random_rotations(1, np.random.default_rng(0))[0]
    perm = np.random.default_rng(1).permutation(len(zz))
    a = sorted_coulomb(zz[None], pp[None])
    b = sorted_coulomb(zz[perm][None], (pp[perm] @ R.T + 3.0)[None])
    np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    k = laplacian_kernel(np.vstack([a, a + 1]), np.vstack([a, a + 1]), sigma=10.0)
    np.testing.assert_allclose(np.diag(k), 1.0)
    assert k[0, 1] == pytest.approx(np.exp(-a.shape[1] / 10.0))


# ----- a quick QM9 study end to end -----------------------------------------------------------
QUICK = """
name: qm9_quick
kind: kernel_regression
seed: 1
group: SO3
data:
  train: {source: molecules, set: qm9, path: csv, n: 24, L: 2}
regression:
  test: {source: molecules, set: qm9, path: csv, n: 10, start: 24, L: 2}
  sizes: [6, 12, 24]
  draws: 3
  kernels: [ntk, nngp]
  times: [inf]
  diag_reg: 1.0e-4
  baseline: per_element
  block_size: 40
  descriptors:
    - {name: coulomb, kind: coulomb_laplacian, sigma: median}
models:
  - {name: so3_gcnn, arch: so3_gcnn, depth: 2, bands: [2, 2], so3_grid: 2, kernel_mode: relative, sigma_b: 0.1}
  - {name: sphere_mlp, arch: sphere_mlp, depth: 2, sigma_b: 0.1}
"""


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("qm9")
    write_qm9_csvs(d / "csv", n=40)
    (d / "study.yaml").write_text(textwrap.dedent(QUICK))
    out = d / "out"
    assert main(["run", str(d / "study.yaml"), "--out", str(out)]) == 0
    return d, out


def test_quick_qm9_study_end_to_end(quick_run, capsys):
    d, out = quick_run
    t = pd.read_parquet(out / "regression.parquet")
    assert set(t.model) == {"so3_gcnn", "sphere_mlp", "coulomb"}
    assert len(t) == 3 * 2 * (3 + 3 + 1)  # models x kernels x (draws at 6, 12; one at the whole pool)
    c = t[t.model == "coulomb"]
    assert (c.arch == "coulomb_laplacian").all()
    assert np.array_equal(c[c.kernel == "ntk"].test_mae.values, c[c.kernel == "nngp"].test_mae.values)
    pairs = pd.read_csv(out / "regression_pairs.csv")
    same = pairs[pairs.a_model == pairs.b_model]
    assert set(same.a_model) == {"so3_gcnn", "sphere_mlp"}  # no ntk - nngp for the descriptor (0 by construction)
    assert {("so3_gcnn", "coulomb"), ("sphere_mlp", "coulomb")} <= set(zip(pairs.a_model, pairs.b_model))
    with np.load(out / "inputs.npz") as z:
        assert z["train_pos"].shape == (*z["train_z"].shape, 3)
    # pool and test are disjoint molecules of one seeded order
    capsys.readouterr()
    assert main(["run", str(d / "study.yaml"), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.count("kernels from cache") == 2 and "coulomb: kernel from cache" in text


def test_qm9_study_errors_are_one_line(tmp_path, refused):
    write_qm9_csvs(tmp_path / "csv", n=40)
    bad = textwrap.dedent(QUICK).replace("set: qm9, path: csv, n: 24", "set: qm9, path: csv, n: 24, target: nope")
    (tmp_path / "a.yaml").write_text(bad)
    refused(tmp_path / "a.yaml", tmp_path / "out", ["target", "nope"])
    bad = textwrap.dedent(QUICK).replace("set: qm9, path: csv, n: 24", "set: npz, path: csv, n: 24, target: HOMO_au")
    (tmp_path / "b.yaml").write_text(bad)
    refused(tmp_path / "b.yaml", tmp_path / "out", ["target", "only set qm9"])


# ----- the real package (opt in) -------------------------------------------------------------
@pytest.mark.slow
def test_real_qm9pack_data():
    s = M.load_qm9_csv()
    assert len(s) == 130831 and s.names[0] == "gdb_1"
    assert s.energy[0] == pytest.approx(-17.1722, abs=1e-3)  # methane, docs/molecules.md
    assert s.z.shape[1] == 29 and 17.9 < s.mask.sum(axis=1).mean() < 18.1
    assert np.all(s.energy < 0)
    gap = M.load_qm9_csv(target="HOMO_LUMO_gap_au")
    assert 0 < gap.energy.min() and gap.energy.max() < 30  # eV


def test_committed_qm9_study_parses():
    from study.config import load_study

    cfg = load_study(Path(__file__).resolve().parent.parent / "study" / "builtin" / "qm9.yaml")
    assert cfg.data.train.set == "qm9" and cfg.data.train.path is None  # the installed qm9pack's CSVs
    assert cfg.regression.test.start >= cfg.data.train.n >= cfg.regression.resolved_sizes[-1] >= 1000
    assert cfg.regression.test.n >= 1000 and [d.kind for d in cfg.regression.descriptors] == ["coulomb_laplacian"]


@pytest.mark.slow
def test_real_qm9_study_validates(capsys):
    root = Path(__file__).resolve().parent.parent
    assert main(["validate", str(root / "study" / "builtin" / "qm9.yaml")]) == 0
    assert "pool of 1000 molecules" in capsys.readouterr().out
