"""Finite networks built from the layer plan, and their N(0, 1) initialisation.

``build_model`` turns each entry of ``study.architecture.layer_plan`` into one layer of
``workers.layers`` (the plan is the single definition of an architecture; nothing here
re-reads the spec's architecture fields). ``init_parameters`` draws every parameter from
N(0, 1) with a generator seeded by one integer.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from study import architecture as arch
from study import escnn_types as et
from study.bases import domain_permutation, filter_basis
from study.spec import ModelSpec, sphere_spec
from study.sphere import dh_grid

from .escnn_modules import GroupMeanPool, PointwiseNonlin
from .layers import BasisConv2d, BasisLinear, Flatten, GlobalAvgPool, NTKConv2d, NTKDense, Pointwise
from .so3 import SO3Net, SphereMLP, phi

__all__ = ["Network", "build_model", "build_sphere_model", "init_parameters"]


class Network(nn.Module):
    """A sequence of layers; escnn layers see ``GeometricTensor`` s, the others plain tensors.

    ``forward(x)``: ``x`` is ``[B, *input_shape]``; it is cast to the parameters' dtype
    (float32 unless the model was converted, e.g. ``.double()``); returns ``[B, n_out]``.
    ``kinds[i]`` is the feature kind after layer ``i`` (see ``study.architecture``).
    """

    def __init__(self, layers: list[nn.Module], kinds: list[str], input_shape: tuple, n_out: int):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.kinds = list(kinds)
        self.input_shape = tuple(input_shape)
        self.n_out = n_out

    def features(self, x: torch.Tensor, upto: int | None = None):
        """Output of layers ``[0, upto)`` (all by default), as a plain tensor."""
        h = x.to(self.layers[-1].weight.dtype)
        for layer in self.layers[:upto]:
            if isinstance(layer, et.enn.EquivariantModule):
                if not isinstance(h, et.enn.GeometricTensor):
                    h = et.enn.GeometricTensor(h, layer.in_type)
            elif isinstance(h, et.enn.GeometricTensor):
                h = h.tensor
            h = layer(h)
        return h.tensor if isinstance(h, et.enn.GeometricTensor) else h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def init_parameters(module: nn.Module, seed: int) -> nn.Module:
    """Draw every parameter of ``module`` from N(0, 1), in ``named_parameters`` order.

    The draws are made in float64 from ``torch.Generator().manual_seed(seed)`` and then cast,
    so a float32 and a float64 copy of a model get the same weights (up to rounding).
    Deterministic on CPU. Returns ``module``.
    """
    gen = torch.Generator().manual_seed(int(seed))
    with torch.no_grad():
        for _, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    return module


def build_model(spec: ModelSpec, width: int, input_shape: tuple, n_out: int) -> Network:
    """The finite network of ``spec`` with hidden size ``width`` for inputs ``input_shape``.

    Parameters are zero until ``init_parameters`` is called.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if width < 1 or n_out < 1:
        raise ValueError(f"width and n_out must be positive, got width={width}, n_out={n_out}")
    if spec.so3:
        return build_sphere_model(spec, width, input_shape, n_out)
    plan = arch.layer_plan(spec, input_shape, n_out)
    group = spec.group_obj

    def size(n):
        return width if n == arch.WIDTH else int(n)

    # current feature: kind and shape (no batch axis); channels count fields for group kinds
    if len(input_shape) == 3:
        kind, shape = "grid", input_shape
    else:
        kind, shape = "ring", input_shape
    layers, kinds = [], []
    for entry in plan:
        if isinstance(entry, arch.Flatten):
            layer = Flatten()
            kind, shape = "flat", (_numel(shape) * (group.order if kind == "group" else 1),)
        elif isinstance(entry, arch.Dense):
            _expect(kind, "flat", entry)
            out = size(entry.out)
            layer = NTKDense(shape[0], out, entry.affine)
            shape = (out,)
        elif isinstance(entry, arch.Conv):
            _expect(kind, "grid", entry)
            out = size(entry.out)
            layer = NTKConv2d(shape[0], out, entry.kernel_size, entry.padding, entry.affine)
            shape = (out, *_conv_hw(shape[1:], entry.kernel_size, entry.padding))
        elif isinstance(entry, (arch.Lift, arch.GroupConv)):
            lifting = isinstance(entry, arch.Lift)
            _expect(kind, "grid" if lifting else "group_grid", entry)
            out = size(entry.out)
            support = "full" if lifting else entry.support
            basis = filter_basis(group, "lift" if lifting else "gconv", shape[0], entry.kernel_size, entry.basis, support)
            in_type = (et.trivial_type if lifting else et.regular_type)(group, shape[0])
            layer = BasisConv2d(in_type, et.regular_type(group, out), basis, entry.padding, entry.affine)
            kind, shape = "group_grid", (out, *_conv_hw(shape[1:], entry.kernel_size, entry.padding))
        elif isinstance(entry, arch.GroupLift):
            _expect(kind, "flat", entry)
            perm = domain_permutation(group, input_shape)
            if perm.shape[1] != shape[0]:
                raise ValueError(f"group lift: input has {shape[0]} entries, the group permutes {perm.shape[1]}")
            basis = filter_basis(group, "glift", 1, 0, entry.basis, "full", domain_perm=perm)
            out = size(entry.out)
            layer = BasisLinear(et.permutation_type(group, perm), et.regular_type(group, out, "none"), basis, entry.affine)
            kind, shape = "group", (out,)
        elif isinstance(entry, arch.GroupDense):
            _expect(kind, "group", entry)
            out = size(entry.out)
            basis = filter_basis(group, "gdense", shape[0], 0, entry.basis, entry.support)
            in_type = et.regular_type(group, shape[0], "none")
            layer = BasisLinear(in_type, et.regular_type(group, out, "none"), basis, entry.affine)
            shape = (out,)
        elif isinstance(entry, arch.Nonlin):
            if kind in ("group_grid", "group"):
                base = "R2" if kind == "group_grid" else "none"
                layer = PointwiseNonlin(et.regular_type(group, shape[0], base), entry.kind)
            else:
                layer = Pointwise(entry.kind)
        elif isinstance(entry, arch.GroupPool):
            if kind not in ("group_grid", "group"):
                raise ValueError(f"group pooling needs regular fields, got {kind} features")
            base = "R2" if kind == "group_grid" else "none"
            layer = GroupMeanPool(et.regular_type(group, shape[0], base))
            kind = "grid" if kind == "group_grid" else "flat"
        elif isinstance(entry, arch.GlobalAvgPool):
            _expect(kind, "grid", entry)
            layer = GlobalAvgPool()
            kind, shape = "flat", (shape[0],)
        else:  # pragma: no cover - layer_plan only emits the kinds above
            raise ValueError(f"no finite layer for plan entry {entry!r}")
        layers.append(layer)
        kinds.append(kind)
    if kind != "flat" or shape != (n_out,):
        raise ValueError(f"the plan ends in {kind} features of shape {shape}, expected flat ({n_out},)")
    return Network(layers, kinds, input_shape, n_out)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _conv_hw(hw, k: int, padding: str) -> tuple[int, int]:
    if padding == "valid":
        h, w = hw[0] - k + 1, hw[1] - k + 1
        if h < 1 or w < 1:
            raise ValueError(f"kernel_size: valid convolutions shrink the {hw[0]}x{hw[1]} grid to nothing; use fewer layers or padding")
        return h, w
    return tuple(hw)


def _expect(kind: str, wanted: str, entry) -> None:
    if kind != wanted:
        raise ValueError(f"{type(entry).__name__} needs {wanted} features, got {kind}")


# ----- SO(3) models (group SO3): workers.so3, from the spec's study.spec.sphere_spec --------------
class StudySphereMLP(nn.Module):
    """``workers.so3.SphereMLP`` with its input weights ``sqrt(n_pix w)`` as a buffer, so the
    forward is a pure function of parameters and input (``functional_call``/``vmap``, any device)."""

    def __init__(self, spec, width: int):
        super().__init__()

        self.net = SphereMLP(spec, width, torch.Generator().manual_seed(0), torch.float64)
        g = dh_grid(spec.L_in)
        self.register_buffer("scale", torch.as_tensor(np.sqrt(g.weights * g.weights.size)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = (x.to(self.scale.dtype) * self.scale).flatten(-3)  # [B, C 4L^2], as so3.sphere_mlp_inputs
        for layer in self.net.hidden:
            h = phi_(self.net.spec.nonlin, layer(h))
        return self.net.readout(h)


class StudySO3Net(nn.Module):
    """``workers.so3.SO3Net`` casting its input to the parameters' dtype (like ``Network``)."""

    def __init__(self, spec, width: int):
        super().__init__()

        self.net = SO3Net(spec, width, torch.Generator().manual_seed(0), torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.to(self.net.readout.weight.dtype))


def phi_(kind: str, x: torch.Tensor) -> torch.Tensor:
    return phi(kind, x)


def build_sphere_model(spec: ModelSpec, width: int, input_shape: tuple, n_out: int) -> nn.Module:
    """The finite ``so3_gcnn`` or ``sphere_mlp`` of ``spec`` (``workers.so3``), float64 until cast;
    its parameters are re-drawn by ``init_parameters`` (every one N(0, 1), as in ``workers.so3``)."""
    s = sphere_spec(spec, tuple(input_shape), n_out)
    return StudySO3Net(s, width) if spec.arch == "so3_gcnn" else StudySphereMLP(s, width)
