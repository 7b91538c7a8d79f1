"""The layer plan: a model spec turned into the list of layers it is made of.

This list is the single definition of an architecture. The workers turn each entry into
a finite torch layer (`workers.models`), the analysis into its kernel rule
(`analysis.stax`), so the trained network and its analytic kernel cannot drift apart.
docs/models.md gives the mathematics of each entry.

Feature kinds flowing between layers:
- ``flat``: a vector (``[B, n]``)
- ``grid``: channels on a spatial grid (``[B, c, H, W]``)
- ``group_grid``: regular fields on a grid (``[B, c * |G|, H, W]``, index ``c * |G| + g``)
- ``group``: regular fields, no base space (``[B, c * |G|]``)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Union

from .spec import ModelSpec, check_model_input

WIDTH = "width"  # symbolic size: the kernel does not depend on it; workers substitute it


@dataclass(frozen=True)
class Affine:
    """Fields every weight layer carries: the NTK-parameterisation scales."""

    sigma_w: float
    sigma_b: float
    bias: bool


@dataclass(frozen=True)
class Dense:
    """Dense layer on flat features: ``in_features -> out``."""

    out: Union[int, str]
    affine: Affine


@dataclass(frozen=True)
class Conv:
    """Plain 2D convolution ``in_channels -> out``, ``k x k``."""

    out: Union[int, str]
    kernel_size: int
    padding: Literal["circular", "zero", "valid"]
    affine: Affine


@dataclass(frozen=True)
class Lift:
    """Lifting convolution: grid (trivial fields) -> group_grid (regular fields)."""

    out: Union[int, str]
    kernel_size: int
    padding: Literal["circular", "zero", "valid"]
    basis: Literal["canonical", "escnn"]
    affine: Affine


@dataclass(frozen=True)
class GroupConv:
    """Group convolution: group_grid -> group_grid with support ``identity`` or ``full``."""

    out: Union[int, str]
    kernel_size: int
    padding: Literal["circular", "zero", "valid"]
    support: Literal["identity", "full"]
    basis: Literal["canonical", "escnn"]
    affine: Affine


@dataclass(frozen=True)
class GroupLift:
    """No base space: a vector the group permutes (flat) -> regular fields (group)."""

    out: Union[int, str]
    domain: Literal["image", "ring"]
    basis: Literal["canonical", "escnn"]
    affine: Affine


@dataclass(frozen=True)
class GroupDense:
    """No base space: regular fields -> regular fields with support ``identity`` or ``full``."""

    out: Union[int, str]
    support: Literal["identity", "full"]
    basis: Literal["canonical", "escnn"]
    affine: Affine


@dataclass(frozen=True)
class Nonlin:
    kind: Literal["relu", "erf", "identity"]


@dataclass(frozen=True)
class GroupPool:
    """Mean over the group index: group_grid -> grid, or group -> flat."""


@dataclass(frozen=True)
class GlobalAvgPool:
    """Mean over positions: grid -> flat."""


@dataclass(frozen=True)
class Flatten:
    """grid -> flat (channel-major, as ``torch.flatten``)."""


Layer = Union[Dense, Conv, Lift, GroupConv, GroupLift, GroupDense, Nonlin, GroupPool, GlobalAvgPool, Flatten]


def layer_plan(spec: ModelSpec, input_shape: tuple[int, ...], n_out: int) -> list[Layer]:
    """The layers of ``spec`` for inputs of ``input_shape`` (no batch axis) and ``n_out`` outputs.

    Hidden layer sizes are the symbol ``WIDTH``; the readout has ``n_out`` outputs.
    """
    check_model_input(spec, tuple(input_shape))
    aff = Affine(spec.sigma_w, spec.sigma_b, spec.bias)
    phi = Nonlin(spec.nonlinearity)
    k, pad = spec.kernel_size, spec.padding
    layers: list[Layer] = []
    if spec.arch == "mlp":
        layers.append(Flatten())
        for _ in range(spec.depth):
            layers += [Dense(WIDTH, aff), phi]
    elif spec.arch == "cnn":
        for _ in range(spec.depth):
            layers += [Conv(WIDTH, k, pad, aff), phi]
        layers.append(GlobalAvgPool() if spec.readout == "gap" else Flatten())
    elif spec.arch == "gcnn":
        layers += [Lift(WIDTH, k, pad, spec.basis, aff), phi]
        for _ in range(spec.depth - 1):
            layers += [GroupConv(WIDTH, k, pad, spec.support, spec.basis, aff), phi]
        layers.append(GroupPool())
        layers.append(GlobalAvgPool() if spec.readout == "gap" else Flatten())
    elif spec.arch == "group_mlp":
        domain = "image" if len(input_shape) == 3 else "ring"
        layers += [Flatten(), GroupLift(WIDTH, domain, spec.basis, aff), phi]
        for _ in range(spec.depth - 1):
            layers += [GroupDense(WIDTH, spec.support, spec.basis, aff), phi]
        layers.append(GroupPool())
    else:  # pragma: no cover - the spec's Literal already rules this out
        raise ValueError(f"arch: unknown architecture {spec.arch!r}")
    readout = Affine(spec.readout_sigma_w or spec.sigma_w, spec.sigma_b, spec.bias)
    layers.append(Dense(n_out, readout))
    return layers
