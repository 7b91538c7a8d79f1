"""Augmentation, gradient-descent training with orbit logging, and whole work units."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from study.data import StudyData
from study.grid import UnitSpec
from study.groups import Group
from study.spec import ModelSpec
from workers.augment import FullOrbit, Minibatches, RandomOrbit, make_augmentation
from workers.ensemble import Ensemble, member_seeds
from workers.models import build_model, init_parameters
from workers.train import orbit_inputs, train_gd
from workers.unit import reproducible, resolve_device, run_unit


class MemoryWriter:
    """Keeps every ``log`` call, in order."""

    def __init__(self):
        self.calls: list[tuple[int, str, np.ndarray]] = []

    def log(self, step, eval_set, preds):
        self.calls.append((step, eval_set, np.array(preds)))

    def at(self, step, eval_set):
        (p,) = [p for s, e, p in self.calls if s == step and e == eval_set]
        return p


def images(n, seed, size=4, channels=1):
    return np.random.default_rng(seed).standard_normal((n, channels, size, size))


def study_data(n=12, n_out=2, seed=0):
    rng = np.random.default_rng(seed)
    return StudyData(
        train_x=images(n, seed),
        train_y=rng.standard_normal((n, n_out)),
        eval_sets={"test": images(5, seed + 1)},
    )


def unit(model: ModelSpec, start=0, stop=4, lr=0.5, steps=12, log_steps=(0, 5, 12), dtype="float64"):
    return UnitSpec(
        unit_id="u",
        study_seed=3,
        model=model,
        width=16,
        member_start=start,
        member_stop=stop,
        lr=lr,
        steps=steps,
        log_steps=list(log_steps),
        dtype=dtype,
        device="cpu",
        store_members=True,
    )


MLP = ModelSpec(name="mlp", arch="mlp", group="C4", depth=2)


# ----- augmentation ------------------------------------------------------------------
@pytest.mark.parametrize("group, shape", [("C4", (2, 4, 4)), ("D4", (1, 3, 3)), ("D3", (2, 6))])
def test_full_orbit_has_every_transformed_sample_with_its_target(group, shape):
    g = Group.parse(group)
    x = torch.randn(5, *shape, generator=torch.Generator().manual_seed(0))
    y = torch.arange(10.0).reshape(5, 2)
    batch = FullOrbit(g, x, y).next_batch()
    assert batch.x.shape == (5 * g.order, *shape) and batch.y.shape == (5 * g.order, 2)
    act = g.act_image if len(shape) == 3 else g.act_ring
    for i in range(5):
        for e in range(g.order):
            assert torch.equal(batch.x[i * g.order + e], act(x[i], e))
            assert torch.equal(batch.y[i * g.order + e], y[i])


def test_random_orbit_is_seeded_per_member_and_stays_in_the_orbit():
    g = Group.parse("D4")
    x = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.zeros(6, 1)
    seeds = member_seeds(0, "m", 8, 0, 3, purpose="augment")
    a, b = RandomOrbit(g, x, y, seeds), RandomOrbit(g, x, y, seeds)
    alone = RandomOrbit(g, x, y, seeds[2:])  # member 2 in a unit of its own
    orbits = g.orbit(x)
    draws = []
    for _ in range(4):
        ba, bb, bc = a.next_batch(), b.next_batch(), alone.next_batch()
        assert ba.per_member and ba.x.shape == (3, 6, 1, 4, 4)
        assert torch.equal(ba.x, bb.x) and torch.equal(ba.x[2], bc.x[0])
        for j in range(3):
            for i in range(6):
                assert any(torch.equal(ba.x[j, i], orbits[i, e]) for e in range(g.order))
        draws.append(ba.x)
    assert not torch.equal(draws[0], draws[1])  # fresh elements each step
    assert not torch.equal(draws[0][0], draws[0][1])  # and each member


def test_random_draws_cover_the_group_uniformly():
    g = Group.parse("C4")
    aug = RandomOrbit(g, torch.zeros(1000, 1, 2, 2), torch.zeros(1000, 1), [1, 2])
    counts = np.bincount(aug.draw().reshape(-1).numpy(), minlength=4)
    # 2000 draws, 500 expected per element, sd ~19: 5 sd
    assert np.all(np.abs(counts - 500) < 100)


def test_unknown_augmentation_is_named():
    with pytest.raises(ValueError, match="augmentation"):
        make_augmentation("mixup", Group.parse("C4"), torch.zeros(1, 1, 2, 2), torch.zeros(1, 1))


# ----- training ----------------------------------------------------------------------
def mlp_ensemble(spec=MLP, seeds=(1, 2, 3), width=16, shape=(1, 4, 4), n_out=2):
    module = build_model(spec, width, shape, n_out)
    return Ensemble.from_seeds(module, list(seeds), init_parameters, "cpu", torch.float64)


def test_small_learning_rate_decreases_every_members_loss_monotonically():
    data = study_data()
    x, y = torch.as_tensor(data.train_x), torch.as_tensor(data.train_y)
    ens = mlp_ensemble()
    result = train_gd(ens, make_augmentation("none", MLP.group_obj, x, y), 0.05, 200, [0, 200], {}, MemoryWriter())
    assert result.status == "done" and result.steps_reached == 200
    steps = np.diff(result.losses, axis=0)
    assert np.all(steps < 0), "GD at a small learning rate must decrease each member's loss"
    assert np.all(result.losses[-1] < 0.7 * result.losses[0])


def test_logs_orbit_predictions_of_each_member_in_step_order():
    data = study_data()
    g = MLP.group_obj
    x, y = torch.as_tensor(data.train_x), torch.as_tensor(data.train_y)
    ens = mlp_ensemble()
    initial = {name: [ens.member(j) for j in range(3)] for name in ("train",)}
    evals = {"train": orbit_inputs(g, x), "test": orbit_inputs(g, torch.as_tensor(data.eval_sets["test"]))}
    writer = MemoryWriter()
    train_gd(ens, make_augmentation("none", g, x, y), 0.1, 7, [0, 3, 7], evals, writer)
    assert [(s, e) for s, e, _ in writer.calls] == [(s, e) for s in (0, 3, 7) for e in ("train", "test")]
    assert writer.at(3, "test").shape == (3, 5, 4, 2)
    p0 = writer.at(0, "train")
    for j, member in enumerate(initial["train"]):
        for e in range(g.order):
            # the initial function on L_e x: the same float64 computation, batched differently
            np.testing.assert_allclose(p0[j, :, e], member(g.act_image(x, e)).detach().numpy(), rtol=1e-12, atol=1e-12)
    # the final log is the trained ensemble
    np.testing.assert_allclose(writer.at(7, "train")[:, :, 0], ens.predict(x).numpy(), rtol=1e-12, atol=1e-12)


def test_huge_learning_rate_diverges_and_reports_the_last_finite_step():
    data = study_data()
    x, y = torch.as_tensor(data.train_x), torch.as_tensor(data.train_y)
    writer = MemoryWriter()
    ens = mlp_ensemble()
    result = train_gd(ens, make_augmentation("none", MLP.group_obj, x, y), 1e6, 500, [0, 1, 400, 500], {"train": orbit_inputs(MLP.group_obj, x)}, writer)
    assert result.status == "diverged"
    assert 0 < result.steps_reached < 400
    assert np.all(np.isfinite(result.losses)) and len(result.losses) == result.steps_reached + 1
    assert {s for s, _, _ in writer.calls} == {0, 1}  # nothing logged past divergence
    assert all(np.isfinite(p).all() for _, _, p in writer.calls)


# ----- whole units -----------------------------------------------------------------------
def run(u, data):
    writer = MemoryWriter()
    outcome = run_unit(u, data, writer)
    return outcome, writer


def test_unit_logs_train_and_eval_sets_and_reports():
    data = study_data()
    outcome, writer = run(unit(MLP), data)
    assert outcome.status == "done" and outcome.steps_reached == 12 and outcome.device == "cpu"
    assert [(s, e) for s, e, _ in writer.calls] == [(s, e) for s in (0, 5, 12) for e in ("train", "test")]
    assert writer.at(5, "train").shape == (4, 12, 4, 2)
    assert writer.at(5, "train").dtype == np.float64


def test_unit_is_deterministic():
    data = study_data()
    spec = MLP.model_copy(update={"augmentation": "random"})
    _, a = run(unit(spec, dtype="float32"), data)
    _, b = run(unit(spec, dtype="float32"), data)
    for (sa, ea, pa), (sb, eb, pb) in zip(a.calls, b.calls, strict=True):
        assert (sa, ea) == (sb, eb) and np.array_equal(pa, pb)


SGD = dict(optimizer="sgd", batch_size=5)
SPLITS = [dict(augmentation="none"), dict(augmentation="full_orbit"), dict(augmentation="random"),
          dict(augmentation="none", loss="cross_entropy", **SGD), dict(augmentation="random", **SGD),
          dict(augmentation="full_orbit", loss="cross_entropy", **SGD)]


@pytest.mark.parametrize("fields", SPLITS, ids=lambda f: "-".join(map(str, f.values())))
def test_members_do_not_depend_on_how_units_split_them(fields):
    data = study_data()
    spec = ModelSpec(**{**MLP.model_dump(), **fields})
    _, whole = run(unit(spec, 0, 4), data)
    _, first = run(unit(spec, 0, 2), data)
    _, second = run(unit(spec, 2, 4), data)
    for (s, e, p), (_, _, p1), (_, _, p2) in zip(whole.calls, first.calls, second.calls, strict=True):
        # exact: every member's slice of a batched computation is computed on its own
        assert np.array_equal(p, np.concatenate([p1, p2])), (s, e)


def test_full_orbit_unit_mean_is_more_invariant_than_no_augmentation():
    """Emergent invariance (docs/theory.md §6): the full-orbit ensemble's training pulls orbits together."""
    data = study_data(n=8)
    base = unit(MLP, 0, 8, lr=1.0, steps=150, log_steps=(0, 150))
    spread = {}
    for aug in ("none", "full_orbit"):
        _, w = run(base.model_copy(update={"model": MLP.model_copy(update={"augmentation": aug})}), data)
        p = w.at(150, "train")  # [M, n, |G|, out]
        spread[aug] = np.abs(p - p[:, :, :1]).mean()
    assert spread["full_orbit"] < 0.5 * spread["none"]


def test_reserved_eval_set_name_is_refused():
    data = study_data()
    data.eval_sets["train"] = data.train_x
    with pytest.raises(ValueError, match="eval_sets"):
        run_unit(unit(MLP), data, MemoryWriter())


def test_device_auto_falls_back_to_cpu_and_cuda_is_refused_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(RuntimeError, match="device"):
        resolve_device("cuda")


def test_reproducible_restores_global_settings():
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.allow_tf32, torch.get_num_threads())
    with reproducible():
        assert torch.are_deterministic_algorithms_enabled()
    assert (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.allow_tf32, torch.get_num_threads()) == before


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec(name="gcnn", arch="gcnn", group="D4", support="full", sigma_b=0.2),
        ModelSpec(name="group_mlp", arch="group_mlp", group="C4", support="identity"),
    ],
    ids=lambda s: s.name,
)
def test_invariant_models_log_orbit_constant_predictions_while_training(spec):
    data = study_data(n=6)
    u = unit(spec, 0, 2, lr=0.5, steps=4, log_steps=(0, 4)).model_copy(update={"width": 3})
    outcome, writer = run(u, data)
    assert outcome.status == "done"
    for step, name, p in writer.calls:
        assert p.shape[2] == spec.group_obj.order
        # an invariant network gives one value per orbit, up to float64 round-off
        np.testing.assert_allclose(p, np.broadcast_to(p[:, :, :1], p.shape), rtol=1e-10, atol=1e-10)
    assert not np.allclose(writer.at(0, "train"), writer.at(4, "train"))  # and it did train


# ----- SGD and the cross-entropy ---------------------------------------------------------
def class_targets(n=12, n_out=3, seed=0, dtype=torch.float64):
    """Centred one-hot targets, as the study builds them."""
    labels = torch.as_tensor(np.random.default_rng(seed).integers(0, n_out, n))
    return torch.nn.functional.one_hot(labels, n_out).to(dtype) - 1.0 / n_out


def test_minibatches_are_seeded_per_member_distinct_and_sorted():
    g = Group.parse("C4")
    x = torch.arange(10.0).reshape(10, 1, 1, 1).expand(10, 1, 2, 2).contiguous()
    y = torch.arange(10.0)[:, None]
    seeds = member_seeds(0, "m", 8, 0, 3, purpose="sgd")
    a = Minibatches(make_augmentation("none", g, x, y), 4, seeds)
    b = Minibatches(make_augmentation("none", g, x, y), 4, seeds)
    alone = Minibatches(make_augmentation("none", g, x, y), 4, seeds[1:2])  # member 1 in a unit of its own
    rows = []
    for _ in range(3):
        ba, bb, bc = a.next_batch(), b.next_batch(), alone.next_batch()
        assert ba.per_member and ba.x.shape == (3, 4, 1, 2, 2) and ba.y.shape == (3, 4, 1)
        assert torch.equal(ba.x, bb.x) and torch.equal(ba.y, bb.y) and torch.equal(ba.x[1], bc.x[0])
        r = ba.y[..., 0]
        assert torch.equal(ba.x[:, :, 0, 0, 0], r)  # each input keeps its target
        assert (r[:, 1:] > r[:, :-1]).all()  # distinct samples, in order
        rows.append(r)
    assert not torch.equal(rows[0], rows[1]) and not torch.equal(rows[0][0], rows[0][1])
    # full orbit: the |G| N augmented samples are the pool; a batch above it is refused
    assert Minibatches(make_augmentation("full_orbit", g, x, y), 40, seeds).next_batch().x.shape == (3, 40, 1, 2, 2)
    with pytest.raises(ValueError, match="batch_size"):
        Minibatches(make_augmentation("random", g, x, y, seeds), 11, seeds)


def train(spec, x, y, sgd_batch=None, steps=15, lr=0.3, dtype=torch.float64, seeds=(1, 2, 3)):
    ens = mlp_ensemble(spec, seeds, width=8, n_out=y.shape[1]) if dtype == torch.float64 else \
        Ensemble.from_seeds(build_model(spec, 8, tuple(x.shape[1:]), y.shape[1]), list(seeds), init_parameters, "cpu", dtype)
    aug = make_augmentation(spec.augmentation, spec.group_obj, x, y, [s + 10 for s in seeds])
    if sgd_batch:
        aug = Minibatches(aug, sgd_batch, [s + 20 for s in seeds])
    result = train_gd(ens, aug, lr, steps, [], {}, MemoryWriter(), loss=spec.loss)
    return ens, result


@pytest.mark.parametrize("augmentation", ["none", "full_orbit", "random"])
def test_sgd_on_the_whole_batch_is_full_batch_gd(augmentation):
    """Every step draws every row, in order: the same numbers as GD (bitwise for an MLP)."""
    data = study_data()
    x, y = torch.as_tensor(data.train_x), torch.as_tensor(data.train_y)
    spec = MLP.model_copy(update={"augmentation": augmentation})
    gd, gd_result = train(spec, x, y)
    whole = len(x) * (spec.group_obj.order if augmentation == "full_orbit" else 1)
    sgd, sgd_result = train(spec, x, y, sgd_batch=whole)
    assert np.array_equal(gd_result.losses, sgd_result.losses)
    for k in gd.params:
        assert torch.equal(gd.params[k], sgd.params[k]), k


def test_cross_entropy_gradient_matches_autograd():
    x = torch.as_tensor(images(7, 4))
    y = class_targets(7, 3, seed=4)
    spec = MLP.model_copy(update={"loss": "cross_entropy"})
    ens = mlp_ensemble(spec, seeds=(5,), n_out=3)
    loss, grads = ens.loss_and_grad(x, y, loss="cross_entropy")
    module = ens.member(0)
    ref = torch.nn.functional.cross_entropy(module(x), y.argmax(dim=1))  # mean over the batch
    ref.backward()
    assert torch.allclose(loss[0], ref.detach(), rtol=1e-13, atol=0)
    for name, p in module.named_parameters():
        torch.testing.assert_close(grads[name][0], p.grad, rtol=1e-12, atol=1e-14)
    # each member's own batch (SGD): targets per member
    ens2 = mlp_ensemble(spec, seeds=(5, 6), n_out=3)
    loss2, grads2 = ens2.loss_and_grad(torch.stack([x, x.flip(0)]), torch.stack([y, y.flip(0)]), per_member=True,
                                       loss="cross_entropy")
    assert torch.allclose(loss2[0], ref.detach(), rtol=1e-13, atol=0)
    for name, p in module.named_parameters():
        torch.testing.assert_close(grads2[name][0], p.grad, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.float64, 1e-12)], ids=["float32", "float64"])
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
@pytest.mark.parametrize("augmentation", ["full_orbit", "random"])
def test_vectorised_sgd_equals_a_loop_over_members(augmentation, loss, dtype, tol):
    """The ensemble's SGD against each member trained alone with plain autograd on the same minibatches."""
    x = torch.as_tensor(images(8, 5), dtype=dtype)
    y = class_targets(8, 3, seed=5, dtype=dtype)
    spec = MLP.model_copy(update={"augmentation": augmentation, "loss": loss})
    seeds, lr, steps = (1, 2, 3), 0.5, 6
    ens = Ensemble.from_seeds(build_model(spec, 8, (1, 4, 4), 3), list(seeds), init_parameters, "cpu", dtype)
    members = [ens.member(j) for j in range(len(seeds))]
    aug = lambda: Minibatches(make_augmentation(augmentation, spec.group_obj, x, y, [11, 12, 13]), 5, [21, 22, 23])
    train_gd(ens, aug(), lr, steps, [], {}, MemoryWriter(), loss=loss)
    batches = aug()
    for _ in range(steps):
        b = batches.next_batch()
        for j, m in enumerate(members):
            out = m(b.x[j])
            if loss == "mse":
                value = 0.5 * (out - b.y[j]).square().sum() / len(out)
            else:
                value = torch.nn.functional.cross_entropy(out, b.y[j].argmax(dim=1))
            m.zero_grad()
            value.backward()
            with torch.no_grad():
                for p in m.parameters():
                    p.sub_(p.grad, alpha=lr)
    for j, m in enumerate(members):
        for name, p in m.named_parameters():
            torch.testing.assert_close(ens.params[name][j], p.detach(), rtol=tol, atol=tol)


def test_sgd_cross_entropy_divergence_is_detected():
    x = torch.as_tensor(images(12, 6), dtype=torch.float32)
    y = class_targets(12, 3, seed=6, dtype=torch.float32)
    spec = ModelSpec(name="lin", arch="mlp", depth=2, nonlinearity="identity", loss="cross_entropy",
                     optimizer="sgd", batch_size=4)
    _, result = train(spec, x, y, sgd_batch=4, steps=300, lr=1e6, dtype=torch.float32)
    assert result.status == "diverged" and result.steps_reached < 300
    assert np.all(np.isfinite(result.losses))


def test_sgd_cross_entropy_learns_the_classes():
    data = study_data(n=12)
    x, y = torch.as_tensor(data.train_x), class_targets(12, 3, seed=7)
    spec = MLP.model_copy(update={"loss": "cross_entropy", "optimizer": "sgd", "batch_size": 4})
    ens, result = train(spec, x, y, sgd_batch=4, steps=300, lr=1.0)
    assert result.status == "done"
    accuracy = (ens.predict(x).argmax(dim=-1) == y.argmax(dim=1)).double().mean()
    assert accuracy > 0.75  # chance: 1/3
    assert result.losses[-20:].mean() < 0.5 * result.losses[0].mean()


def test_sgd_cross_entropy_study_end_to_end(tmp_path, tiny_study):
    """``eqntk run`` with analysis and report: models without an analytic counterpart get no kernel
    and stay out of the comparisons with theory, but not out of the ensemble-only ones."""
    from eqntk import pipeline
    from eqntk.cli import main

    study = tmp_path / "sgd.yaml"
    study.write_text(tiny_study(
        name="tiny-sgd", seed=4, noise_n=2, widths=[8], members_per_unit=None, steps=10, log_steps=[0, 1, 10],
        models=[dict(name="mlp_aug", arch="mlp", depth=1, augmentation="full_orbit"),
                dict(name="mlp_aug_sgd", arch="mlp", depth=1, augmentation="full_orbit",
                     loss="cross_entropy", optimizer="sgd", batch_size=4),
                dict(name="gmlp_sgd", arch="group_mlp", depth=1, support="identity",
                     loss="cross_entropy", optimizer="sgd", batch_size=4)]))
    out = tmp_path / "out"
    assert main(["run", str(study), "--out", str(out), "--no-progress"]) == 0
    assert (out / "report" / "index.html").is_file()
    t = pipeline.load_tables(out)
    assert (t["units"]["state"] == "done").all()
    th = t["theory"].set_index("model")
    assert th.loc["mlp_aug", "status"] == "ok"
    for m in ("mlp_aug_sgd", "gmlp_sgd"):
        assert th.loc[m, "status"] == "not applicable" and "no analytic counterpart" in th.loc[m, "error"]
        assert not list((out / "analysis").glob(f"theory-{m}-*"))  # nothing computed or cached
    p = t["points"]
    sgd = p["model"] != "mlp_aug"
    assert p.loc[sgd, "mu"].isna().all() and np.isfinite(p.loc[sgd, "mean"]).all()
    assert p.loc[~sgd, "mu"].notna().all()
    assert set(t["agreement"]["model"]) == set(t["convergence"]["model"]) == {"mlp_aug"}
    inv = t["invariance"]
    assert set(inv["model"]) == {"mlp_aug", "mlp_aug_sgd", "gmlp_sgd"}
    assert inv.loc[inv["model"] == "gmlp_sgd", "spread"].max() < 1e-5  # invariant by construction
    pairs = t["pairs"]
    assert set(zip(pairs["a"], pairs["b"])) == {("mlp_aug_sgd", "gmlp_sgd")}  # only pairs trained alike
    assert pairs["gap_se"].notna().all() and pairs["theory_gap_se"].isna().all()
    models = t["models"].set_index("model")
    assert models.loc["gmlp_sgd", "optimizer"] == "sgd" and models.loc["gmlp_sgd", "batch_size"] == 4
