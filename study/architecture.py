"""The layer plan: a model spec turned into the list of layers it is made of.

This list is the single definition of an architecture. Two interpreters read it, each with
one entry per layer type in ``LAYER_TYPES``, registered beside its code:
``workers.models.BUILDERS`` (the finite torch layer) and ``analysis.stax.RULES`` (the kernel
rule), so the trained network and its analytic kernel cannot drift apart
(tests/test_layer_registry.py checks that both cover every type). docs/models.md gives the
mathematics of each entry.

Feature kinds flowing between layers (``workers.models.Network.kinds``):
- ``flat``: a vector (``[B, n]``)
- ``grid``: channels on a spatial grid (``[B, c, H, W]``; images enter as ``grid``)
- ``ring``: ring signals (``[B, c, m]``; inputs only, every plan flattens them first)
- ``group_grid``: regular fields on a grid (``[B, c * |G|, H, W]``, index ``c * |G| + g``)
- ``group``: regular fields, no base space (``[B, c * |G|]``)

The kernel rules hold the kernel of a batch of input pairs (leading axes ``..``: ``[B1, B2]``
for every x1 with every x2, ``[B]`` for x1[i] with x2[i]) in one of these storage forms
(``analysis.stax.Meta.form``, a word apart from the feature kinds):
- ``input`` / ``input_flat``: the raw inputs, as given or flattened (no kernel yet)
- ``flat``: the kernel of ``flat`` features, one number per pair
- ``positions``: of ``grid`` features, only the ``(p, p)`` entries, ``[.., H, W]`` (enough
  for a flatten readout)
- ``right_invariant``: of ``grid`` (``G = 1``) or ``group_grid`` features, ``[.., G, H, W, H, W]``
  holding ``K((e, p), (h, q))``; right invariance (docs/theory.md §3.2) gives the rest,
  ``K((g, p), (g', q)) = stored[g' g^-1, p, q]``
- ``full``: of ``group_grid`` features, ``K((a, p), (a', q))`` for every pair of elements,
  ``[.., G, H, W, G, H, W]`` (no right invariance)
- ``group``: of ``group`` features, ``K(a, a')``, ``[.., G, G]``

SO(3) models (``SO3_ARCHS``: ``so3_gcnn``, ``sphere_mlp``) are not planned layer by layer:
their features are Fourier coefficients on SO(3), and their layers and kernel share one
SOFT grid, one set of Wigner matrices and one ``kernel_mode`` chosen for the whole network
(docs/theory.md §7). ``workers.so3`` and ``analysis.kernel_so3`` build
them whole from ``study.spec.sphere_spec``, the one description both read.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional, Union, get_args

import numpy as np

from .spec import SO3_ARCHS, ModelSpec, check_model_input, tap_variances

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
    """Plain 2D convolution ``in_channels -> out``, ``k x k``.

    ``tap_variance``: the prior variance of each tap, ``k`` rows of ``k`` (``study.spec.tap_variances``;
    0 off the filter support); ``None`` is the full window with unit variances.
    """

    out: Union[int, str]
    kernel_size: int
    padding: Literal["circular", "zero", "valid"]
    affine: Affine
    tap_variance: Optional[tuple[tuple[float, ...], ...]] = None

    def variances(self) -> np.ndarray:
        """The ``k x k`` tap variances as a float64 array (all ones when ``tap_variance`` is None)."""
        if self.tap_variance is None:
            return np.ones((self.kernel_size, self.kernel_size))
        return np.array(self.tap_variance, dtype=np.float64)

    @property
    def uniform(self) -> bool:
        """Whether every tap of the full window has variance 1 (the plain convolution)."""
        return bool(np.all(self.variances() == 1.0))


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
LAYER_TYPES: tuple[type, ...] = get_args(Layer)


# ----- the hidden layers of each planned architecture (docs/models.md) ------------------------
def _mlp(spec: ModelSpec, input_shape, aff: Affine, phi: Nonlin) -> list[Layer]:
    layers: list[Layer] = [Flatten()]
    for _ in range(spec.depth):
        layers += [Dense(WIDTH, aff), phi]
    return layers


def _cnn(spec: ModelSpec, input_shape, aff: Affine, phi: Nonlin) -> list[Layer]:
    taps = tuple(tuple(float(v) for v in row) for row in tap_variances(spec))
    layers: list[Layer] = []
    for _ in range(spec.depth):
        layers += [Conv(WIDTH, spec.kernel_size, spec.padding, aff, taps), phi]
    return layers + [_spatial_readout(spec)]


def _gcnn(spec: ModelSpec, input_shape, aff: Affine, phi: Nonlin) -> list[Layer]:
    k, pad = spec.kernel_size, spec.padding
    layers: list[Layer] = [Lift(WIDTH, k, pad, spec.basis, aff), phi]
    for _ in range(spec.depth - 1):
        layers += [GroupConv(WIDTH, k, pad, spec.support, spec.basis, aff), phi]
    return layers + [GroupPool(), _spatial_readout(spec)]


def _group_mlp(spec: ModelSpec, input_shape, aff: Affine, phi: Nonlin) -> list[Layer]:
    domain = "image" if len(input_shape) == 3 else "ring"
    layers: list[Layer] = [Flatten(), GroupLift(WIDTH, domain, spec.basis, aff), phi]
    for _ in range(spec.depth - 1):
        layers += [GroupDense(WIDTH, spec.support, spec.basis, aff), phi]
    return layers + [GroupPool()]


def _spatial_readout(spec: ModelSpec) -> Layer:
    return GlobalAvgPool() if spec.readout == "gap" else Flatten()


_HIDDEN = {"mlp": _mlp, "cnn": _cnn, "gcnn": _gcnn, "group_mlp": _group_mlp}
PLANNED_ARCHS = tuple(_HIDDEN)  # with SO3_ARCHS, every value of ``ModelSpec.arch``


def layer_plan(spec: ModelSpec, input_shape: tuple[int, ...], n_out: int) -> list[Layer]:
    """The layers of ``spec`` for inputs of ``input_shape`` (no batch axis) and ``n_out`` outputs.

    Hidden layer sizes are the symbol ``WIDTH``; the readout has ``n_out`` outputs.
    """
    check_model_input(spec, tuple(input_shape))
    if spec.arch in SO3_ARCHS:  # built whole, see the module docstring
        raise ValueError(
            f"arch: {spec.arch} (model {spec.name}) has no layer plan; "
            "workers.so3 and analysis.kernel_so3 build it from study.spec.sphere_spec"
        )
    aff = Affine(spec.sigma_w, spec.sigma_b, spec.bias)
    layers = _HIDDEN[spec.arch](spec, tuple(input_shape), aff, Nonlin(spec.nonlinearity))
    readout = Affine(spec.readout_sigma_w or spec.sigma_w, spec.sigma_b, spec.bias)
    layers.append(Dense(n_out, readout))
    return layers
