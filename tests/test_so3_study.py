"""SO(3) in the study file (group SO3: so3_gcnn, sphere_mlp): validation, spherical data
sources, random SO(3) augmentation, the analytic mean of the augmented sphere MLP, and a
tiny study end to end through ``eqntk run`` with analysis and report (docs/so3.md,
"The SO(3) study")."""

import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from eqntk.cli import main
from study.config import StudyError, parse_study
from study.data import _normalize_sphere, build_data
from study.groups import SO3Group
from study.spec import ModelSpec, sphere_spec
from study.sphere import SO3Spec, SphereMLPSpec, dh_grid, isht, random_rotations, rotate_signal, sht

TINY = """
name: tiny-so3
seed: 1
group: SO3
rotations: 3
data:
  train: {source: spherical_digits, n: 5, L: 3}
  eval:
    - {name: digits_test, data: {source: spherical_digits, n: 2, start: 1000}}
    - {name: noise, data: {source: sphere_noise, n: 2}}
    - {name: photos, data: {source: sphere_photos, n: 2, patch: 16}}
models:
  - {name: mlp_aug, arch: sphere_mlp, depth: 1, augmentation: random}
  - {name: mlp, arch: sphere_mlp, depth: 1}
  - {name: gcnn, arch: so3_gcnn, depth: 1, bands: [2], so3_grid: 2, kernel_mode: grid}
widths: [8, 16]
ensemble_size: 3
lr: 1.0
steps: 8
log_steps: [0, 2, 8]
"""


def _study(text=TINY):
    return parse_study(textwrap.dedent(text), origin="s")


# ----- validation -------------------------------------------------------------------------
def _replace(old, new):
    t = textwrap.dedent(TINY)
    assert old in t
    return t.replace(old, new)


BAD = [
    ("so3 arch without SO3", _replace("group: SO3\n", "group: C4\n"), ["models.0", "group", "SO3"]),
    ("mlp with SO3", _replace("arch: sphere_mlp, depth: 1}", "arch: mlp, depth: 1}"), ["arch", "so3_gcnn or sphere_mlp"]),
    ("full orbit", _replace("augmentation: random", "augmentation: full_orbit"), ["augmentation", "random"]),
    ("gcnn augmented", _replace("bands: [2],", "bands: [2], augmentation: random,"), ["augmentation", "equivariant"]),
    ("bands missing", _replace("bands: [2], ", ""), ["bands", "add"]),
    ("bands vs depth", _replace("bands: [2]", "bands: [2, 2]"), ["bands", "depth"]),
    ("so3_grid missing", _replace("so3_grid: 2, ", ""), ["so3_grid", "add so3_grid"]),
    ("so3_grid too small", _replace("bands: [2], so3_grid: 2", "bands: [3], so3_grid: 2"), ["so3_grid", ">= 3"]),
    ("bands on the mlp", _replace("depth: 1, augmentation", "depth: 1, bands: [2], augmentation"), ["bands", "only arch so3_gcnn"]),
    ("bad kernel mode", _replace("kernel_mode: grid", "kernel_mode: exact"), ["kernel_mode", "grid", "relative"]),
    ("L missing", _replace("n: 5, L: 3}", "n: 5}"), ["L", "bandwidth"]),
    ("planar eval", _replace("{source: sphere_noise, n: 2}", "{source: gaussian, n: 2}"), ["eval.noise", "sphere"]),
    ("planar train", _replace("{source: spherical_digits, n: 5, L: 3}", "{source: digits, n: 5}"), ["eval.digits_test", "does not match"]),
    ("planar data", "\n".join(l for l in _replace("{source: spherical_digits, n: 5, L: 3}", "{source: digits, n: 5}").splitlines()
                               if "data: {source" not in l and l.strip() != "eval:"), ["data.train", "spherical_digits"]),
    ("unlabelled train", _replace("{source: spherical_digits, n: 5, L: 3}", "{source: sphere_noise, n: 5, L: 3}"), ["no labels"]),
    ("rotations zero", _replace("rotations: 3", "rotations: 0"), ["rotations"]),
]


@pytest.mark.parametrize("case,text,needles", BAD, ids=[b[0] for b in BAD])
def test_bad_so3_study_refused(case, text, needles):
    with pytest.raises(StudyError) as e:
        parse_study(text, origin="s")
    msg = str(e.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, (case, msg)


def test_rotations_without_so3_refused():
    with pytest.raises(ValueError, match="rotations"):
        ModelSpec(name="m", arch="mlp", rotations=4)


def test_bands_above_input_bandwidth_refused(tmp_path):
    cfg = _study(_replace("bands: [2], so3_grid: 2", "bands: [4], so3_grid: 4"))
    data = build_data(cfg.data, cfg.seed, group=cfg.group)
    with pytest.raises(StudyError, match=r"bands: band limit 4 .* L = 3"):
        cfg.check_inputs(data.input_shape, "s")


def test_spec_fields_left_out_of_the_dump_and_derived_specs():
    plain = ModelSpec(name="m", arch="mlp").model_dump()
    assert not {"bands", "so3_grid", "kernel_mode", "rotations"} & set(plain)
    cfg = _study()
    aug, mlp, gcnn = cfg.model_specs
    assert aug.rotations == 3 and aug.group_obj.order == 3
    s = sphere_spec(gcnn, (1, 6, 6), 10)
    assert s == SO3Spec(channels=1, L_in=3, bands=(2,), B=2, outputs=10)
    assert sphere_spec(mlp, (1, 6, 6), 10) == SphereMLPSpec(channels=1, L_in=3, depth=1, outputs=10)
    assert "rotations" not in parse_study(textwrap.dedent(TINY).replace("group: SO3\nrotations: 3\n", "group: SO3\n")).model_dump()


# ----- data -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data():
    cfg = _study()
    return build_data(cfg.data, cfg.seed, group=cfg.group)


def test_sources_band_limited_and_normalised(data):
    g = dh_grid(3)
    assert data.train_x.shape == (5, 1, 6, 6) and data.train_y.shape == (5, 10)
    assert np.allclose(data.train_y.sum(1), 0)  # centred one-hot
    for name, x in data.all_sets().items():
        assert x.shape[1:] == (1, 6, 6), name
        assert np.abs(isht(sht(x, g), g) - x).max() < 1e-12, name  # band limit < L
        assert np.allclose(np.einsum("ncjk,jk->n", x, g.weights), 0, atol=1e-12)  # quadrature mean
        assert np.allclose(np.einsum("ncjk,jk->n", x**2, g.weights), 1, atol=1e-12)  # quadrature mean square


def test_logged_orbit_is_exact(data):
    grp = SO3Group(5)
    R = grp.matrices
    assert np.allclose(R[0], np.eye(3)) and np.allclose(R @ R.transpose(0, 2, 1), np.eye(3), atol=1e-12)
    assert np.allclose(SO3Group(5).matrices, R)  # seeded: the same rotations every time
    for x in data.all_sets().values():
        orbit = grp.orbit_image(x)  # [n, K, C, 2L, 2L]
        assert np.array_equal(orbit[:, 0], x) or np.abs(orbit[:, 0] - x).max() < 1e-13
        for k in range(5):
            back = rotate_signal(orbit[:, k], R[k].T, dh_grid(3))
            assert np.abs(back - x).max() < 1e-10
            # normalisation commutes with the rotation (quadrature measure)
            assert np.abs(_normalize_sphere(orbit[:, k]) - orbit[:, k]).max() < 1e-10
    # torch path (the workers) agrees with the numpy path
    t = grp.orbit_image(torch.tensor(data.train_x))
    assert np.abs(t.numpy() - grp.orbit_image(data.train_x)).max() < 1e-12


def test_spherical_digits_rotate_option():
    a = _study()
    b = _study(_replace("{source: spherical_digits, n: 5, L: 3}", "{source: spherical_digits, n: 5, L: 3, rotate: true}"))
    xa = build_data(a.data, a.seed).train_x
    xb = build_data(b.data, b.seed).train_x
    g = dh_grid(3)
    ca, cb = sht(xa, g), sht(xb, g)
    for l in range(3):  # a rotation keeps the power per degree
        sl = slice(l * l, (l + 1) ** 2)
        assert np.allclose((ca[..., sl] ** 2).sum(-1), (cb[..., sl] ** 2).sum(-1), atol=1e-10)
    assert np.abs(xa - xb).max() > 0.1


# ----- random SO(3) augmentation ------------------------------------------------------------
def test_random_rotations_statistics(data):
    from workers.augment import RandomRotations, make_augmentation

    x = torch.tensor(data.train_x)
    y = torch.tensor(data.train_y)
    with pytest.raises(ValueError, match="full_orbit"):
        make_augmentation("full_orbit", SO3Group(4), x, y, [1])
    aug = make_augmentation("random", SO3Group(4), x, y, [11, 12, 13])
    assert isinstance(aug, RandomRotations)
    # members draw from their own seeds: member 1 of a unit is member 0 of another
    alone = RandomRotations(x, y, [12])
    R3, R1 = aug.draw(), alone.draw()
    assert np.array_equal(R3[1], R1[0])
    assert np.allclose(np.linalg.det(R3), 1) and R3.shape == (3, 5, 3, 3)
    # exact rotation of each sample, in x's dtype
    b = aug.next_batch()
    assert b.per_member and b.x.shape == (3, 5, 1, 6, 6) and b.x.dtype == x.dtype
    # Haar statistics: E[D^l(R)] = 0 for l >= 1 and E[|c_l(R x)|^2 per m] = |c_l|^2 / (2l + 1)
    big = RandomRotations(x[:1], y[:1], list(range(4000)))
    g = dh_grid(3)
    c = sht(big.rotated(big.draw()).numpy(), g)[:, 0, 0]  # [4000, 9]
    c0 = sht(data.train_x[0], g)[0]
    se = 1 / np.sqrt(4000)
    for l in (1, 2):
        sl = slice(l * l, (l + 1) ** 2)
        norm2 = (c0[sl] ** 2).sum()
        assert np.abs(c[:, sl].mean(0)).max() < 5 * se * np.sqrt(norm2)
        second = (c[:, sl, None] * c[:, None, sl]).mean(0)  # -> norm2 / (2l+1) I
        assert np.abs(second - norm2 / (2 * l + 1) * np.eye(2 * l + 1)).max() < 6 * se * norm2


# ----- theory --------------------------------------------------------------------------------
def test_augmented_mean_is_kernel_gd_with_orbit_averaged_kernel(data):
    """The code path (predict_as_trained) and the theorem (a Monte Carlo over rotation sequences
    of linearised GD's mean under random SO(3) augmentation, docs/so3.md)."""
    from analysis.kernel_so3 import orbit_averaged_sphere_mlp_kernel, sphere_mlp_kernel_fn
    from analysis.predict import GDPredictor, predict_as_trained

    spec = ModelSpec(name="a", arch="sphere_mlp", group="SO3", depth=1, augmentation="random", sigma_b=0.1)
    s = sphere_spec(spec, data.input_shape, 1)
    X, Y = data.train_x[:3], data.train_y[:3, :2]
    T = np.concatenate([data.eval_sets["noise"], data.train_x[3:4]])
    eta, steps = 1.0, [0, 1, 3, 6]
    p = predict_as_trained(spec, X, Y, T, lr=eta, steps=steps)
    assert np.isnan(p.variance).all()
    G = lambda a, b: orbit_averaged_sphere_mlp_kernel(s, a, b)[1].numpy()
    ref = GDPredictor(G(X, X), None, Y, eta).mean(G(T, X), steps=steps)
    assert np.abs(p.mean - ref).max() < 1e-10

    # Monte Carlo: m_{k+1}(x) = m_k(x) - (eta/N) sum_i Theta(x, R_ik x_i) (m_k(R_ik x_i) - y_i)
    theta = lambda a, b: sphere_mlp_kernel_fn(s, a, b)[1].numpy()
    g, rng, S, N = dh_grid(3), np.random.default_rng(0), 300, len(X)
    runs = []
    for _ in range(S):
        Z, C = np.zeros((0, *X.shape[1:])), np.zeros((0, Y.shape[1]))
        for k in range(steps[-1]):
            pts = rotate_signal(X, random_rotations(N, rng)[:, None], g)
            r = (theta(pts, Z) @ C if len(Z) else 0.0) - Y
            Z, C = np.concatenate([Z, pts]), np.concatenate([C, -eta / N * r])
        runs.append(theta(T, Z) @ C)
    runs = np.stack(runs)
    mc, se = runs.mean(0), runs.std(0, ddof=1) / np.sqrt(S)
    diff = np.abs(mc - ref[-1])
    assert (diff < 4 * se + 1e-4).all(), (diff / se).max()
    # ... and it is not the plain kernel's prediction (the test can tell them apart)
    plain = GDPredictor(theta(X, X), None, Y, eta).mean(theta(T, X), steps=[steps[-1]])[0]
    assert (np.abs(plain - mc) / se).max() > 8


# ----- a tiny study end to end ------------------------------------------------------------------
@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("so3")
    p = d / "tiny.yaml"
    p.write_text(textwrap.dedent(TINY))
    out = d / "out"
    assert main(["run", str(p), "--out", str(out), "--no-progress"]) == 0
    return out


def test_tiny_study_end_to_end(run):
    df = pd.read_parquet(run / "predictions")
    assert sorted(df["group_element"].unique()) == [0, 1, 2]  # K = 3 logged rotations
    assert set(df["eval_set"].astype(str)) == {"train", "digits_test", "noise", "photos"}
    theory = pd.read_csv(run / "analysis" / "theory.csv")
    assert (theory["status"] == "ok").all(), theory
    note = theory.set_index("model")["note"]
    assert "orbit-averaged" in note["mlp_aug"] and "quadrature error" in note["mlp_aug"]
    pts = pd.read_parquet(run / "analysis" / "points.parquet") if (run / "analysis" / "points.parquet").exists() else None
    agr = pd.read_csv(run / "analysis" / "agreement.csv")
    aug = agr[agr["model"] == "mlp_aug"]
    assert aug["var_theory_mean"].isna().all() and aug["median_abs_z"].notna().all()  # the ensemble's own SE
    assert agr[agr["model"] != "mlp_aug"]["var_theory_mean"].notna().all()
    pairs = pd.read_csv(run / "analysis" / "pairs.csv")
    assert {("mlp_aug", "gcnn")} <= set(zip(pairs["a"], pairs["b"]))
    html = (run / "report" / "index.html").read_text()
    assert "sphere_mlp" in html and "so3_gcnn" in html
    del pts
