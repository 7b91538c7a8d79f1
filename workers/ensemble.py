"""A whole ensemble as one vectorised computation (torch.func).

Members share one architecture and differ only in their parameters, which are stacked on
a leading member axis. The forward pass is ``vmap(functional_call)`` over that axis, and
each member's own full-batch gradient is one ``vjp`` of the vectorised forward: members do
not share parameters, so the gradient of the summed loss with respect to member ``j``'s
slice is exactly the gradient of member ``j``'s own loss. On a GPU the whole ensemble is one
block; on a CPU, members too big to gain from vmap run one at a time (``Ensemble._plan``).
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch
from torch import nn
from torch.func import functional_call, vjp, vmap

from study.seeds import member_seed

# Working memory a chunk of a forward (or forward + backward) may use. Large batches are
# split into chunks so a big eval set or a full-orbit training set never runs out of memory.
CPU_MEMORY_BUDGET = 2 * 2**30
CUDA_MEMORY_FRACTION = 0.5  # of the GPU's memory
# On a CPU, members are batched with vmap only while one member's activations stay under
# CPU_VMAP_MEMBER_BYTES, in blocks of at most CPU_BLOCK_BYTES (see Ensemble._plan).
CPU_VMAP_MEMBER_BYTES = 2**20
CPU_BLOCK_BYTES = 256 * 2**20


def member_seeds(
    study_seed: int, model_name: str, width: int, start: int, stop: int, purpose: str = "init",
    antithetic: bool = False,
) -> list[int]:
    """Seeds of members ``start .. stop-1`` of the (model, width) ensemble.

    ``antithetic``: members ``2k`` and ``2k + 1`` form a pair and both take member ``2k``'s
    seed (the second member's readout is negated after initialisation, ``Ensemble.from_seeds``),
    so a pair shares its hidden layers and, for augmentation and minibatch seeds, its draws.
    """
    if antithetic and (start % 2 or stop % 2):
        raise ValueError(f"antithetic pairs: members {start}..{stop - 1} split a pair; units must hold whole pairs")
    return [member_seed(study_seed, model_name, width, j - (j % 2 if antithetic else 0), purpose)
            for j in range(start, stop)]


def readout_names(module: nn.Module) -> list[str]:
    """Names of the parameters of ``module.readout``, the layer every model ends with."""
    prefix = next(name for name, m in module.named_modules() if m is module.readout)
    return [name for name, _ in module.named_parameters() if name.startswith(prefix + ".")]


class Ensemble:
    """``M`` members of one architecture, evaluated and differentiated together.

    ``params`` maps each parameter name of ``module`` to a tensor ``[M, *shape]``;
    ``module`` itself only supplies the computation (and its buffers, shared by members).
    """

    def __init__(self, module: nn.Module, params: dict[str, torch.Tensor], memory_budget: int | None = None):
        self.module = module
        self.params = params
        self.buffers = dict(module.named_buffers())
        self.members = next(iter(params.values())).shape[0]
        self._elements_per_sample: dict[tuple, int] = {}
        self.memory_budget = memory_budget if memory_budget is not None else _default_budget(self.device)

    @classmethod
    def from_seeds(
        cls,
        module: nn.Module,
        seeds: Sequence[int],
        init: Callable[[nn.Module, int], None],
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        memory_budget: int | None = None,
        antithetic: bool = False,
    ) -> "Ensemble":
        """Member ``j`` is ``module`` after ``init(module, seeds[j])``.

        ``antithetic``: members ``2k + 1`` (given the same seed as ``2k``, ``member_seeds``)
        take the readout layer's parameters with the opposite sign, so each pair's initial
        functions cancel exactly while every member keeps the N(0, 1) law of its parameters
        (docs/theory.md §5).

        Initialisation runs where ``build_model`` put the module (the CPU), so members are
        the same numbers on every device. The one module is re-initialised per member and
        its parameters stacked (what ``torch.func.stack_module_state`` does, without
        copying the module: escnn modules carry large shared objects).
        """
        module = module.to(dtype=dtype)
        snapshots = []
        reference_buffers = None
        for seed in seeds:
            init(module, int(seed))
            snapshots.append({n: p.detach().clone() for n, p in module.named_parameters()})
            buffers = {n: b.detach().clone() for n, b in module.named_buffers()}
            if reference_buffers is None:
                reference_buffers = buffers
            elif any(not torch.equal(b, reference_buffers[n]) for n, b in buffers.items()):
                raise ValueError("init changed a buffer between members; the ensemble shares buffers")
        params = {n: torch.stack([snap[n] for snap in snapshots]) for n in snapshots[0]}
        if antithetic:
            if len(seeds) % 2 or list(seeds[0::2]) != list(seeds[1::2]):
                raise ValueError("antithetic: members come in pairs (2k, 2k + 1) that share one seed")
            for name in readout_names(module):
                params[name][1::2] *= -1
        params = {n: p.to(device) for n, p in params.items()}
        return cls(module.to(device), params, memory_budget)

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.params.values())).dtype

    # ----- one member's function, vectorised over a block of members ----------------
    def _member_forward(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.module, (params, self.buffers), (x,))

    def _forward(self, params: dict[str, torch.Tensor], x: torch.Tensor, per_member: bool, vectorise: bool = True):
        """``[m, b, n_out]`` for a block of ``m`` members (``params`` ``[m, *shape]``).

        ``vectorise=False``: one member, whose ``params`` have no member axis, through the
        plain forward.
        """
        if not vectorise:
            return self._member_forward(params, x[0] if per_member else x).unsqueeze(0)
        return vmap(self._member_forward, in_dims=(0, 0 if per_member else None))(params, x)

    def _pieces(self, x: torch.Tensor, per_member: bool, backward: bool):
        """``(members slice, sample slices, vectorise)`` pieces covering the members and the batch."""
        block, chunk, vectorise = self._plan(x, per_member, backward)
        n = x.shape[1] if per_member else x.shape[0]
        for a in range(0, self.members, block):
            members = slice(a, min(a + block, self.members))
            yield members, [slice(c, min(c + chunk, n)) for c in range(0, n, chunk)], vectorise

    def _block_params(self, members: slice, vectorise: bool) -> dict[str, torch.Tensor]:
        """Views of a block's parameters (``[m, *shape]``, or ``[*shape]`` for one plain member)."""
        index = members if vectorise else members.start
        return {k: p[index] for k, p in self.params.items()}

    @staticmethod
    def _take(x: torch.Tensor, members: slice, samples: slice, per_member: bool) -> torch.Tensor:
        return x[members, samples] if per_member else x[samples]

    # ----- evaluation ----------------------------------------------------------------
    @torch.no_grad()
    def predict(self, x: torch.Tensor, per_member: bool = False) -> torch.Tensor:
        """Every member's outputs, ``[M, B, n_out]``; ``x`` is ``[B, *shape]`` or (per member) ``[M, B, *shape]``."""
        blocks = []
        for members, chunks, vec in self._pieces(x, per_member, backward=False):
            params = self._block_params(members, vec)
            outs = [self._forward(params, self._take(x, members, c, per_member), per_member, vec) for c in chunks]
            blocks.append(torch.cat(outs, dim=1))
        return torch.cat(blocks, dim=0)

    # ----- training --------------------------------------------------------------------
    def _block_loss_and_grad(self, params, x, y, chunks, per_member, members, vectorise, loss_kind="mse"):
        """Loss ``[m]`` and gradient of one block of members, summed over sample chunks.

        ``y`` is ``[B, n_out]`` (shared) or ``[M, B, n_out]`` (each member's own batch).
        """
        n = y.shape[-2]
        loss, grads = 0.0, None
        for c in chunks:
            xc = self._take(x, members, c, per_member)
            yc = y[members, c] if y.ndim == 3 else y[c]
            out, pullback = vjp(lambda p: self._forward(p, xc, per_member, vectorise), params)
            chunk_loss, dout = _loss_and_output_grad(out, yc, n, loss_kind)  # [m], d loss_j / d f_j
            loss = loss + chunk_loss
            (g,) = pullback(dout)
            grads = g if grads is None else {k: grads[k] + g[k] for k in grads}
        return loss.detach(), grads

    def loss_and_grad(
        self, x: torch.Tensor, y: torch.Tensor, per_member: bool = False, loss: str = "mse"
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Each member's loss (``[M]``) and its gradient (``[M, *shape]``); ``loss`` as in ``LOSSES``.

        ``y`` is ``[B, n_out]``, or ``[M, B, n_out]`` when each member has its own batch (then
        ``x`` is per member too).
        """
        losses, grads = [], []
        for members, chunks, vec in self._pieces(x, per_member, backward=True):
            params = self._block_params(members, vec)
            lo, g = self._block_loss_and_grad(params, x, y, chunks, per_member, members, vec, loss)
            losses.append(lo)
            grads.append(g if vec else {k: v.unsqueeze(0) for k, v in g.items()})
        return torch.cat(losses), {k: torch.cat([g[k] for g in grads]) for k in self.params}

    def gd_step(
        self, x: torch.Tensor, y: torch.Tensor, lr: float, per_member: bool = False, loss: str = "mse"
    ) -> torch.Tensor:
        """One gradient-descent step of every member on the batch given, in place; returns the losses before it (``[M]``).

        A full batch for GD, each member's minibatch for SGD (``y`` ``[M, B, n_out]``, ``x`` per member).
        """
        losses = []
        for members, chunks, vec in self._pieces(x, per_member, backward=True):
            params = self._block_params(members, vec)  # views: updated in place
            loss_, grads = self._block_loss_and_grad(params, x, y, chunks, per_member, members, vec, loss)
            with torch.no_grad():
                for k, p in params.items():
                    p.sub_(grads[k], alpha=lr)
            losses.append(loss_)
        return torch.cat(losses)

    @torch.no_grad()
    def descend(self, grads: dict[str, torch.Tensor], lr: float) -> None:
        """One gradient-descent step on every member with given gradients, in place."""
        for name, p in self.params.items():
            p.sub_(grads[name], alpha=lr)

    # ----- single members (tests, comparisons) ------------------------------------------
    def member(self, j: int) -> nn.Module:
        """An ordinary module holding member ``j``'s current parameters (a copy)."""
        module = copy.deepcopy(self.module)
        with torch.no_grad():
            for name, p in module.named_parameters():
                p.copy_(self.params[name][j])
        return module

    # ----- blocks and chunks ----------------------------------------------------------------
    def _plan(self, x: torch.Tensor, per_member: bool, backward: bool) -> tuple[int, int, bool]:
        """Members per block, samples per chunk, and whether blocks are vmapped, for the batch ``x``.

        On a GPU all members form one block: one kernel per layer fills the device. On a
        CPU, vmap pays only while a member's own work is too small to keep the cores busy:
        measured on 2 shared cores (benchmarks/ensemble_speed.py, batch 32-256), a width-64
        MLP, width-1..4 GCNNs at batch 32 and a width-4 CNN ran 2x to 5x faster as one vmap
        block than one member at a time, while width-512/1024 MLPs and group MLPs and
        width-4..64 GCNNs at batch 256 ran 1.2x to 7x slower (batched activations leave the
        caches; vmapped convolutions become grouped convolutions). Members whose
        activations exceed ``CPU_VMAP_MEMBER_BYTES`` therefore run one at a time through the
        plain forward. The choice depends on the model and the batch only, never on how many
        members the unit has, so a member takes the same path whichever unit trains it. Then
        samples are chunked so that a block stays within the memory budget.
        """
        shape = tuple(x.shape[2:] if per_member else x.shape[1:])
        n = x.shape[1] if per_member else x.shape[0]
        if shape not in self._elements_per_sample:
            self._elements_per_sample[shape] = _activation_elements(self.module, shape, self.dtype, self.device)
        per_sample = self._elements_per_sample[shape] * x.element_size()
        block, vectorise = self.members, True
        if self.device.type == "cpu":
            per_member = per_sample * n
            vectorise = per_member <= CPU_VMAP_MEMBER_BYTES
            block = min(self.members, max(1, CPU_BLOCK_BYTES // per_member)) if vectorise else 1
        # what autograd saves bounds a forward pass's live activations; a backward pass
        # holds those plus their gradients, and vmap may copy inputs once more
        factor = 3 if backward else 1
        chunk = min(n, max(1, self.memory_budget // (per_sample * factor * block)))
        return block, chunk, vectorise


# The losses a member can be trained on (docs/models.md, "Training"), each averaged over the batch.
LOSSES = ("mse", "cross_entropy")


def _loss_and_output_grad(out: torch.Tensor, y: torch.Tensor, n: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's share of the loss from a chunk (``[m]``) and its gradient with respect to the
    outputs ``out`` (``[m, b, n_out]``), for a batch of ``n`` samples in all; ``y`` is ``[b, n_out]``
    or ``[m, b, n_out]``.

    - ``mse``: ``(1/(2n)) sum_i ||f(x_i) - y_i||^2``; gradient ``(f - y) / n``.
    - ``cross_entropy``: ``(1/n) sum_i -log softmax(f(x_i))_{c_i}`` with ``c_i = argmax y_i``
      (the class of a one-hot or centred one-hot target); gradient ``(softmax(f) - onehot(c)) / n``.
    """
    if kind == "mse":
        residual = out - y
        return 0.5 * residual.square().sum(dim=(1, 2)) / n, residual / n
    if kind == "cross_entropy":
        onehot = torch.nn.functional.one_hot(y.argmax(dim=-1), out.shape[-1]).to(out.dtype)
        logp = torch.log_softmax(out, dim=-1)
        return -(logp * onehot).sum(dim=(1, 2)) / n, (logp.exp() - onehot) / n
    raise ValueError(f"loss: unknown loss {kind!r}; use one of {', '.join(LOSSES)}")


def _default_budget(device: torch.device) -> int:
    # from the device's total memory, not what is free now, so the chunks (and with them
    # the summation order) are the same in every run
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory * CUDA_MEMORY_FRACTION)
    return CPU_MEMORY_BUDGET


def _activation_elements(module: nn.Module, shape: tuple, dtype: torch.dtype, device: torch.device) -> int:
    """Elements autograd saves per sample in one forward pass (a memory estimate).

    Counted for batches of 1 and 2 samples; the difference leaves out what does not grow
    with the batch (the weights themselves).
    """

    def saved(batch: int) -> int:
        total = 0

        def pack(t):
            nonlocal total
            total += t.numel()
            return t

        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(torch.zeros((batch, *shape), dtype=dtype, device=device, requires_grad=True))
        return total

    return max(saved(2) - saved(1), int(torch.Size(shape).numel()))
