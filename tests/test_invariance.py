"""analysis/invariance.py: emergent invariance at finite width (docs/theory.md §3.4).

- The analytic mean of an augmented CNN, as ``analysis.theory`` computes it for the report,
  is invariant to round-off when the kernel is jointly invariant (``plus``, the full window
  with uniform variances) and not otherwise (``cross_corner``, ``ramp``); and it obeys §3.4's
  proposition ``m^v(L_h x) = m^{v o A_h}(x)``, which checks the orbit layout of its arrays.
- The fit of ``|measured - analytic|`` against width recovers a known exponent from a
  synthetic table, from above and from below, leaving out the widths that do not resolve it.
- The verdicts say what the tables say.
- A tiny study end to end: ``eqntk run`` (local Ray) writes the report's section, files and
  figure, and scripts/readme.py renders the invariance blocks from the directory.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from analysis import invariance
from analysis.theory import compute_theory
from analysis.verdicts import AGREES, DIFFERS, INCONCLUSIVE
from eqntk.cli import main
from study.data import StudyData
from study.groups import parse_group
from study.spec import ModelSpec, tap_variances

C4 = parse_group("C4")
ROOT = Path(__file__).resolve().parent.parent


def _spec(**kw) -> ModelSpec:
    base = dict(name="m", arch="cnn", depth=2, augmentation="full_orbit", nonlinearity="erf", sigma_w=1.5, sigma_b=0.1)
    return ModelSpec(**{**base, **kw})


@pytest.fixture(scope="module")
def data() -> StudyData:
    rng = np.random.default_rng(0)
    return StudyData(train_x=rng.normal(size=(3, 1, 6, 6)), train_y=rng.normal(size=(3, 2)),
                     eval_sets={"noise": rng.normal(size=(2, 1, 6, 6))})


def _spread(th) -> float:
    """The analytic mean's orbit spread, relative, over every set and step after initialisation."""
    dev = sum(float(np.sum((m[1:] - m[1:].mean(axis=2, keepdims=True)) ** 2)) for m in th.mean.values())
    return np.sqrt(dev / sum(float(np.sum(m[1:] ** 2)) for m in th.mean.values()))


STEPS = [0, 3, 30]


@pytest.mark.parametrize("kw,invariant", [
    (dict(filter_support="plus"), True),
    (dict(), True),  # the full window, uniform variances
    (dict(filter_support="plus", tap_variance=[[2, 2, 2], [2, 1, 2], [2, 2, 2]]), True),  # invariant variances
    (dict(filter_support="cross_corner"), False),
    (dict(tap_variance="ramp"), False),
], ids=["plus", "full", "plus-invariant-variances", "cross_corner", "ramp"])
def test_analytic_spread_is_roundoff_iff_the_kernel_is_jointly_invariant(data, kw, invariant):
    th = compute_theory(_spec(**kw), data, lr=1.0, steps=STEPS)
    assert th.ok, th.error
    spread = _spread(th)
    if invariant:  # measured 1.5e-16 to 2e-16 (float64 round-off)
        assert spread < 1e-12, spread
    else:  # measured: cross_corner 8.8e-3, ramp 6.9e-3 on these inputs, 1e13 times round-off
        assert spread > 1e-4, spread


@pytest.mark.parametrize("kw", [dict(filter_support="cross_corner"), dict(tap_variance="ramp")], ids=["cross_corner", "ramp"])
def test_analytic_orbit_is_the_transported_models_mean(data, kw):
    """§3.4's proposition through ``compute_theory``: the prediction at ``L_h x`` (orbit column h)
    equals, at ``x`` (column 0), that of the model whose variances are moved by ``h^-1``."""
    spec = _spec(**kw)
    th = compute_theory(spec, data, lr=1.0, steps=STEPS)
    v = tap_variances(spec)  # 0 off the support
    scale = max(float(np.abs(m).max()) for m in th.mean.values())
    for h in range(1, C4.order):
        moved = C4.act_image(v[None], int(C4.inverse[h]))[0]  # v o A_h
        other = compute_theory(_spec(tap_variance=moved.tolist()), data, lr=1.0, steps=STEPS)
        for ev in th.mean:
            np.testing.assert_allclose(th.mean[ev][:, :, h], other.mean[ev][:, :, 0], rtol=0, atol=1e-11 * scale)
            np.testing.assert_allclose(th.var[ev][:, :, h], other.var[ev][:, :, 0], rtol=1e-9, atol=1e-12)


# ----- the fit and the verdicts on synthetic tables --------------------------------------------
def synthetic_width(power: float, analytic: float, below: bool = False, unresolved_width: int | None = None,
                    invariant: bool = False, spread_hi: float = 0.05) -> pd.DataFrame:
    """A width table whose measured systematic spread is ``analytic +- 0.3 w^power`` (below the
    analytic one with ``below``) with a +-10% interval on the difference; ``unresolved_width``
    adds a width whose interval holds the analytic value. ``invariant``: analytic 0 and every
    interval [0, spread_hi]."""
    rows = []
    widths = [4, 16, 64, 256] + ([unresolved_width] if unresolved_width else [])
    for step in [1, 10, pd.NA]:
        for man in ("on", "off"):
            for w in widths:
                d = 0.3 * w**power * (-1 if below else 1)
                if invariant:
                    sys, lo, hi, a = 0.0, 0.0, spread_hi, 0.0
                elif w == unresolved_width:
                    sys, lo, hi, a = analytic, analytic - 0.1, analytic + 0.1, analytic
                else:
                    a = analytic
                    sys, lo, hi = a + d, a + d * (0.9 if d > 0 else 1.1), a + d * (1.1 if d > 0 else 0.9)
                rows.append(dict(model="m", filter_support="plus" if invariant else "cross_corner", tap_variance="uniform",
                                 jointly_invariant=invariant, lr=1.0, manifold=man, width=w, step=step, draws=64,
                                 interval="jackknife, 64 blocks", analytic=a, spread=sys, noise=0.01, sys=sys, sys_lo=lo,
                                 sys_hi=hi, diff=sys - a, diff_lo=lo - a, diff_hi=hi - a))
    out = pd.DataFrame(rows)
    out["step"] = out["step"].astype("Int64")
    return out


@pytest.mark.parametrize("below", [False, True], ids=["from-above", "from-below"])
def test_fit_recovers_a_known_exponent(below):
    fits = invariance.fit_table(synthetic_width(-0.7, 0.2, below=below, unresolved_width=1024))
    assert len(fits) == 6  # 2 steps and pooled, on and off the manifold
    for r in fits.itertuples():
        assert r.widths == "4 16 64 256 1024"
        # the +-10% intervals on four resolved widths: a standard error of about 0.02
        assert r.exponent_lo < -0.7 < r.exponent_hi and r.exponent_hi - r.exponent_lo < 0.2, r
        assert r.exponent == pytest.approx(-0.7, abs=0.02)


def test_fit_needs_two_resolved_widths():
    w = synthetic_width(-0.7, 0.2)
    w = w[w["width"].isin([4, 16])].copy()
    w.loc[w["width"] == 16, ["sys_lo", "diff_lo"]] = [0.0, -0.2]  # interval holds the analytic value
    assert invariance.fit_table(w)["exponent"].isna().all()


def test_verdicts_invariant_model():
    w = synthetic_width(-1, 0.0, invariant=True)
    (v,) = invariance.verdicts(w, invariance.fit_table(w))
    assert v.answer == AGREES and "consistent with zero at every width and step" in v.text
    assert "[0, 5%]" in v.text and "off 0% [0%, 5%]" in v.key
    wide = synthetic_width(-1, 0.0, invariant=True, spread_hi=0.3)
    assert invariance.verdicts(wide, invariance.fit_table(wide))[0].answer == INCONCLUSIVE
    w.loc[(w["width"] == 16) & (w["step"] == 10) & (w["manifold"] == "on"), ["sys", "sys_lo"]] = [0.04, 0.02]
    (v,) = invariance.verdicts(w, invariance.fit_table(w))
    assert v.answer == DIFFERS and "at width 16, step 10" in v.text and "1 of 16 width-step-manifold intervals exclude 0" in v.text


def test_verdicts_non_invariant_model():
    w = synthetic_width(-0.5, 0.2, below=True)
    (v,) = invariance.verdicts(w, invariance.fit_table(w))
    assert v.answer == DIFFERS and "kernel not jointly invariant" in v.text
    assert "on the data manifold analytic 20%" in v.text
    assert "exponent of |measured - analytic| in width -0.5 [" in v.text


# ----- a tiny study end to end -------------------------------------------------------------------
def tiny_invariance_study() -> str:
    model = dict(arch="cnn", depth=1, augmentation="full_orbit", nonlinearity="erf", sigma_w=1.5)
    return yaml.safe_dump(dict(
        name="tiny-invariance", seed=2,
        data={"train": {"source": "digits", "n": 4},
              "eval": [{"name": "digits_test", "data": {"source": "digits", "n": 2, "start": 1000}},
                       {"name": "noise", "data": {"source": "gaussian", "n": 2}}]},
        group="C4",
        models=[dict(name="plus", filter_support="plus", **model), dict(name="cross", filter_support="cross_corner", **model)],
        pairing="antithetic", widths=[2, 8], ensemble_size=4, members_per_unit=4, lr=1.0, steps=4, log_steps=[0, 2, 4],
    ), sort_keys=False)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("invariance")
    (d / "tiny.yaml").write_text(tiny_invariance_study())
    out = d / "run"
    assert main(["run", str(d / "tiny.yaml"), "--out", str(out), "--no-progress"]) == 0
    return out


def test_report_section_files_and_figure(tiny_run):
    rdir = tiny_run / "report"
    w = pd.read_csv(rdir / "invariance_width.csv")
    assert set(w["model"]) == {"plus", "cross"} and set(w["manifold"]) == {"on", "off"}
    assert sorted(w["width"].unique()) == [2, 8] and set(w["step"].dropna()) == {2.0, 4.0}
    assert (w.loc[w["model"] == "plus", "analytic"] < 1e-12).all() and w.loc[w["model"] == "plus", "jointly_invariant"].all()
    assert (w.loc[w["model"] == "cross", "analytic"] > 1e-4).all() and not w.loc[w["model"] == "cross", "jointly_invariant"].any()
    assert (w["sys_lo"] <= w["sys"] + 1e-15).all() and (w["sys"] <= w["sys_hi"] + 1e-15).all()
    np.testing.assert_allclose(w["diff"], w["sys"] - w["analytic"])
    fits = pd.read_csv(rdir / "invariance_fit.csv")
    assert len(fits) == 2 * 2 * 3  # models x manifolds x (2 steps + pooled)
    records = json.loads((rdir / "invariance.json").read_text())
    assert [r["question"] for r in records] == [f"{invariance.QUESTION} ({m})" for m in ("plus", "cross")]
    assert all(r["answer"] in (AGREES, DIFFERS, INCONCLUSIVE) and any(c.isdigit() for c in r["key"]) for r in records)
    page = (rdir / "index.html").read_text()
    assert "Emergent invariance at finite width" in page and "finite_invariance.png" in page
    assert (rdir / "finite_invariance.png").stat().st_size > 0


def test_readme_blocks_render_from_the_run(tiny_run):
    spec = importlib.util.spec_from_file_location("readme_script", ROOT / "scripts" / "readme.py")
    readme = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(readme)
    blocks, images = readme.render({"invariance": tiny_run})
    assert sorted(blocks) == ["invariance-run", "invariance-table", "invariance-verdicts"] and not images
    table = blocks["invariance-table"].splitlines()
    assert table[0].startswith("| model | filter support | tap variance | manifold | draws | analytic | width 2 | width 8 |")
    assert any(line.startswith("| plus | plus | uniform | on | 2 | 0 (") for line in table)
    assert sum(line.startswith("| cross | cross_corner | uniform |") for line in table) == 2
    assert blocks["invariance-verdicts"].count("- **Is the augmented ensemble's mean invariant") == 2
    assert "training: 4 units (4 done)" in blocks["invariance-run"]
