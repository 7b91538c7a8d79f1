"""Finite networks built from the layer plan, and their N(0, 1) initialisation.

``build_model`` turns each entry of ``study.architecture.layer_plan`` into one layer of
``workers.layers`` through ``BUILDERS``, one builder per layer type (the plan is the single
definition of an architecture; nothing here re-reads the spec's architecture fields). SO(3)
models are the whole networks of ``workers.so3``. ``init_parameters`` draws every parameter
from N(0, 1) with a generator seeded by one integer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from study import architecture as arch
from study import escnn_types as et
from study.bases import domain_permutation, filter_basis
from study.groups import Group
from study.spec import ModelSpec, sphere_spec

from .escnn_modules import GroupMeanPool, PointwiseNonlin
from .layers import BasisConv2d, BasisLinear, Flatten, GlobalAvgPool, NTKConv2d, NTKDense, Pointwise
from .so3 import build_so3_model, build_sphere_mlp

__all__ = ["BUILDERS", "Features", "Network", "build_model", "build_sphere_model", "init_parameters"]


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

    @property
    def readout(self) -> nn.Module:
        """The last layer, linear in the features (negated in an antithetic pair's second member)."""
        return self.layers[-1]


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


@dataclass(frozen=True)
class Features:
    """The features between two layers: a feature kind of ``study.architecture`` and the
    shape without the batch axis (for ``group_grid`` and ``group`` the channels count fields)."""

    kind: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class BuildContext:
    """What a builder reads besides its plan entry and the incoming features."""

    group: Group
    input_shape: tuple[int, ...]
    width: int

    def size(self, n) -> int:
        return self.width if n == arch.WIDTH else int(n)


# One builder per layer type of the plan: ``(entry, features, context) -> (torch layer, features after it)``.
Builder = Callable[[arch.Layer, Features, BuildContext], tuple[nn.Module, Features]]
BUILDERS: dict[type, Builder] = {}


def builder(*layer_types: type):
    """Register the decorated function as the finite builder of ``layer_types``."""

    def register(fn: Builder) -> Builder:
        for t in layer_types:
            BUILDERS[t] = fn
        return fn

    return register


def build_model(spec: ModelSpec, width: int, input_shape: tuple, n_out: int) -> nn.Module:
    """The finite network of ``spec`` with hidden size ``width`` for inputs ``input_shape``:
    a ``Network`` built entry by entry from the layer plan, or for an SO(3) model the whole
    ``workers.so3`` network (``build_sphere_model``).

    Parameters are zero until ``init_parameters`` is called.
    """
    input_shape = tuple(int(s) for s in input_shape)
    if width < 1 or n_out < 1:
        raise ValueError(f"width and n_out must be positive, got width={width}, n_out={n_out}")
    if spec.so3:
        return build_sphere_model(spec, width, input_shape, n_out)
    plan = arch.layer_plan(spec, input_shape, n_out)
    context = BuildContext(spec.group_obj, input_shape, width)
    features = Features("grid" if len(input_shape) == 3 else "ring", input_shape)
    layers, kinds = [], []
    for entry in plan:
        layer, features = BUILDERS[type(entry)](entry, features, context)
        layers.append(layer)
        kinds.append(features.kind)
    if features.kind != "flat" or features.shape != (n_out,):
        raise ValueError(f"the plan ends in {features.kind} features of shape {features.shape}, expected flat ({n_out},)")
    return Network(layers, kinds, input_shape, n_out)


@builder(arch.Flatten)
def _flatten(entry: arch.Flatten, f: Features, c: BuildContext):
    fields = c.group.order if f.kind == "group" else 1
    return Flatten(), Features("flat", (_numel(f.shape) * fields,))


@builder(arch.Dense)
def _dense(entry: arch.Dense, f: Features, c: BuildContext):
    _expect(f, "flat", entry)
    out = c.size(entry.out)
    return NTKDense(f.shape[0], out, entry.affine), Features("flat", (out,))


@builder(arch.Conv)
def _conv(entry: arch.Conv, f: Features, c: BuildContext):
    _expect(f, "grid", entry)
    out = c.size(entry.out)
    layer = NTKConv2d(f.shape[0], out, entry.kernel_size, entry.padding, entry.affine, entry.tap_variance)
    return layer, Features("grid", (out, *_conv_hw(f.shape[1:], entry.kernel_size, entry.padding)))


@builder(arch.Lift, arch.GroupConv)
def _group_conv(entry, f: Features, c: BuildContext):
    lifting = isinstance(entry, arch.Lift)
    _expect(f, "grid" if lifting else "group_grid", entry)
    out = c.size(entry.out)
    support = "full" if lifting else entry.support
    basis = filter_basis(c.group, "lift" if lifting else "gconv", f.shape[0], entry.kernel_size, entry.basis, support)
    in_type = (et.trivial_type if lifting else et.regular_type)(c.group, f.shape[0])
    layer = BasisConv2d(in_type, et.regular_type(c.group, out), basis, entry.padding, entry.affine)
    return layer, Features("group_grid", (out, *_conv_hw(f.shape[1:], entry.kernel_size, entry.padding)))


@builder(arch.GroupLift)
def _group_lift(entry: arch.GroupLift, f: Features, c: BuildContext):
    _expect(f, "flat", entry)
    perm = domain_permutation(c.group, c.input_shape)
    if perm.shape[1] != f.shape[0]:
        raise ValueError(f"group lift: input has {f.shape[0]} entries, the group permutes {perm.shape[1]}")
    basis = filter_basis(c.group, "glift", 1, 0, entry.basis, "full", domain_perm=perm)
    out = c.size(entry.out)
    in_type = et.permutation_type(c.group, perm)
    layer = BasisLinear(in_type, et.regular_type(c.group, out, "none"), basis, entry.affine)
    return layer, Features("group", (out,))


@builder(arch.GroupDense)
def _group_dense(entry: arch.GroupDense, f: Features, c: BuildContext):
    _expect(f, "group", entry)
    out = c.size(entry.out)
    basis = filter_basis(c.group, "gdense", f.shape[0], 0, entry.basis, entry.support)
    in_type = et.regular_type(c.group, f.shape[0], "none")
    layer = BasisLinear(in_type, et.regular_type(c.group, out, "none"), basis, entry.affine)
    return layer, Features("group", (out,))


@builder(arch.Nonlin)
def _nonlin(entry: arch.Nonlin, f: Features, c: BuildContext):
    if f.kind in ("group_grid", "group"):
        return PointwiseNonlin(_regular_type(f, c), entry.kind), f
    return Pointwise(entry.kind), f


@builder(arch.GroupPool)
def _group_pool(entry: arch.GroupPool, f: Features, c: BuildContext):
    if f.kind not in ("group_grid", "group"):
        raise ValueError(f"group pooling needs regular fields, got {f.kind} features")
    return GroupMeanPool(_regular_type(f, c)), Features("grid" if f.kind == "group_grid" else "flat", f.shape)


@builder(arch.GlobalAvgPool)
def _global_avg_pool(entry: arch.GlobalAvgPool, f: Features, c: BuildContext):
    _expect(f, "grid", entry)
    return GlobalAvgPool(), Features("flat", (f.shape[0],))


def _regular_type(f: Features, c: BuildContext):
    """The escnn type of ``group_grid`` (on R2) or ``group`` (no base space) features."""
    return et.regular_type(c.group, f.shape[0], "R2" if f.kind == "group_grid" else "none")


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


def _expect(f: Features, wanted: str, entry) -> None:
    if f.kind != wanted:
        raise ValueError(f"{type(entry).__name__} needs {wanted} features, got {f.kind}")


# ----- SO(3) models (group SO3): built whole by workers.so3 (see study.architecture) ------------
def build_sphere_model(spec: ModelSpec, width: int, input_shape: tuple, n_out: int) -> nn.Module:
    """The finite ``so3_gcnn`` or ``sphere_mlp`` of ``spec`` (``workers.so3``), float64 until cast;
    its parameters are re-drawn by ``init_parameters`` (every one N(0, 1), as in ``workers.so3``).
    The construction's own draws use a fixed seed, so building leaves torch's global generator alone."""
    s = sphere_spec(spec, tuple(input_shape), n_out)
    build = build_so3_model if spec.arch == "so3_gcnn" else build_sphere_mlp
    return build(s, width, seed=0)
