"""The vectorised ensemble against a plain per-member loop (same seeds, same numbers)."""

from __future__ import annotations

import pytest
import torch

from study.spec import ModelSpec
from workers import ensemble as ensemble_module
from workers.ensemble import Ensemble, member_seeds
from workers.models import build_model, init_parameters


MLP = ModelSpec(name="mlp", arch="mlp", depth=2, sigma_b=0.1)


def make_ensemble(seeds, dtype=torch.float64, width=32, memory_budget=None, spec=MLP, shape=(1, 4, 4)):
    module = build_model(spec, width, shape, 3)
    return Ensemble.from_seeds(module, seeds, init_parameters, "cpu", dtype, memory_budget)


def loop_loss_and_grad(module, x, y):
    module.zero_grad()
    loss = 0.5 * (module(x) - y).square().sum() / x.shape[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 4, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    return x, y


def test_member_seeds_do_not_depend_on_the_split():
    assert member_seeds(7, "m", 64, 0, 4) == member_seeds(7, "m", 64, 0, 2) + member_seeds(7, "m", 64, 2, 4)
    assert member_seeds(7, "m", 64, 0, 2) != member_seeds(7, "m", 64, 0, 2, purpose="augment")


def test_members_are_initialised_by_their_seeds():
    seeds = [3, 5, 11]
    ens = make_ensemble(seeds)
    for j, seed in enumerate(seeds):
        ref = init_parameters(build_model(MLP, 32, (1, 4, 4), 3).double(), seed)
        for name, p in ref.named_parameters():
            assert torch.equal(ens.params[name][j], p.detach())


def test_vectorised_forward_and_gradient_equal_a_loop(data):
    x, y = data
    ens = make_ensemble([1, 2, 3, 4])
    preds = ens.predict(x)
    loss, grads = ens.loss_and_grad(x, y)
    for j in range(ens.members):
        member = ens.member(j)
        ref_loss, ref_grads = loop_loss_and_grad(member, x, y)
        # float64 round-off: batched and plain matmuls may sum in another order (~1e-16 relative)
        torch.testing.assert_close(preds[j], member(x).detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loss[j], ref_loss, rtol=1e-12, atol=1e-12)
        for name in ref_grads:
            torch.testing.assert_close(grads[name][j], ref_grads[name], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "spec",
    [
        ModelSpec(name="cnn", arch="cnn", padding="zero", readout="flatten", sigma_b=0.3),
        ModelSpec(name="gcnn_id", arch="gcnn", support="identity", sigma_b=0.3),
        ModelSpec(name="gcnn_d4", arch="gcnn", group="D4", support="full"),
        ModelSpec(name="gcnn_escnn", arch="gcnn", group="C8", basis="escnn"),
        ModelSpec(name="group_mlp", arch="group_mlp", support="full", sigma_b=0.3),
    ],
    ids=lambda s: s.name,
)
def test_every_architecture_vectorises_like_a_loop(spec):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 5, 5, generator=gen, dtype=torch.float64)
    y = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    ens = make_ensemble([1, 2], width=4, spec=spec, shape=(2, 5, 5))
    loss, grads = ens.loss_and_grad(x, y)
    for j in range(2):
        ref_loss, ref_grads = loop_loss_and_grad(ens.member(j), x, y)
        # float64 round-off of batched against plain convolutions and filter expansions
        torch.testing.assert_close(loss[j], ref_loss, rtol=1e-12, atol=1e-12)
        for name in ref_grads:
            torch.testing.assert_close(grads[name][j], ref_grads[name], rtol=1e-12, atol=1e-12)


def test_per_member_inputs_equal_a_loop(data):
    x, y = data
    ens = make_ensemble([1, 2, 3])
    xs = torch.stack([x * (j + 1) for j in range(3)])  # a different batch per member
    preds = ens.predict(xs, per_member=True)
    loss, grads = ens.loss_and_grad(xs, y, per_member=True)
    for j in range(3):
        ref_loss, ref_grads = loop_loss_and_grad(ens.member(j), xs[j], y)
        torch.testing.assert_close(preds[j], ens.member(j)(xs[j]).detach(), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(loss[j], ref_loss, rtol=1e-12, atol=1e-12)
        for name in ref_grads:
            torch.testing.assert_close(grads[name][j], ref_grads[name], rtol=1e-12, atol=1e-12)


def test_gradient_descent_equals_a_loop_of_optimisers(data):
    x, y = data
    lr, steps = 0.5, 20
    ens = make_ensemble([1, 2, 3])
    loops = [ens.member(j) for j in range(3)]
    opts = [torch.optim.SGD(m.parameters(), lr=lr) for m in loops]
    for _ in range(steps):
        _, grads = ens.loss_and_grad(x, y)
        ens.descend(grads, lr)
        for m, opt in zip(loops, opts):
            loop_loss_and_grad(m, x, y)
            opt.step()
    for j, m in enumerate(loops):
        for name, p in m.named_parameters():
            # 20 steps of float64 round-off differences, amplified by at most a few per step
            torch.testing.assert_close(ens.params[name][j], p.detach(), rtol=1e-10, atol=1e-10)


def test_members_do_not_depend_on_their_companions(data):
    x, y = data
    seeds = member_seeds(0, "m", 32, 0, 4)
    whole = make_ensemble(seeds)
    halves = [make_ensemble(seeds[:2]), make_ensemble(seeds[2:])]
    for _ in range(10):
        for ens in [whole, *halves]:
            ens.descend(ens.loss_and_grad(x, y)[1], 0.5)
    for name, p in whole.params.items():
        # exact: each member's slice of a batched matmul is computed on its own
        assert torch.equal(p, torch.cat([h.params[name] for h in halves]))


@pytest.mark.parametrize("block_bytes, block", [(1, 1), (2 * 40 * 4000, 2)])
def test_blocks_of_members_give_the_same_numbers(data, monkeypatch, block_bytes, block):
    x, y = data
    xs = torch.stack([x * (j + 1) for j in range(5)])  # a different batch per member
    whole, blocked = make_ensemble([1, 2, 3, 4, 5]), make_ensemble([1, 2, 3, 4, 5])
    assert whole._plan(x, False, backward=True) == (5, 40, True)
    expected = (whole.predict(x), whole.predict(xs, True), whole.loss_and_grad(x, y), whole.loss_and_grad(xs, y, True))
    monkeypatch.setattr(ensemble_module, "CPU_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(blocked, "_elements_per_sample", {(1, 4, 4): 500})  # 4000 bytes per sample
    assert blocked._plan(x, False, backward=True) == (block, 40, True)
    got = (blocked.predict(x), blocked.predict(xs, True), blocked.loss_and_grad(x, y), blocked.loss_and_grad(xs, y, True))
    # exact: a member's slice of a batched computation does not depend on the other members
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    for (loss_b, grads_b), (loss, grads) in zip(got[2:], expected[2:]):
        assert torch.equal(loss_b, loss) and all(torch.equal(grads_b[k], grads[k]) for k in grads)
    assert torch.equal(blocked.gd_step(x, y, 0.5), expected[2][0])
    whole.descend(expected[2][1], 0.5)
    assert all(torch.equal(blocked.params[k], p) for k, p in whole.params.items())


def test_members_too_big_to_batch_run_the_plain_forward(data, monkeypatch):
    x, y = data
    whole, plain = make_ensemble([1, 2, 3]), make_ensemble([1, 2, 3])
    monkeypatch.setattr(ensemble_module, "CPU_VMAP_MEMBER_BYTES", 0)
    assert plain._plan(x, False, backward=True) == (1, 40, False)
    # float64 round-off: plain against batched matmuls
    torch.testing.assert_close(plain.predict(x), whole.predict(x), rtol=1e-12, atol=1e-12)
    loss, grads = whole.loss_and_grad(x, y)
    loss_p, grads_p = plain.loss_and_grad(x, y)
    torch.testing.assert_close(loss_p, loss, rtol=1e-12, atol=1e-12)
    for k in grads:
        torch.testing.assert_close(grads_p[k], grads[k], rtol=1e-12, atol=1e-12)


def test_chunked_batches_give_the_same_loss_and_gradient(data):
    x, y = data
    whole = make_ensemble([1, 2])
    tiny = make_ensemble([1, 2], memory_budget=1)  # one sample per chunk
    assert tiny._plan(x, False, backward=True)[1] == 1  # one sample per chunk
    loss, grads = whole.loss_and_grad(x, y)
    loss_c, grads_c = tiny.loss_and_grad(x, y)
    # sums over 40 one-sample chunks instead of one reduction: float64 round-off
    torch.testing.assert_close(loss_c, loss, rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tiny.predict(x), whole.predict(x), rtol=1e-12, atol=1e-12)

