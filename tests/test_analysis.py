"""The analysis tables against numbers known in advance.

The synthetic results directory of conftest (``make_results``) is written with the store's
own writer: the analytic predictions come from closed-form kernels (one-hidden-layer ReLU
MLP in NTK parameterisation, docs/theory.md §2, and its orbit average for the
identity-support group MLP, §3), and each ensemble's members are placed around a chosen mean
with a chosen spread, so ensemble means, standard errors, z-scores, errors, slopes, gaps and
orbit spreads are all known exactly. One unit is marked diverged (its part holds garbage)
and one failed, as the runner records them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis import compare, theory
from analysis.predict import predict_as_trained
from eqntk import pipeline
from eqntk.cli import main
from eqntk.store import ResultStore
from study.config import parse_study
from study.data import build_data


@pytest.fixture(scope="module")
def results(tmp_path_factory, make_results) -> Path:
    return make_results(tmp_path_factory.mktemp("analysis") / "run")


@pytest.fixture(scope="module")
def analysed(results, closed_form_kernel_fn) -> Path:
    pipeline.analyze(results, kernel_fn=closed_form_kernel_fn, workers=1)  # parallel: test_real_study_end_to_end
    return results


def read(out: Path, name: str) -> pd.DataFrame:
    return pd.read_parquet(out / "analysis" / f"{name}.parquet")


def _spec(study, name):
    cfg = parse_study(study.text)
    return next(s for s in cfg.model_specs if s.name == name)


def _theory(study, out: Path, name: str) -> theory.Theory:
    cfg = parse_study(study.text)
    return theory._load(theory.cache_path(pipeline.analysis_dir(out), name, cfg.lr),
                        theory.cache_key(_spec(study, name), cfg.lr, cfg.resolved_log_steps, ResultStore(out).resolved_study()["data_digest"]),
                        name, cfg.lr)


def expected_members(study, model: str, width: int) -> int:
    return 2 if (model, width) in {study.diverged[:2], study.failed[:2]} else 4


# ----- tests -------------------------------------------------------------------------------
def test_tables_written(analysed, synthetic_study):
    d = analysed / "analysis"
    for name in pipeline.TABLES:
        assert (d / f"{name}.parquet").is_file(), name
        assert (d / f"{name}.csv").is_file() == (name not in pipeline.NO_CSV), name
    for name in synthetic_study.bias:
        assert (d / f"theory-{name}-0.5.npz").is_file()


def test_ensemble_statistics_exact(analysed, synthetic_study):
    """Members sit at mean +- noise, so the mean, variance and SE are known in closed form;
    the diverged unit's garbage (1e6-sized) must not reach any statistic."""
    p = read(analysed, "points")
    s = synthetic_study
    m = np.array([expected_members(s, a, w) for a, w in zip(p["model"], p["width"])])
    assert (p["members"].to_numpy() == m).all()
    bias = p["model"].map(s.bias) / p["width"]
    np.testing.assert_allclose(p["mean"], p["mu"] * (1 + bias), rtol=1e-12, atol=1e-15)
    var = s.noise**2 * np.where(m == 4, 4 / 3, 2.0)  # sum of squared offsets / (M - 1)
    np.testing.assert_allclose(p["var"], var, rtol=1e-9)  # sumsq - sum^2/M cancels ~1e-16 of mu^2 ~ 1
    np.testing.assert_allclose(p["se"], np.sqrt(var / m), rtol=1e-9)
    # z = (mean - mu) / se is known exactly; at step 0 mu = 0 and so is every member's centre
    np.testing.assert_allclose(p["z"], p["mu"] * bias / np.sqrt(var / m), rtol=1e-7, atol=1e-9)
    assert (p.loc[p["step"] == 0, "mu"] == 0).all()
    np.testing.assert_allclose(p["z_theory"], p["mu"] * bias / np.sqrt(p["var_theory"] / m), rtol=1e-7, atol=1e-9)


def test_units_listed(analysed, synthetic_study):
    u = read(analysed, "units").set_index(["model", "width", "member_start"])
    diverged, failed = synthetic_study.diverged, synthetic_study.failed
    assert u.loc[diverged, "state"] == "diverged" and u.loc[diverged, "steps_reached"] == 1
    assert u.loc[failed, "state"] == "failed" and "synthetic failure" in u.loc[failed, "error"]
    assert (u["state"] == "done").sum() == len(u) - 2


@pytest.mark.parametrize("model", ["mlp_aug", "group_mlp", "mlp_plain"])
def test_theory_is_the_orbit_prediction(analysed, model, synthetic_study, closed_form_kernel_fn):
    """The cached analytic mean at (sample i, element g) is predict_as_trained at L_g x_i, with
    the variance shared by the outputs: for mlp_aug the training rows come from the reused
    K(X_aug, X_aug), for group_mlp the values are copied along verified-invariant orbits."""
    data = ResultStore(analysed).load_data()
    spec = _spec(synthetic_study, model)
    th = _theory(synthetic_study, analysed, model)
    assert th is not None and th.ok
    grp = spec.group_obj
    for ev, x in data.all_sets().items():
        i, g = len(x) - 1, 3
        direct = predict_as_trained(spec, data.train_x, data.train_y, grp.act_image(x[i:i + 1], g), lr=0.5,
                                    steps=th.steps, kernel_fn=closed_form_kernel_fn)
        # arccos near 1 (an input against itself, rotated) amplifies rounding to ~sqrt(eps) = 1e-8
        np.testing.assert_allclose(th.mean[ev][:, i, g], direct.mean[:, 0], rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(th.var[ev][:, i, g], direct.variance[:, 0], rtol=1e-6, atol=1e-9)


def test_relative_error_and_width_slopes(analysed, synthetic_study):
    """mean - mu = mu bias/width, so the relative error is bias/width after step 0 and its slope is -1."""
    a = read(analysed, "agreement")
    late = a[a["step"] > 0]
    np.testing.assert_allclose(late["rel_err"], late["model"].map(synthetic_study.bias) / late["width"], rtol=1e-9)
    assert (late["scale_kind"] == "RMS(mu)").all()
    first = a[a["step"] == 0]
    assert (first["rel_err"] == 0).all()  # every member's centre is mu = 0 at initialisation
    assert first["scale_kind"].str.startswith("analytic std").all()
    # random augmentation has no analytic variance: its step-0 scale is the ensemble's own spread
    np.testing.assert_allclose(first["scale"], np.sqrt(first["var_theory_mean"].fillna(first["var_mean"])), rtol=1e-12)
    assert first.loc[first["model"] == "mlp_random", "var_theory_mean"].isna().all()
    c = read(analysed, "convergence")
    c = c[c["step"].isna() | (c["step"] > 0)]
    np.testing.assert_allclose(c["slope_err"], -1.0, rtol=1e-9)
    assert (c["n_widths"] == 2).all()


def test_pair_gaps_exact(analysed, synthetic_study):
    """The gap of (mlp_aug, group_mlp) recomputed from the theory arrays and the construction."""
    g = read(analysed, "pairs")
    pair = g[(g["a"] == "mlp_aug") & (g["b"] == "group_mlp")]
    assert set(pair["kind"]) == {"augmentation"}
    s = synthetic_study
    ta, tb = _theory(s, analysed, "mlp_aug"), _theory(s, analysed, "group_mlp")
    for _, r in pair.iterrows():
        k = ta.steps.index(r["step"])
        mua, mub = ta.mean[r["eval_set"]][k], tb.mean[r["eval_set"]][k]
        diff = mua * (1 + s.bias["mlp_aug"] / r["width"]) - mub * (1 + s.bias["group_mlp"] / r["width"])
        ma, mb = expected_members(s, "mlp_aug", r["width"]), expected_members(s, "group_mlp", r["width"])
        comb = s.noise**2 * ((4 / 3 if ma == 4 else 2.0) / ma + (4 / 3 if mb == 4 else 2.0) / mb)
        np.testing.assert_allclose(r["gap_se"], np.sqrt(np.mean(diff**2) / comb), rtol=1e-7, atol=1e-12)
        assert r["n_points"] == diff.size
    # the augmentation theorem (docs/theory.md §6) with the closed-form kernels: identical analytic means
    assert pair["theory_rel_gap"].max() < 1e-7
    kinds = {(r.a, r.b): r.kind for r in g.itertuples()}
    assert kinds[("group_mlp", "group_mlp_full")] == "gcnn"
    # the theorem says nothing about unaugmented models: their analytic means differ, a positive control
    assert kinds[("mlp_plain", "group_mlp")] == "control"


def test_orbit_spread(analysed):
    """group MLP means are invariant; the analytic mlp_aug mean is invariant (emergent invariance);
    mlp_plain's mean is mu scaled by a constant, so its relative spread is exactly mu's."""
    s = read(analysed, "invariance")
    s = s[s["step"] > 0]
    assert s.loc[s["model"].str.startswith("group_mlp"), "spread"].max() < 1e-12
    # every group-MLP member is itself invariant, so a perfectly invariant ensemble's noise is 0 too
    assert s.loc[s["model"].str.startswith("group_mlp"), "spread_noise"].max() < 1e-12
    aug = s[s["model"] == "mlp_aug"]
    assert aug["theory_spread"].max() < 1e-7
    assert (aug["spread_noise"] > 0).all() and np.isfinite(aug["dev_se_ss"]).all()
    plain = s[s["model"] == "mlp_plain"]
    assert plain["theory_spread"].min() > 1e-2
    np.testing.assert_allclose(plain["spread"], plain["theory_spread"], rtol=1e-9)
    assert (s["order"] == 4).all()


def test_theory_cache_reused_and_invalidated(results, analysed, closed_form_kernel_fn):
    def refuse(*a, **k):
        raise AssertionError("the cached theory should have been used")

    pipeline.analyze(results, kernel_fn=refuse, workers=1, log=lambda *_: None)
    th = read(results, "theory")
    assert th["cached"].all() and (th["status"] == "ok").all()
    # a corrupt cache file is recomputed, not trusted
    path = theory.cache_path(pipeline.analysis_dir(results), "mlp_plain", 0.5)
    path.write_bytes(b"not an npz")
    calls = []

    def counting(spec, shape, n_out):
        calls.append(spec.name)
        return closed_form_kernel_fn(spec, shape, n_out)

    pipeline.analyze(results, kernel_fn=counting, workers=1, log=lambda *_: None)
    assert set(calls) == {"mlp_plain"}


def test_kernel_failure_is_reported_not_fatal(results, tmp_path, closed_form_kernel_fn):
    out = tmp_path / "copy"
    shutil.copytree(results, out)
    shutil.rmtree(out / "analysis", ignore_errors=True)

    def partial(spec, shape, n_out):
        if spec.arch == "group_mlp":
            raise NotImplementedError("no kernel for group_mlp here")
        return closed_form_kernel_fn(spec, shape, n_out)

    tables = pipeline.analyze(out, kernel_fn=partial, workers=1, log=lambda *_: None)
    th = tables["theory"].set_index("model")
    assert th.loc["group_mlp", "status"] == "unavailable" and "NotImplementedError" in th.loc["group_mlp", "error"]
    assert not (out / "analysis" / "theory-group_mlp-0.5.npz").exists()  # not cached: retried next time
    p = tables["points"]
    assert p.loc[p["model"] == "group_mlp", "mu"].isna().all()
    assert p.loc[p["model"] == "mlp_aug", "mu"].notna().all()


def test_equivariant_shortcut_falls_back_when_not_invariant(synthetic_study, closed_form_kernel_fn):
    """A kernel that is not orbit invariant (the plain MLP's, given for a group_mlp spec) fails
    the probe check, and then every orbit point is computed."""
    cfg = parse_study(synthetic_study.text)
    data = build_data(cfg.data, cfg.seed)
    spec = _spec(synthetic_study, "group_mlp")

    def not_invariant(s, shape, n_out):
        return closed_form_kernel_fn(s.model_copy(update={"arch": "mlp"}), shape, n_out)

    th = theory.compute_theory(spec, data, cfg.lr, cfg.resolved_log_steps, kernel_fn=not_invariant)
    x = data.eval_sets["noise"]
    direct = predict_as_trained(spec, data.train_x, data.train_y, spec.group_obj.orbit_image(x[1:2])[0], lr=cfg.lr,
                                steps=th.steps, kernel_fn=not_invariant)
    np.testing.assert_allclose(th.mean["noise"][:, 1], direct.mean, rtol=1e-10, atol=1e-13)
    assert np.ptp(th.mean["noise"][-1, 1], axis=0).max() > 1e-3  # really not invariant


# ----- the real thing: workers, kernels, CLI ----------------------------------------------
def test_real_study_end_to_end(tmp_path, tiny_study):
    """``eqntk run`` trains, analyses with the real kernel engine and writes the report."""
    study = tmp_path / "real.yaml"
    study.write_text(tiny_study(
        name="tiny-real", seed=2, noise_n=2, members_per_unit=None, steps=10, log_steps=[0, 1, 10],
        models=[dict(name="mlp_aug", arch="mlp", depth=1, augmentation="full_orbit"),
                dict(name="group_mlp", arch="group_mlp", depth=1, support="identity"),
                dict(name="cnn_aug", arch="cnn", depth=1, augmentation="full_orbit"),
                dict(name="gcnn", arch="gcnn", depth=1, support="identity")]))
    out = tmp_path / "out"
    assert main(["run", str(study), "--out", str(out), "--no-progress"]) == 0
    assert (out / "report" / "index.html").is_file()
    t = pipeline.load_tables(out)
    assert t is not None
    assert (t["theory"]["status"] == "ok").all(), t["theory"]
    p = t["points"]
    assert p["mu"].notna().all() and np.isfinite(p["z"]).all()
    assert (p["members"] == 4).all()
    # docs/theory.md §6 with the real kernels: the augmented models' analytic means equal the GCNNs'
    pairs = t["pairs"]
    aug = pairs[(pairs["kind"] == "augmentation") & (pairs["step"] > 0)]
    assert {("mlp_aug", "group_mlp"), ("cnn_aug", "gcnn")} <= set(zip(aug["a"], aug["b"]))
    assert aug["theory_rel_gap"].max() < 1e-8
    # GCNN ensembles are invariant member by member (float32 rounding), and their theory exactly
    inv = t["invariance"]
    eq = inv[inv["model"].isin(["group_mlp", "gcnn"]) & (inv["step"] > 0)]
    assert eq["spread"].max() < 1e-5 and eq["theory_spread"].max() < 1e-10


# ----- the noise removed: intervals against known biases ------------------------------------
@pytest.mark.parametrize("correlation", [0.0, 0.5, 1.0])
def test_excess_interval_covers_the_true_bias(correlation):
    """Monte Carlo: ensembles of 8 Gaussian draws at 40 points whose noise is correlated across
    points (0: independent, 1: one shared draw), around a known bias. The interval for B^2 holds
    the truth in at least 95% of repeats whatever the correlation (docs/theory.md §5.4)."""
    rng = np.random.default_rng(7)
    n, d, reps = 40, 8, 400
    bias = np.sin(np.arange(n))  # B^2 = sum bias^2, about 20
    sigma = 1.0 + 0.5 * np.cos(np.arange(n))
    covered, lo_pos = 0, 0
    for _ in range(reps):
        shared = rng.standard_normal((d, 1))
        own = rng.standard_normal((d, n))
        draws = bias + sigma * (np.sqrt(correlation) * shared + np.sqrt(1 - correlation) * own)
        mean, se2 = draws.mean(0), draws.var(0, ddof=1) / d
        e_ss, s_ss = np.sum(mean**2), np.sum(se2)
        est, lo, hi = compare.excess_interval(e_ss, s_ss, compare.se_ss_var(s_ss, d))
        covered += lo <= np.sum(bias**2) <= hi
        lo_pos += lo > 0
    assert covered / reps >= 0.95
    assert lo_pos > 0  # and the bias is resolved in some repeats (B^2 about 20 against S about 5.6)


def test_excess_interval_limits():
    # no noise: the interval is the point itself
    est, lo, hi = compare.excess_interval(4.0, 0.0, 0.0)
    assert est == lo == hi == 4.0
    # an error below the noise: no excess, but an upper bound (the smallest bias it could have shown)
    est, lo, hi = compare.excess_interval(0.5, 1.0, 0.0)
    assert est == -0.5 and lo == 0 and hi > 0


def test_fit_exponent_exact_and_unresolved():
    w = np.array([8, 32, 128])
    b2 = (2.0 / w) ** 2
    slope, lo, hi = compare.fit_exponent(w, b2, 0.9 * b2, 1.1 * b2)
    assert abs(slope + 1) < 1e-12 and lo < -1 < hi and hi - lo < 0.2
    # a width whose bias is not resolved (lower end 0) is left out; one width left: no exponent
    assert np.isnan(compare.fit_exponent(w[:2], b2[:2], [0.0, 0.9 * b2[1]], 1.1 * b2[:2])[0])


@pytest.fixture(scope="module")
def quiet(tmp_path_factory, make_quiet_results, closed_form_kernel_fn) -> Path:
    out = make_quiet_results(tmp_path_factory.mktemp("analysis") / "quiet")
    pipeline.analyze(out, kernel_fn=closed_form_kernel_fn, workers=1, log=lambda *_: None)
    return out


def test_bias_interval_and_exponent_on_the_quiet_study(quiet, synthetic_study):
    """Members 1e-4 apart around mu (1 + b/width): the relative bias with the noise removed is
    b/width, inside its 95% interval, resolved, per step and eval set; its exponent in width is -1."""
    a = read(quiet, "agreement")
    late = a[a["step"] > 0]
    true = late["model"].map(synthetic_study.bias) / late["width"]
    assert ((late["rel_bias_lo"] <= true) & (true <= late["rel_bias_hi"])).all()
    last = late["step"] == late["step"].max()  # early on mu is small and the 1e-4 noise still counts
    assert (late.loc[last, "rel_bias_lo"] > 0).all()
    np.testing.assert_allclose(late.loc[last, "rel_bias"], true[last], rtol=0.05)
    c = read(quiet, "convergence")
    c = c[c["step"].isna() | (c["step"] == c["step"].max())]  # pooled and the final step: resolved at both widths
    assert ((c["exponent_bias_lo"] <= -1) & (-1 <= c["exponent_bias_hi"])).all()
    np.testing.assert_allclose(c["exponent_bias"], -1.0, atol=0.1)
    # pooled over steps, eval sets as well
    pooled = compare.pooled_errors(a, ["model", "width"])
    true = pooled["model"].map(synthetic_study.bias) / pooled["width"]
    assert ((pooled["rel_bias_lo"] <= true) & (true <= pooled["rel_bias_hi"])).all()


def test_pair_gap_interval_and_controls_on_the_quiet_study(quiet, synthetic_study):
    """The gap of mlp_aug and group_mlp is mu (0.4 - 0.2)/width (their analytic means are equal):
    inside its interval and resolved. mlp_plain against a GCNN is a control: analytic means apart."""
    g = read(quiet, "pairs")
    pair = g[(g["a"] == "mlp_aug") & (g["b"] == "group_mlp") & (g["step"] > 0)]
    true = (synthetic_study.bias["mlp_aug"] - synthetic_study.bias["group_mlp"]) / pair["width"]
    assert ((pair["rel_gap_lo"] <= true) & (true <= pair["rel_gap_hi"])).all()
    last = pair["step"] == pair["step"].max()
    np.testing.assert_allclose(pair.loc[last, "rel_gap_est"], true[last], rtol=0.05)
    assert (pair.loc[last, "rel_gap_lo"] > 0).all()
    ctrl = g[g["kind"] == "control"]
    assert set(zip(ctrl["a"], ctrl["b"])) == {("mlp_plain", "group_mlp"), ("mlp_plain", "group_mlp_full")}
    late = ctrl[ctrl["step"] > 0]
    assert (late["theory_rel_gap"] > compare.CONTROL_REL_GAP).all()
    # a candidate control whose analytic means agree is no control: dropped
    fake = g.assign(kind=np.where(g["kind"] == "gcnn", "control", g["kind"]), mu_diff_ss=g["mu_diff_ss"])
    relabelled = compare.label_controls(fake)
    assert not ((relabelled["a"] == "group_mlp") & (relabelled["b"] == "group_mlp_full")).any()
    # the systematic orbit spread of the augmented mean is rounding, the plain MLP's is the analytic one
    inv = read(quiet, "invariance")
    inv = inv[inv["step"] > 0]
    assert inv.loc[inv["model"] == "mlp_aug", "spread_sys_hi"].max() < 1e-5
    plain = inv[inv["model"] == "mlp_plain"]
    assert ((plain["spread_sys_lo"] <= plain["theory_spread"] * 1.0001) & (plain["theory_spread"] <= plain["spread_sys_hi"])).all()


def test_control_pair_matches_models_trained_at_different_learning_rates():
    """A non-augmented model may need its own (smaller) lr: its control pair with the GCNN is
    matched step for step, while a theorem pair (same training) still needs a common lr."""
    rows = []
    for model, lr, mu in (("mlp", 2.0, 1.0), ("group_mlp", 4.5, 0.0)):
        for step in (0, 10):
            for sample in range(3):
                rows.append(dict(model=model, width=8, lr=lr, step=step, eval_set="train", sample=sample,
                                 group_element=0, output=0, mean=mu * step, se=0.1, mu=mu * step, members=4, draws=4))
    points = pd.DataFrame(rows)
    gaps = compare.pair_gaps(points, [dict(a="mlp", b="group_mlp", kind="control"),
                                      dict(a="mlp", b="group_mlp", kind="augmentation")])
    assert set(gaps["kind"]) == {"control"} and set(gaps["lr"]) == {2.0}
    late = gaps[gaps["step"] == 10].iloc[0]
    assert late["theory_gap_se"] == pytest.approx(np.sqrt(3 * 100 / (3 * 0.02)))
