"""Molecules (docs/theory.md §7): the QM9 loader on small files in the release format, atom
environments as spherical signals (rotation, permutation, values), the padded container,
and the locally generated conformer set with PySCF (tiny: H2 and H2O)."""

import tarfile

import numpy as np
import pytest

from study import molecules as M
from study.config import StudyError
from study.molecules import conformer_set
from study.sphere import dh_grid, random_rotations

# gdb 1 (methane) exactly as in the QM9 release; gdb 2 and 10 are made up in the same layout,
# with Mathematica exponents ("*^") in numbers.
CH4 = """5
gdb 1\t157.7118\t157.70997\t157.70699\t0.\t13.21\t-0.3877\t0.1171\t0.5048\t35.3641\t0.044749\t-40.47893\t-40.476062\t-40.475117\t-40.498597\t6.469\t
C\t-0.0126981359\t 1.0858041578\t 0.0080009958\t-0.535689
H\t 0.002150416\t-0.0060313176\t 0.0019761204\t 0.133921
H\t 1.0117308433\t 1.4637511618\t 0.0002765748\t 0.133922
H\t-0.540815069\t 1.4475266138\t-0.8766437152\t 0.133923
H\t-0.5238136345\t 1.4379326443\t 0.9063972942\t 0.133923
1341.307\t1341.3284\t1341.365\t1562.6731\t1562.7453\t3038.3205\t3151.6034\t3151.6788\t3151.7078
C\tC\t
InChI=1S/CH4/h1H4\tInChI=1S/CH4/h1H4
"""
NH3 = """4
gdb 2\t293.60975\t293.54111\t191.39397\t1.6256\t9.46\t-0.257\t0.0829\t0.3399\t26.1563\t0.034358\t-5.6525887*^1\t-56.523026\t-56.522082\t-56.544961\t6.316\t
N\t-0.0404260543\t 1.0241077531\t 0.0625637998\t-0.707143
H\t 0.0172574639\t 0.0125452063\t-0.0273771593\t 0.235712
H\t 0.9157893661\t 1.3587451948\t-2.87938*^-5\t 0.235712
H\t-0.5202777357\t 1.3435321258\t-0.7755426124\t 0.235712
1.2*^3\t1.3*^3
N\tN\t
InChI=1S/H3N/h1H3\tInChI=1S/H3N/h1H3
"""
HF_ = """2
gdb 10\t0.\t500.\t500.\t1.8\t5.\t-0.4\t0.1\t0.5\t10.\t0.01\t-100.39\t-100.388\t-100.387\t-100.41\t5.\t
F\t0.\t0.\t0.\t-0.4
H\t0.\t0.\t0.917\t0.4
4100.
F\tF
InChI=1S/FH/h1H\tInChI=1S/FH/h1H
"""
FILES = {"dsgdb9nsd_000010.xyz": HF_, "dsgdb9nsd_000002.xyz": NH3, "dsgdb9nsd_000001.xyz": CH4}


def qm9_dir(tmp_path, files=FILES, name="qm9"):
    d = tmp_path / name
    d.mkdir()
    for name, text in files.items():
        (d / name).write_text(text)
    return d


def qm9_tar(tmp_path, files=FILES):
    src = qm9_dir(tmp_path, files, name="src")
    path = tmp_path / "dsgdb9nsd.xyz.tar.bz2"
    with tarfile.open(path, "w:bz2") as tf:
        for name in files:  # member order 10, 2, 1: the loader must sort by id
            tf.add(src / name, arcname=name)
    return path


# ----- QM9 ------------------------------------------------------------------------------------
def test_qm9_directory_parses_in_id_order_with_atomisation_energy(tmp_path):
    s = M.load_qm9(qm9_dir(tmp_path))
    assert s.names.tolist() == ["gdb_1", "gdb_2", "gdb_10"]
    assert s.n_atoms.tolist() == [5, 4, 2]
    assert s.z.shape == (3, 5) and s.z[2].tolist() == [9, 1, 0, 0, 0]
    z, pos = s.molecule(1)
    assert z.tolist() == [7, 1, 1, 1]
    assert pos[2, 2] == pytest.approx(-2.87938e-5, abs=1e-15)  # "*^" exponent
    # CH4: U0 - (C + 4 H) = -40.47893 + 37.846772 + 4 * 0.500273 = -0.631066 Ha = -17.1722 eV
    assert s.energy[0] == pytest.approx(-0.631066 * M.HARTREE_EV, abs=1e-9)
    assert s.energy[0] == pytest.approx(-17.1722, abs=1e-3)
    # NH3's U0 written as -5.6525887*^1
    assert s.energy[1] == pytest.approx((-56.525887 + 54.583861 + 3 * 0.500273) * M.HARTREE_EV, abs=1e-9)
    assert np.all(s.pos[2, 2:] == 0) and s.mask.sum() == 11


def test_qm9_tar_streams_sorts_limits_and_excludes(tmp_path):
    tar = qm9_tar(tmp_path)
    full = M.load_qm9(tar)
    ref = M.load_qm9(tmp_path / "src")
    assert full.names.tolist() == ["gdb_1", "gdb_2", "gdb_10"]
    assert np.array_equal(full.pos, ref.pos) and np.array_equal(full.energy, ref.energy)
    assert M.load_qm9(tar, limit=2).names.tolist() == ["gdb_1", "gdb_2"]
    assert M.load_qm9(tar, limit=1).names.tolist() == ["gdb_1"]
    assert M.load_qm9(tmp_path / "src", limit=2).names.tolist() == ["gdb_1", "gdb_2"]
    assert M.load_qm9(tar, exclude=[1]).names.tolist() == ["gdb_2", "gdb_10"]
    assert M.load_qm9(tmp_path / "src", exclude=[2], limit=2).names.tolist() == ["gdb_1", "gdb_10"]
    assert M.load_qm9(tmp_path / "src" / "dsgdb9nsd_000002.xyz").names.tolist() == ["gdb_2"]


def _one_line_error(fn, *parts):
    with pytest.raises(StudyError) as e:
        fn()
    msg = str(e.value)
    assert "\n" not in msg, msg
    for p in parts:
        assert p in msg, msg
    return msg


def test_qm9_malformed_files_name_the_file_and_line(tmp_path):
    bad = CH4.replace(" 1.4637511618", " 1.46x7511618")
    d = qm9_dir(tmp_path, {**FILES, "dsgdb9nsd_000001.xyz": bad})
    _one_line_error(lambda: M.load_qm9(d), "dsgdb9nsd_000001.xyz line 5", "not a number")
    tar = tmp_path / "t" / "dsgdb9nsd.xyz.tar.bz2"
    tar.parent.mkdir()
    with tarfile.open(tar, "w:bz2") as tf:
        tf.add(d / "dsgdb9nsd_000001.xyz", arcname="dsgdb9nsd_000001.xyz")
    _one_line_error(lambda: M.load_qm9(tar), "dsgdb9nsd.xyz.tar.bz2:dsgdb9nsd_000001.xyz line 5")

    cases = {
        "line 1": "x\n" + CH4.split("\n", 1)[1],
        "line 2": CH4.replace("gdb 1\t", "gbd 1\t"),
        "truncated": "\n".join(CH4.splitlines()[:4]),
        "line 3: element 'Cl'": CH4.replace("C\t-0.0126981359", "Cl\t-0.0126981359"),
    }
    for i, (part, text) in enumerate(cases.items()):
        d = tmp_path / f"c{i}"
        d.mkdir()
        (d / "dsgdb9nsd_000001.xyz").write_text(text)
        _one_line_error(lambda: M.load_qm9(d), "dsgdb9nsd_000001.xyz", part)

    _one_line_error(lambda: M.load_qm9(tmp_path / "nope"), "not found", "dsgdb9nsd.xyz.tar.bz2")
    (tmp_path / "empty").mkdir()
    _one_line_error(lambda: M.load_qm9(tmp_path / "empty"), "has no .xyz files")
    junk = tmp_path / "junk.tar.bz2"
    junk.write_bytes(b"BZh91AY&SY" + bytes(range(256)) * 4)
    _one_line_error(lambda: M.load_qm9(junk), "junk.tar.bz2", "not a readable tar archive")
    cut = tmp_path / "cut.tar.bz2"  # an interrupted download
    cut.write_bytes(qm9_tar(tmp_path).read_bytes()[:300])
    _one_line_error(lambda: M.load_qm9(cut), "cut.tar.bz2", "not a readable tar archive", "re-download")


# ----- atom environments -------------------------------------------------------------------
def _mol(seed=0):
    return M.conformer("CH3OH", 0, seed)


def test_environments_shape_channels_and_values():
    grid = dh_grid(4)
    z, pos = _mol()
    env = M.atom_environments((z, pos), grid, powers=(1, 2, 3), radius=0.5)
    assert env.shape == (6, 15, 8, 8)
    assert M.channel_names()[:4] == ["H/r^1", "H/r^2", "H/r^3", "C/r^1"]
    # one value by hand: HF along z, H's sphere at the north pole, F channel power 2
    hf = (np.array([9, 1]), np.array([[0.0, 0, 0], [0, 0, 0.917]]))
    pts = np.array([[0.0, 0, 1], [0, 0, -1]])
    e = M.atom_environments(hf, pts, powers=(1, 2), radius=0.5)
    assert e.shape == (2, 10, 2)
    f_chan = M.ELEMENTS.index(9) * 2
    assert e[1, f_chan + 1].tolist() == pytest.approx([9 / (0.917 + 0.5) ** 2, 9 / (0.917 - 0.5) ** 2], rel=1e-14)
    assert e[0, 0].tolist() == pytest.approx([9 / (0.917 - 0.5), 9 / (0.917 + 0.5)], rel=1e-14)
    assert np.all(e[0, 2:] == 0) and np.all(e[1, 2:f_chan] == 0)  # no C, N, O; F sees no F


def test_environments_rotate_with_the_molecule_and_permute_with_atoms():
    grid = dh_grid(5)
    z, pos = _mol(3)
    rng = np.random.default_rng(0)
    for R in random_rotations(3, rng):
        moved = M.atom_environments((z, pos @ R.T + np.array([1.0, -2.0, 0.5])), grid)
        # (R s)(x) = s(R^-1 x): the original molecule's signal sampled at R^T x
        back = M.atom_environments((z, pos), grid.xyz @ R)
        np.testing.assert_allclose(moved, back, rtol=1e-12, atol=0)
    perm = rng.permutation(len(z))
    np.testing.assert_allclose(  # sums over neighbours in another order: round-off only
        M.atom_environments((z[perm], pos[perm]), grid), M.atom_environments((z, pos), grid)[perm], rtol=1e-13, atol=0
    )


def test_environments_refuse_singular_radius_and_unknown_elements():
    z, pos = M.molecule_geometry("H2O")
    _one_line_error(lambda: M.atom_environments((z, pos), dh_grid(2), radius=1.0), "apart", "lower radius")
    _one_line_error(lambda: M.atom_environments((np.array([16, 1]), pos[:2]), dh_grid(2)), "Z=16", "elements")


# ----- container --------------------------------------------------------------------------
def test_set_pads_environments_saves_and_loads(tmp_path):
    s = M.load_qm9(qm9_dir(tmp_path))
    grid = dh_grid(3)
    se = s.with_environments(grid, powers=(1, 2))
    assert se.env.shape == (3, 5, 10, 6, 6)
    assert np.all(se.env[2, 2:] == 0) and np.abs(se.env[2, :2]).sum() > 0
    z, pos = s.molecule(1)
    np.testing.assert_array_equal(se.env[1, :4], M.atom_environments((z, pos), grid, powers=(1, 2)))
    assert se.env_settings["grid_L"] == 3 and se.env_settings["powers"] == [1.0, 2.0]
    path = tmp_path / "set.npz"
    se.save(path)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file left
    back = M.MoleculeSet.load(path)
    assert back.digest() == se.digest() and back.meta == se.meta and back.env_settings == se.env_settings
    assert s.digest() != se.digest()
    other = M.MoleculeSet.load(path)
    other.energy[0] += 1e-9
    assert other.digest() != se.digest()
    sub = se.subset([2, 0])
    assert sub.names.tolist() == ["gdb_10", "gdb_1"] and sub.env.shape[0] == 2
    path.write_bytes(b"not a zip")
    _one_line_error(lambda: M.MoleculeSet.load(path), "set.npz", "not a readable .npz")


def test_conformers_are_deterministic_displaced_and_rotated():
    z, a = M.conformer("C2H6", 4, seed=1)
    _, b = M.conformer("C2H6", 4, seed=1)
    _, c = M.conformer("C2H6", 4, seed=2)
    _, eq = M.molecule_geometry("C2H6")
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    d = np.linalg.norm(a[:, None] - a[None], axis=-1)
    d0 = np.linalg.norm(eq[:, None] - eq[None], axis=-1)
    off = ~np.eye(len(z), dtype=bool)
    ratio = d[off] / d0[off]
    assert 0.8 <= ratio.min() and ratio.max() <= 1.25 and np.abs(ratio - 1).max() > 0.01
    np.testing.assert_allclose(a.mean(axis=0), 0, atol=1e-12)


def test_cache_dir_follows_eqntk_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("EQNTK_CACHE", str(tmp_path / "c"))
    assert M.default_cache_dir() == tmp_path / "c" / "molecules"
    monkeypatch.delenv("EQNTK_CACHE")
    assert M.default_cache_dir().parts[-3:] == (".cache", "eqntk", "molecules")


# ----- PySCF ---------------------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore:Basis may be available")
def test_generated_energies_known_values_and_cache(tmp_path, monkeypatch):
    pytest.importorskip("pyscf", reason="PySCF not installed (scripts/bootstrap.sh installs it); generation untested")
    h2 = (np.array([1, 1]), np.array([[0.0, 0, 0], [0, 0, 0.74]]))
    e_h2 = M.qc_energy(*h2, method="HF/STO-3G")
    assert e_h2 == pytest.approx(-1.11676, abs=2e-5)  # textbook RHF/STO-3G at 0.74 A (Szabo-Ostlund: -1.1167)
    atoms = M.atom_energies([1, 8], "HF/STO-3G")
    assert atoms[1] == pytest.approx(-0.466582, abs=2e-6)  # exact STO-3G H atom (zeta 1.24)
    _one_line_error(lambda: M.atom_energies([1], "HF/nosuchbasis"), "cannot build basis 'nosuchbasis'")

    monkeypatch.setenv("EQNTK_CACHE", str(tmp_path / "never"))
    s = M.generate_conformers(n_conformers=1, seed=5, method="HF/STO-3G", molecules=("H2", "H2O"), cache_dir=tmp_path)
    assert s.names.tolist() == ["H2#0", "H2O#0"] and s.meta["method"] == "HF/STO-3G"
    z, pos = s.molecule(1)
    expect = (M.qc_energy(z, pos, "HF/STO-3G") - atoms[8] - 2 * atoms[1]) * M.HARTREE_EV
    assert s.energy[1] == pytest.approx(expect, abs=1e-6)
    assert -8 < s.energy[1] < -3 and -6 < s.energy[0] < -3  # bound, HF/STO-3G sized
    files = list(tmp_path.glob("conformers-*.npz"))
    assert len(files) == 1 and not (tmp_path / "never").exists()

    def boom(*a, **k):
        raise AssertionError("recomputed instead of reading the cache")

    monkeypatch.setattr(conformer_set, "qc_energy", boom)
    again = M.generate_conformers(n_conformers=1, seed=5, method="HF/STO-3G", molecules=("H2", "H2O"), cache_dir=tmp_path)
    assert again.digest() == s.digest() and again.meta["cache"] == str(files[0])
    with pytest.raises(AssertionError):  # another seed is another cache entry
        M.generate_conformers(n_conformers=1, seed=6, method="HF/STO-3G", molecules=("H2",), cache_dir=tmp_path)
    _one_line_error(lambda: M.generate_conformers(1, method="HF", cache_dir=tmp_path), "THEORY/BASIS")
    _one_line_error(lambda: M.generate_conformers(1, molecules=("C60",), cache_dir=tmp_path), "C60")


def test_interrupted_save_leaves_the_old_file_whole(tmp_path, monkeypatch):
    s = M.load_qm9(qm9_dir(tmp_path))
    path = tmp_path / "set.npz"
    s.save(path)
    before = path.read_bytes()

    def killed(f, **arrays):
        f.write(b"PK\x03\x04 half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", killed)
    with pytest.raises(KeyboardInterrupt):
        s.subset([0]).save(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["qm9", "set.npz"]
