"""The vectorised ensemble against a plain per-member loop (same seeds, same numbers)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from workers.ensemble import Ensemble, member_seeds


class StandInMLP(nn.Module):
    """NTK-parameterised ReLU MLP (docs/models.md, ``mlp``), a stand-in until workers.models lands."""

    def __init__(self, d: int, width: int, n_out: int, depth: int = 2):
        super().__init__()
        sizes = [d] + [width] * depth + [n_out]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))

    def forward(self, x):
        h = x.flatten(1)
        for i, layer in enumerate(self.layers):
            h = layer.weight.shape[1] ** -0.5 * h @ layer.weight.T + 0.1 * layer.bias
            if i < len(self.layers) - 1:
                h = torch.relu(h)
        return h


def stand_in_init(module: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype))


def make_ensemble(seeds, dtype=torch.float64, width=32, memory_budget=None):
    return Ensemble.from_seeds(StandInMLP(12, width, 3), seeds, stand_in_init, "cpu", dtype, memory_budget)


def loop_loss_and_grad(module, x, y):
    module.zero_grad()
    loss = 0.5 * (module(x) - y).square().sum() / x.shape[0]
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.fixture
def data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(40, 1, 3, 4, generator=gen, dtype=torch.float64)
    y = torch.randn(40, 3, generator=gen, dtype=torch.float64)
    return x, y


def test_member_seeds_do_not_depend_on_the_split():
    assert member_seeds(7, "m", 64, 0, 4) == member_seeds(7, "m", 64, 0, 2) + member_seeds(7, "m", 64, 2, 4)
    assert member_seeds(7, "m", 64, 0, 2) != member_seeds(7, "m", 64, 0, 2, purpose="augment")


def test_members_are_initialised_by_their_seeds():
    seeds = [3, 5, 11]
    ens = make_ensemble(seeds)
    for j, seed in enumerate(seeds):
        ref = StandInMLP(12, 32, 3).double()
        stand_in_init(ref, seed)
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


def test_chunked_batches_give_the_same_loss_and_gradient(data):
    x, y = data
    whole = make_ensemble([1, 2])
    tiny = make_ensemble([1, 2], memory_budget=1)  # one sample per chunk
    assert tiny._chunk_size(x, False, backward=True) == 1
    loss, grads = whole.loss_and_grad(x, y)
    loss_c, grads_c = tiny.loss_and_grad(x, y)
    # sums over 40 one-sample chunks instead of one reduction: float64 round-off
    torch.testing.assert_close(loss_c, loss, rtol=1e-12, atol=1e-12)
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tiny.predict(x), whole.predict(x), rtol=1e-12, atol=1e-12)

