"""Finite layers in NTK parameterisation for the layer types of `study.architecture`
(``workers.models.BUILDERS`` picks one per plan entry).

Every weight and bias is a plain ``Parameter`` drawn N(0, 1) (``workers.models.init_parameters``);
a layer computes ``sigma_w / sqrt(fan_in) * (weights . inputs) + sigma_b * b``.
Forward passes are pure functions of parameters and buffers (no in-place updates, no
cached filters, no data-dependent branches), so ``torch.func.vmap`` over
``functional_call`` trains a whole ensemble at once.

Equivariant layers are escnn ``EquivariantModule`` s on escnn field types; their filters
are expanded from a ``study.bases.BlockBasis`` (``einsum`` or gather), then applied by one
``conv2d`` / ``linear`` with the group index folded into the channels.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from study.architecture import Affine
from study.bases import BlockBasis
from study.escnn_types import enn

from .pointwise import phi

__all__ = [
    "pad2d",
    "FilterExpansion",
    "NTKDense",
    "NTKConv2d",
    "BasisConv2d",
    "BasisLinear",
    "Pointwise",
    "Flatten",
    "GlobalAvgPool",
]


def _plain(x):
    return x.tensor if isinstance(x, enn.GeometricTensor) else x


def pad2d(x: torch.Tensor, k: int, padding: str) -> torch.Tensor:
    """Pad for a ``k x k`` cross-correlation (docs/models.md): ``(k-1)//2`` before, ``k//2`` after."""
    if padding == "valid":
        return x
    lo, hi = (k - 1) // 2, k // 2
    if padding == "circular":
        return F.pad(x, (lo, hi, lo, hi), mode="circular")
    if padding == "zero":
        return F.pad(x, (lo, hi, lo, hi))
    raise ValueError(f"padding: unknown {padding!r}; use circular, zero or valid")


def _normal_parameter(*shape: int) -> nn.Parameter:
    # filled by init_parameters; zeros until then so an uninitialised model is obvious
    return nn.Parameter(torch.zeros(*shape))


class FilterExpansion(nn.Module):
    """``theta [O, C, D]`` -> filter ``[O, |G|, C, E]`` (``E`` entries per input field) from a basis.

    Canonical bases (one element per entry) expand by a gather, escnn bases by one matmul
    with the basis as a dense ``[D, |G| E]`` matrix; both equal ``BlockBasis.filter``.
    (escnn's samples fill ~75% of the entries and form one block for C4/D4 3x3 filters, so
    the dense matmul beats a per-block einsum: forward + backward on one core, C4 group
    conv, width 64: 1.7 ms against 9.2 ms; D4 width 128: 124 ms against 318 ms. The
    canonical gather is cheaper still: D4 width 128, 47 ms.)
    """

    def __init__(self, basis: BlockBasis):
        super().__init__()
        self.dim = basis.dim
        self.order = basis.out_size
        # buffers hold the unscaled basis; the scale s multiplies the expanded filter
        self.scale = float(basis.scale)
        self.gather = basis.index is not None  # canonical: every entry is one coefficient or zero
        if self.gather:
            index = torch.tensor(basis.index.reshape(self.order, -1))  # a copy: the cached basis is read-only
            index = torch.where(index < 0, self.dim, index)  # zero entries read the padded zero
            self.register_buffer("index", index, persistent=False)
        else:
            # float64, so a float64 model keeps the symmetrised basis (study.bases._symmetrised)
            # exact; module.to(float32) rounds it for float32 models
            dense = torch.as_tensor(basis.tensor / basis.scale, dtype=torch.float64).reshape(self.dim, -1)
            self.register_buffer("dense", dense, persistent=False)

    def forward(self, theta: torch.Tensor) -> torch.Tensor:
        O, C, _ = theta.shape
        if self.gather:
            padded = F.pad(theta, (0, 1))  # coefficient D is the zero entry
            f = padded[:, :, self.index]  # [O, C, G, E]
            return self._scaled(f.transpose(1, 2))
        f = (theta.reshape(O * C, self.dim) @ self.dense.to(theta.dtype)).reshape(O, C, self.order, -1)
        return self._scaled(f.transpose(1, 2))

    def _scaled(self, f: torch.Tensor) -> torch.Tensor:
        return f if self.scale == 1.0 else f * self.scale


class NTKDense(nn.Module):
    """Dense ``in -> out`` on flat features; ``fan_in = in``."""

    def __init__(self, in_features: int, out_features: int, affine: Affine):
        super().__init__()
        self.weight = _normal_parameter(out_features, in_features)
        self.bias = _normal_parameter(out_features) if affine.bias else None
        self.w_scale = affine.sigma_w / math.sqrt(in_features)
        self.sigma_b = affine.sigma_b

    def forward(self, x):
        x = _plain(x)
        b = None if self.bias is None else self.sigma_b * self.bias
        return F.linear(x, self.w_scale * self.weight, b)


class NTKConv2d(nn.Module):
    """Plain ``k x k`` convolution ``in -> out`` (torch's cross-correlation).

    With per-tap variances ``v`` (``k x k``, ``study.spec.tap_variances``; 0 off the filter
    support) the filter is ``sigma_w / sqrt(in * sum(v)) * sqrt(v) * W`` with ``W`` N(0, 1): tap
    ``t`` has prior variance ``sigma_w^2 v_t / (in sum(v))``, and ``fan_in = in * sum(v)`` keeps
    the pre-activation variance that of the full uniform window, ``in k^2`` (docs/models.md).
    Masked taps are multiplied by 0, so their entries of ``W`` get zero gradient and the filter
    stays 0 there under training. ``v = None`` (or all ones) is the plain ``k x k`` layer, computed
    exactly as before the variances existed.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, padding: str, affine: Affine,
                 tap_variance=None):
        super().__init__()
        k = kernel_size
        self.weight = _normal_parameter(out_channels, in_channels, k, k)
        self.bias = _normal_parameter(out_channels) if affine.bias else None
        v = None if tap_variance is None else torch.as_tensor(tap_variance, dtype=torch.float64).reshape(k, k)
        if v is not None and bool((v == 1.0).all()):
            v = None  # the full uniform window: no per-tap factor at all, bit for bit the plain layer
        if v is None:
            self.w_scale = affine.sigma_w / math.sqrt(in_channels * k * k)
            self.tap_scale = None
        else:
            self.w_scale = affine.sigma_w / math.sqrt(in_channels * float(v.sum()))
            # float64 like FilterExpansion's basis; cast to the weights' dtype in forward
            self.register_buffer("tap_scale", v.sqrt(), persistent=False)
        self.sigma_b = affine.sigma_b
        self.kernel_size, self.padding = k, padding

    def filter(self) -> torch.Tensor:
        """The filter ``[out, in, k, k]`` the layer applies, ``w_scale`` included."""
        if self.tap_scale is None:
            return self.w_scale * self.weight
        return self.w_scale * (self.tap_scale.to(self.weight.dtype) * self.weight)

    def forward(self, x):
        x = pad2d(_plain(x), self.kernel_size, self.padding)
        b = None if self.bias is None else self.sigma_b * self.bias
        return F.conv2d(x, self.filter(), b)


class BasisConv2d(enn.EquivariantModule):
    """Lifting or group convolution on a grid whose filter is ``sum_j theta[o, c, j] basis[j]``.

    ``in_type``: ``C`` trivial fields (lift) or ``C`` regular fields (group conv);
    ``out_type``: ``O`` regular fields. One bias per output field, shared over the group.
    """

    def __init__(self, in_type, out_type, basis: BlockBasis, padding: str, affine: Affine):
        super().__init__()
        if not basis.spatial:
            raise ValueError(f"BasisConv2d needs a grid basis (lift/gconv), got {basis.layer}")
        self.in_type, self.out_type = in_type, out_type
        self.order = basis.out_size
        self.in_fields = in_type.size // basis.in_size
        self.out_fields = out_type.size // self.order
        self.kernel_size, self.padding = basis.kernel_size, padding
        self.expansion = FilterExpansion(basis)
        self.weight = _normal_parameter(self.out_fields, self.in_fields, basis.dim)
        self.bias = _normal_parameter(self.out_fields) if affine.bias else None
        self.fan_in = basis.fan_in(self.in_fields)
        self.w_scale = affine.sigma_w / math.sqrt(self.fan_in)
        self.sigma_b = affine.sigma_b

    def filter(self) -> torch.Tensor:
        """The torch filter ``[O |G|, C in_size, k, k]`` (channel ``o |G| + g``), unscaled."""
        k = self.kernel_size
        f = self.expansion(self.weight)
        return f.reshape(self.out_type.size, self.in_type.size, k, k)

    def forward(self, x: "enn.GeometricTensor") -> "enn.GeometricTensor":
        t = pad2d(x.tensor, self.kernel_size, self.padding)
        b = None if self.bias is None else (self.sigma_b * self.bias).repeat_interleave(self.order)
        out = F.conv2d(t, self.w_scale * self.filter(), b)
        return enn.GeometricTensor(out, self.out_type)

    def evaluate_output_shape(self, input_shape):
        shrink = self.kernel_size - 1 if self.padding == "valid" else 0
        return (input_shape[0], self.out_type.size, input_shape[2] - shrink, input_shape[3] - shrink)


class BasisLinear(enn.EquivariantModule):
    """No base space: a permuted vector (``glift``) or regular fields (``gdense``) -> regular fields."""

    def __init__(self, in_type, out_type, basis: BlockBasis, affine: Affine):
        super().__init__()
        if basis.spatial:
            raise ValueError(f"BasisLinear needs a basis without base space (glift/gdense), got {basis.layer}")
        self.in_type, self.out_type = in_type, out_type
        self.order = basis.out_size
        self.in_fields = in_type.size // basis.in_size
        self.out_fields = out_type.size // self.order
        self.expansion = FilterExpansion(basis)
        self.weight = _normal_parameter(self.out_fields, self.in_fields, basis.dim)
        self.bias = _normal_parameter(self.out_fields) if affine.bias else None
        self.fan_in = basis.fan_in(self.in_fields)
        self.w_scale = affine.sigma_w / math.sqrt(self.fan_in)
        self.sigma_b = affine.sigma_b

    def filter(self) -> torch.Tensor:
        """The matrix ``[O |G|, C in_size]`` (row ``o |G| + g``), unscaled."""
        return self.expansion(self.weight).reshape(self.out_type.size, self.in_type.size)

    def forward(self, x: "enn.GeometricTensor") -> "enn.GeometricTensor":
        b = None if self.bias is None else (self.sigma_b * self.bias).repeat_interleave(self.order)
        return enn.GeometricTensor(F.linear(x.tensor, self.w_scale * self.filter(), b), self.out_type)

    def evaluate_output_shape(self, input_shape):
        return (input_shape[0], self.out_type.size)


class Pointwise(nn.Module):
    """``phi`` on plain tensors (MLP, CNN); ``escnn_modules.PointwiseNonlin`` on fields."""

    def __init__(self, kind: str):
        super().__init__()
        phi(kind, torch.zeros(1))
        self.kind = kind

    def forward(self, x):
        return phi(self.kind, _plain(x))


class Flatten(nn.Module):
    """``[B, ...] -> [B, n]``, channel-major as ``torch.flatten``."""

    def forward(self, x):
        x = _plain(x)
        return x.reshape(x.shape[0], -1)


class GlobalAvgPool(nn.Module):
    """Mean over positions: ``[B, c, H, W] -> [B, c]``."""

    def forward(self, x):
        return _plain(x).mean(dim=(-2, -1))
