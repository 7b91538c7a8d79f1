"""The model spec: one description of a network that the study file, the workers (finite
models) and the analysis (analytic kernels) all read. docs/models.md defines each
architecture exactly; this module only says which fields exist and which combinations
are meaningful.
"""

from __future__ import annotations

from typing import Literal, Optional, Union, get_args

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from .groups import SO3_NAME, group_name, parse_group
from .sphere import SO3Spec, SphereMLPSpec

Arch = Literal["mlp", "cnn", "gcnn", "group_mlp", "so3_gcnn", "sphere_mlp"]
Padding = Literal["circular", "zero", "valid"]
Nonlinearity = Literal["relu", "erf", "identity"]
Readout = Literal["gap", "flatten"]
Support = Literal["identity", "full"]
Basis = Literal["canonical", "escnn"]
Augmentation = Literal["none", "full_orbit", "random"]
Loss = Literal["mse", "cross_entropy"]
Optimizer = Literal["gd", "sgd"]
Pairing = Literal["independent", "antithetic"]
KernelMode = Literal["grid", "relative"]
# CNN filters (docs/models.md, "cnn"): which taps of the k x k window exist, and the prior
# variance of each; a list of taps or a k x k variance array may be given instead of a name.
SupportMask = Literal["full", "plus", "cross_corner"]
TapVariance = Literal["uniform", "ramp"]
SO3_ARCHS = ("so3_gcnn", "sphere_mlp")
# Equivariant by construction (so augmentation is refused); GROUP_ARCHS of them are built
# from group layers with a filter ``support`` and ``basis`` (docs/models.md).
EQUIVARIANT_ARCHS = ("gcnn", "group_mlp", "so3_gcnn")
GROUP_ARCHS = ("gcnn", "group_mlp")

# Training fields and their defaults. At their defaults they are left out of the spec's dump
# (``ModelSpec._dump``), so unit ids, resolved studies and cache keys of studies written
# before these fields existed stay the same.
TRAINING_DEFAULTS = {"loss": "mse", "optimizer": "gd", "batch_size": None, "pairing": "independent"}
# SO(3) fields (docs/models.md, "so3_gcnn" and "sphere_mlp"): unset (None) for every other
# model and then left out of the dump too, for the same reason.
SO3_DEFAULTS = {"bands": None, "so3_grid": None, "kernel_mode": None, "rotations": None}
# CNN filter fields (docs/models.md, "cnn"): left out of the dump at their defaults, for the
# same reason, so every CNN written before they existed keeps its unit ids.
CNN_DEFAULTS = {"filter_support": "full", "tap_variance": "uniform"}


class ModelSpec(BaseModel):
    """A network family in NTK parameterisation; the width is not part of it.

    - ``depth``: number of hidden layers (each followed by the nonlinearity), then a
      linear readout to the outputs.
    - ``group``: the symmetry group. It defines the GCNN layers, the augmentation orbit,
      and the orbits on which eval inputs are logged. For ``mlp`` and ``cnn`` with
      ``augmentation: none`` it only sets the eval orbits.
    - ``support`` and ``basis`` apply to ``GROUP_ARCHS`` (``gcnn``, ``group_mlp``) only;
      ``filter_support`` and ``tap_variance`` to ``cnn`` only (``tap_variances``).
    - ``loss``, ``optimizer``, ``batch_size``: how the members are trained (docs/models.md,
      "Training"). Only full-batch GD on the MSE (the defaults) has an analytic counterpart.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    arch: Arch
    group: str = "C4"
    depth: int = Field(2, ge=1)
    kernel_size: int = Field(3, ge=1)
    padding: Padding = "circular"
    nonlinearity: Nonlinearity = "relu"
    readout: Readout = "gap"
    support: Support = "full"
    basis: Basis = "canonical"
    augmentation: Augmentation = "none"
    sigma_w: float = Field(1.0, gt=0)
    sigma_b: float = Field(0.0, ge=0)
    bias: bool = True
    # The readout's weight scale (default: sigma_w). A small readout scale shrinks the
    # random initial function (the ensemble's spread) relative to what training fits.
    readout_sigma_w: Optional[float] = Field(None, gt=0)
    # Training: mse | cross_entropy (softmax over the outputs, class = argmax of the target);
    # gd (full batch) | sgd (each member draws batch_size distinct samples per step).
    loss: Loss = "mse"
    optimizer: Optimizer = "gd"
    batch_size: Optional[int] = Field(None, ge=1, validate_default=True)
    # How the ensemble's members are drawn: independently, or in antithetic pairs that share
    # every parameter but the readout, which the second member takes negated (and share their
    # augmentation and minibatch draws). Each member keeps its law, so the ensemble mean is
    # unbiased; a pair's initial functions cancel, leaving the finite-width spread alone
    # (docs/theory.md §5).
    pairing: Pairing = "independent"
    # SO(3) (group: SO3; docs/models.md): band limit per hidden layer of so3_gcnn (lifting,
    # then each group convolution), the SOFT grid bandwidth B of its nonlinearities, the
    # kernel mode of its analytic kernel (grid, the default, or relative), and for every
    # SO3 model the number K of seeded rotations its eval inputs are logged on (default 8).
    bands: Optional[tuple[int, ...]] = None
    so3_grid: Optional[int] = Field(None, ge=1)
    kernel_mode: Optional[KernelMode] = None
    rotations: Optional[int] = Field(None, ge=1)
    # CNN filters (arch cnn only; docs/models.md): the taps of the k x k window that exist
    # (full, plus, cross_corner, or a list of [row, col] taps) and their prior variances
    # (uniform, ramp, or a k x k array); ``tap_variances`` turns both into one array.
    filter_support: Union[SupportMask, tuple[tuple[int, int], ...]] = "full"
    tap_variance: Union[TapVariance, tuple[tuple[float, ...], ...]] = "uniform"

    @field_validator("filter_support", mode="before")
    @classmethod
    def _support_form(cls, v):
        if isinstance(v, str):
            if v not in get_args(SupportMask):
                raise ValueError(f"{v!r} is not supported; use full, plus, cross_corner or a list of [row, col] taps")
            return v
        try:
            taps = tuple((int(r), int(c)) for r, c in v)
        except (TypeError, ValueError):
            raise ValueError(f"{v!r} is neither a mask name nor a list of [row, col] taps; "
                             "use full, plus, cross_corner or e.g. [[0, 1], [1, 1]]") from None
        if not taps or len(set(taps)) != len(taps):
            raise ValueError(f"{[list(t) for t in taps]} must list distinct [row, col] taps, at least one")
        return taps

    @field_validator("tap_variance", mode="before")
    @classmethod
    def _variance_form(cls, v):
        if isinstance(v, str):
            if v not in get_args(TapVariance):
                raise ValueError(f"{v!r} is not supported; use uniform, ramp or a k x k list of variances")
            return v
        try:
            rows = tuple(tuple(float(a) for a in row) for row in v)
        except (TypeError, ValueError):
            raise ValueError(f"{v!r} is neither uniform, ramp nor a k x k list of variances") from None
        if any(not np.isfinite(a) or a < 0 for row in rows for a in row):
            raise ValueError(f"{[list(r) for r in rows]} must hold finite variances >= 0")
        return rows

    @field_validator("group")
    @classmethod
    def _group_parses(cls, v: str) -> str:
        return group_name(v)

    @field_validator("bands")
    @classmethod
    def _bands(cls, v):
        if v is not None and (not v or min(v) < 1):
            raise ValueError(f"{list(v)} must be one band limit >= 1 per hidden layer, e.g. bands: [2, 2]")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch_for_sgd(cls, v: Optional[int], info) -> Optional[int]:
        optimizer, name = info.data.get("optimizer"), info.data.get("name")
        if optimizer == "sgd" and v is None:
            raise ValueError(f"model {name} uses optimizer: sgd and needs a minibatch size; add batch_size: <n>")
        if optimizer == "gd" and v is not None:
            raise ValueError(f"model {name} trains full-batch (optimizer: gd); remove batch_size or set optimizer: sgd")
        return v

    @model_validator(mode="after")
    def _combinations(self) -> "ModelSpec":
        self._so3_combinations()
        if self.equivariant and self.augmentation != "none":
            raise ValueError(
                f"augmentation: model {self.name} is already equivariant ({self.arch}); use augmentation: none"
            )
        if self.arch == "gcnn" and self.kernel_size % 2 == 0:
            raise ValueError(
                f"kernel_size: GCNN {self.name} needs an odd kernel so rotations map the filter onto itself"
            )
        if self.arch in GROUP_ARCHS and self.basis == "escnn" and self.support != "full":
            raise ValueError(
                f"support: escnn's own basis spans full-support filters only; use support: full for {self.name}"
            )
        self._filter_combinations()
        return self

    def _filter_combinations(self) -> None:
        name, k = self.name, self.kernel_size
        for f, default in CNN_DEFAULTS.items():
            if self.arch != "cnn" and getattr(self, f) != default:
                raise ValueError(f"{f}: only arch cnn has it; remove it from model {name} or use arch: cnn")
        support = self.filter_support
        if support == "plus" and k % 2 == 0:
            raise ValueError(f"filter_support: plus needs an odd kernel_size (a centre tap), model {name} has {k}")
        if support == "cross_corner" and k != 3:
            raise ValueError(f"filter_support: cross_corner is a 3x3 mask, model {name} has kernel_size {k}; "
                             "use kernel_size: 3 or a list of [row, col] taps")
        if isinstance(support, tuple):
            bad = [list(t) for t in support if not (0 <= t[0] < k and 0 <= t[1] < k)]
            if bad:
                raise ValueError(f"filter_support: taps {bad} of model {name} lie outside the {k}x{k} window; "
                                 f"use rows and columns 0..{k - 1}")
        variance = self.tap_variance
        if isinstance(variance, tuple) and (len(variance) != k or any(len(r) != k for r in variance)):
            raise ValueError(f"tap_variance: model {name} needs a {k}x{k} list of variances (kernel_size {k}), "
                             f"got {len(variance)} rows of lengths {[len(r) for r in variance]}")
        if self.arch == "cnn" and not tap_variances(self).any():
            raise ValueError(f"tap_variance: every tap of the filter_support of model {name} has variance 0; "
                             "give some tap of the support a positive variance")

    def _so3_combinations(self) -> None:
        so3, name = self.group == SO3_NAME, self.name
        if so3 and self.arch not in SO3_ARCHS:
            raise ValueError(
                f"arch: {self.arch} acts on pixel grids and rings, not with group SO3 (model {name}); "
                "use arch: so3_gcnn or sphere_mlp"
            )
        if self.arch in SO3_ARCHS and not so3:
            raise ValueError(f"group: arch {self.arch} (model {name}) works on the sphere; set group: SO3")
        if not so3 and self.rotations is not None:
            raise ValueError(f"rotations: only group SO3 logs a sample of rotations; remove it from model {name}")
        if so3 and self.augmentation == "full_orbit":
            raise ValueError(
                f"augmentation: full_orbit needs a finite orbit and SO3 has none (model {name}); use augmentation: random"
            )
        if self.arch != "so3_gcnn":
            for f in ("bands", "so3_grid", "kernel_mode"):
                if getattr(self, f) is not None:
                    raise ValueError(f"{f}: only arch so3_gcnn has it; remove it from model {name}")
            return
        if self.bands is None:
            raise ValueError(
                f"bands: SO(3) GCNN {name} needs one band limit per hidden layer (depth {self.depth}); "
                f"add e.g. bands: {[2] * self.depth}"
            )
        if len(self.bands) != self.depth:
            raise ValueError(
                f"bands: {list(self.bands)} gives {len(self.bands)} band limits but depth is {self.depth} "
                f"(model {name}); give one per hidden layer or set depth: {len(self.bands)}"
            )
        if self.so3_grid is None:
            raise ValueError(
                f"so3_grid: SO(3) GCNN {name} needs the SOFT grid bandwidth B of its nonlinearities; "
                f"add so3_grid: {max(self.bands) + 1} (at least max(bands) = {max(self.bands)})"
            )
        if self.so3_grid < max(self.bands):
            raise ValueError(
                f"so3_grid: {self.so3_grid} is below the largest band limit {max(self.bands)} of model {name}; "
                f"use so3_grid >= {max(self.bands)}"
            )

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        out = handler(self)
        for k, default in SO3_DEFAULTS.items():
            if k in out and out[k] == default:
                del out[k]
        for k, default in TRAINING_DEFAULTS.items():
            if k in out and out[k] == default:
                del out[k]
        for k, default in CNN_DEFAULTS.items():
            if k in out and out[k] == default:
                del out[k]
        return out

    @property
    def analytic(self) -> bool:
        """Whether the NTK theory describes this training: full-batch GD on the MSE."""
        return self.loss == "mse" and self.optimizer == "gd"

    @property
    def training(self) -> tuple:
        """``(loss, optimizer, batch_size)``: two models compare like for like only when these agree."""
        return (self.loss, self.optimizer, self.batch_size)

    @property
    def group_obj(self):
        """The group: a ``Group`` (``C<n>``, ``D<n>``), or for SO3 an ``SO3Group`` whose
        ``order`` is the number of logged rotations."""
        return parse_group(self.group, self.rotations)

    @property
    def equivariant(self) -> bool:
        """Whether the model is equivariant by construction (``EQUIVARIANT_ARCHS``)."""
        return self.arch in EQUIVARIANT_ARCHS

    @property
    def so3(self) -> bool:
        """Whether the model works on signals on the sphere under SO(3) (``so3_gcnn``, ``sphere_mlp``)."""
        return self.arch in SO3_ARCHS

    @property
    def spatial(self) -> bool:
        """Whether the model convolves over a spatial grid (CNN, GCNN)."""
        return self.arch in ("cnn", "gcnn")


def support_mask(spec: ModelSpec) -> np.ndarray:
    """The ``k x k`` boolean mask of the filter taps that exist (``filter_support``).

    Tap ``(a, b)`` is offset ``(a - lo, b - lo)`` (docs/theory.md §1). ``plus``: the centre row
    and column (for ``k = 3`` the centre and its 4 edge neighbours), closed under D4;
    ``cross_corner``: the 4 edge neighbours and the corner ``(0, 0)``, no centre, closed under
    no rotation.
    """
    k = spec.kernel_size
    support = spec.filter_support
    mask = np.zeros((k, k), dtype=bool)
    if support == "full":
        mask[:] = True
    elif support == "plus":
        mask[k // 2, :] = mask[:, k // 2] = True
    elif support == "cross_corner":
        mask[[0, 1, 1, 2], [1, 0, 2, 1]] = True
        mask[0, 0] = True
    else:
        rows, cols = zip(*support)
        mask[list(rows), list(cols)] = True
    return mask


def tap_variances(spec: ModelSpec) -> np.ndarray:
    """The ``k x k`` prior variance of each filter tap of a ``cnn`` (float64; 0 off the support).

    The one definition the finite layer (``workers.layers.NTKConv2d``) and the kernel rule
    (``analysis.stax.ConvRule``) both read, through the layer plan's ``Conv`` entry. The
    variances are normalised to mean 1 over the support's taps (their overall scale cancels
    against ``fan_in = in_channels x sum of variances`` anyway, docs/models.md), so ``full``
    with ``uniform`` is exactly the all-ones array. ``ramp``: variance proportional to
    ``1 + row`` (growing down the window, constant along rows), not invariant under any
    rotation; an explicit array gives relative variances.
    """
    k = spec.kernel_size
    mask = support_mask(spec)
    variance = spec.tap_variance
    if variance == "uniform":
        raw = np.ones((k, k))
    elif variance == "ramp":
        raw = np.repeat(np.arange(1.0, k + 1.0)[:, None], k, axis=1)
    else:
        raw = np.array(variance, dtype=np.float64).reshape(k, k)
    raw = np.where(mask, raw, 0.0)
    total = raw.sum()
    if total == 0:
        return raw
    if variance == "uniform":  # exact ones on the support: full + uniform is today's filter bit for bit
        return raw
    return raw * (mask.sum() / total)


def kernel_jointly_invariant(spec: ModelSpec) -> bool:
    """Whether the model's NNGP/NTK satisfy ``K(L_g x, L_g x') = K(x, x')`` for its group by
    construction: every architecture but a ``cnn`` whose tap variances are not invariant under
    the group's action on the filter window (the sufficient condition of docs/theory.md §3.4).
    The orbit-averaged kernel is an augmented model's mean kernel only when this holds (§6)."""
    if spec.arch != "cnn":
        return True
    v = tap_variances(spec)
    g = spec.group_obj
    if not g.acts_exactly_on_grid():
        return bool(np.all(v == v.flat[0]))
    return all(np.array_equal(g.act_image(v[None], h)[0], v) for h in range(g.order))


def check_model_input(spec: ModelSpec, shape: tuple[int, ...], n_train: Optional[int] = None) -> None:
    """Raise ValueError naming the field when inputs of ``shape`` (no batch axis) do not fit.

    Images are ``(C, H, W)``, ring signals ``(C, m)``. With ``n_train`` (the number of
    training samples) an SGD ``batch_size`` is checked against the set it samples from.
    """
    g = spec.group_obj
    if spec.so3:
        _check_sphere_input(spec, shape)
    if n_train is not None and spec.batch_size is not None:
        pool = n_train * (g.order if spec.augmentation == "full_orbit" else 1)
        if spec.batch_size > pool:
            what = f"{n_train} x {g.order} = {pool} augmented samples" if pool != n_train else f"{n_train} training samples"
            raise ValueError(
                f"batch_size: {spec.batch_size} is larger than the {what} of model {spec.name}; use at most {pool}"
            )
    if spec.so3:
        return
    if len(shape) == 3:
        c, h, w = shape
        if spec.spatial and spec.kernel_size > min(h, w):
            raise ValueError(
                f"kernel_size: {spec.kernel_size} is larger than the {h}x{w} images of model {spec.name}; "
                f"use at most {min(h, w)}"
            )
        exact = g.acts_exactly_on_grid() and (h == w or g.order == 1)
        needs_exact = spec.augmentation != "none" or (spec.equivariant and spec.basis == "canonical")
        if spec.arch == "group_mlp" and not exact:
            raise ValueError(
                f"group: {g.name} does not permute the pixels of {h}x{w} images (model {spec.name}); "
                "use C1, C2, C4, D1, D2 or D4 on square images, or ring signals"
            )
        if needs_exact and not exact:
            what = "basis: canonical" if spec.equivariant else f"augmentation: {spec.augmentation}"
            raise ValueError(
                f"{what.split(':')[0]}: {what} needs a group that acts exactly on the {h}x{w} grid, "
                f"and {g.name} does not (model {spec.name}); use C1, C2, C4, D1, D2 or D4 on square images"
                + (", or basis: escnn" if spec.equivariant else "")
            )
    elif len(shape) == 2:
        c, m = shape
        if spec.spatial:
            raise ValueError(
                f"arch: {spec.arch} needs images (C, H, W), but the data are ring signals (C, m); "
                "use mlp or group_mlp"
            )
        if (spec.equivariant or spec.augmentation != "none") and not g.acts_exactly_on_ring(m):
            raise ValueError(
                f"group: {g.name} does not act on a ring of {m} points (model {spec.name}); n must divide {m}"
            )
    else:
        raise ValueError(f"data: inputs must be images (C, H, W) or ring signals (C, m), got shape {shape}")


def _check_sphere_input(spec: ModelSpec, shape: tuple[int, ...]) -> None:
    """SO(3) models read signals on the DH grid of bandwidth ``L``: ``(C, 2L, 2L)``, ``L >=`` every band limit."""
    if len(shape) != 3 or shape[1] != shape[2] or shape[1] % 2:
        raise ValueError(
            f"arch: {spec.arch} (model {spec.name}) needs signals on a DH grid (C, 2L, 2L), got shape {tuple(shape)}; "
            "use the sources spherical_digits, sphere_noise, sphere_photos"
        )
    L = shape[1] // 2
    if spec.arch == "so3_gcnn" and max(spec.bands) > L:
        raise ValueError(
            f"bands: band limit {max(spec.bands)} of model {spec.name} exceeds the input bandwidth L = {L} "
            f"(a {2 * L}x{2 * L} DH grid); use band limits <= {L} or a larger L in the data source"
        )


def sphere_spec(spec: ModelSpec, input_shape: tuple[int, ...], n_out: int):
    """The ``study.sphere.SO3Spec`` / ``SphereMLPSpec`` of an SO(3) model for inputs ``(C, 2L, 2L)``
    and ``n_out`` outputs: the one definition the finite model (``workers.models``) and the
    analytic kernel (``analysis.kernels``) both read. ``bias: false`` means ``sigma_b = 0``
    (the bias parameters then exist with zero gradient); ``readout_sigma_w`` defaults to ``sigma_w``."""
    if not spec.so3:
        raise ValueError(f"arch: {spec.arch} is not an SO(3) model (so3_gcnn, sphere_mlp)")
    check_model_input(spec, tuple(input_shape))
    c, L = int(input_shape[0]), int(input_shape[1]) // 2
    common = dict(channels=c, L_in=L, nonlin=spec.nonlinearity, sigma_w=spec.sigma_w,
                  sigma_b=spec.sigma_b if spec.bias else 0.0,
                  readout_sigma_w=spec.readout_sigma_w or spec.sigma_w, outputs=int(n_out))
    if spec.arch == "so3_gcnn":
        return SO3Spec(bands=tuple(spec.bands), B=spec.so3_grid, **common)
    return SphereMLPSpec(depth=spec.depth, **common)
