"""Filter bases of the equivariant layers: the one source for finite layers and kernels.

A layer's filter between one input field and one output regular field is
``sum_j theta_j * tensor[j]`` with ``theta_j ~ N(0, 1)``; a layer with several fields draws an
independent ``theta[o, c, :]`` per (output field, input field) pair, and computes
``sigma_w / sqrt(fan_in) * conv(filter, x) + sigma_b * b`` (docs/models.md).

- ``canonical``: the orthogonal basis of docs/models.md. Each basis element is a one-hot
  orbit pattern: the weight ``W[s, delta]`` placed at every filter entry it feeds
  (``F[g, h, delta'] = W[g^-1 h, R_g^-1 delta']``). Scale 1. Built from ``study.groups``
  permutations, so only groups that act exactly on the grid are allowed.
- ``escnn``: escnn's own sampled basis ``B_j`` (``R2Conv``'s default, or ``nn.Linear`` on
  ``no_base_space``), read out of escnn by expanding unit coefficient vectors, projected
  onto exactly equivariant filters in float64 where the group permutes the grid (escnn
  samples in float32; ``_symmetrised``), times the
  scale ``s`` with ``s^2 = out * in * k^2 / sum_j ||B_j||^2`` (mean prior variance of a
  filter entry 1, as for the canonical full-support layer).

Layers: ``lift`` (trivial field on a grid -> regular), ``gconv`` (regular -> regular on a
grid), ``glift`` (a vector the group permutes by ``domain_perm`` -> regular, no base space),
``gdense`` (regular -> regular, no base space).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, Optional

import numpy as np
import torch

from .groups import Group

LayerKind = Literal["lift", "gconv", "glift", "gdense"]
BasisKind = Literal["canonical", "escnn"]
SupportKind = Literal["identity", "full"]

__all__ = ["BlockBasis", "filter_basis", "domain_permutation"]


@dataclass(frozen=True, eq=False)
class BlockBasis:
    """The basis of one (input field -> output regular field) block.

    ``tensor``: float64, ``[D, |G|, in_size, k, k]`` for grid layers, ``[D, |G|, in_size]``
    without base space; already multiplied by ``scale``.
    ``index`` (canonical only): same shape as one basis element, the ``j`` whose one-hot
    pattern covers each filter entry, ``-1`` where every element is zero; the finite layers
    expand canonical filters by this gather instead of the (equal, slower) einsum.
    ``fan_in_per_field``: weights feeding one output unit per input field (taps x support
    for canonical, channels x taps for escnn, docs/models.md); ``fan_in(c)`` for ``c`` fields.
    """

    tensor: np.ndarray
    group: Group
    layer: str
    basis: str
    support: str
    kernel_size: Optional[int]
    in_size: int
    fan_in_per_field: int
    scale: float
    index: Optional[np.ndarray]

    @property
    def dim(self) -> int:
        """``D``, the number of coefficients per (output field, input field) pair."""
        return self.tensor.shape[0]

    @property
    def out_size(self) -> int:
        return self.group.order

    @property
    def spatial(self) -> bool:
        return self.layer in ("lift", "gconv")

    def fan_in(self, in_fields: int) -> int:
        return in_fields * self.fan_in_per_field

    def filter(self, theta: np.ndarray) -> np.ndarray:
        """Reference expansion: ``theta [O, C, D]`` -> filter ``[O*|G|, C*in_size, (k, k)]`` (float64).

        Rows ``o * |G| + g``, columns ``c * in_size + b``: escnn's field layout.
        """
        theta = np.asarray(theta, dtype=np.float64)
        O, C, _ = theta.shape
        f = np.einsum("ocj,jgb...->ogcb...", theta, self.tensor)
        return f.reshape(O * self.out_size, C * self.in_size, *self.tensor.shape[3:])


def domain_permutation(group: Group, input_shape: tuple[int, ...]) -> np.ndarray:
    """Permutations ``[|G|, d]`` of the flattened input ``[C, H, W]`` or ``[C, m]`` (channel-major).

    ``(L_g x).reshape(d) = x.reshape(d)[perm[g]]``, the same action on every channel.
    """
    if len(input_shape) == 3:
        c, h, w = input_shape
        base = group.image_permutations(h, w)
    elif len(input_shape) == 2:
        c, m = input_shape
        base = group.ring_permutations(m)
    else:
        raise ValueError(f"data: inputs must be images (C, H, W) or ring signals (C, m), got shape {input_shape}")
    p = base.shape[1]
    return np.concatenate([base + ch * p for ch in range(c)], axis=1)


def filter_basis(
    group: Group,
    layer: LayerKind,
    in_fields: int,
    kernel_size: int,
    basis: BasisKind,
    support: SupportKind = "full",
    domain_perm: np.ndarray | None = None,
) -> BlockBasis:
    """The cached, read-only basis of one block of ``layer`` (see the module docstring).

    ``in_fields`` is accepted for API compatibility: the block is per single input field.
    ``kernel_size`` is ignored for ``glift``/``gdense``; ``domain_perm`` is required for ``glift``.
    """
    if isinstance(group, str):
        group = Group.parse(group)
    if in_fields < 1:
        raise ValueError(f"in_fields must be positive, got {in_fields}")
    if layer not in ("lift", "gconv", "glift", "gdense"):
        raise ValueError(f"layer: unknown {layer!r}; use lift, gconv, glift or gdense")
    if basis not in ("canonical", "escnn"):
        raise ValueError(f"basis: unknown {basis!r}; use canonical or escnn")
    if support not in ("identity", "full"):
        raise ValueError(f"support: unknown {support!r}; use identity or full")
    if basis == "escnn" and support != "full":
        raise ValueError("support: escnn's own basis spans full-support filters only; use support: full")
    if layer == "lift" and support != "full":
        raise ValueError("support: a lifting layer has no group support to restrict; use support: full")
    perm_key = None
    if layer == "glift":
        if domain_perm is None:
            raise ValueError("glift needs domain_perm, the permutations [|G|, d] of the input vector")
        perm = np.ascontiguousarray(domain_perm, dtype=np.int64)
        _check_action(group, perm)
        perm_key = perm.tobytes()
        kernel_size = 0
    elif layer == "gdense":
        kernel_size = 0
    elif kernel_size < 1:
        raise ValueError(f"kernel_size must be positive, got {kernel_size}")
    if layer == "lift":
        support = "full"
    return _cached_basis(group, layer, int(kernel_size), basis, support, perm_key)


# ----- construction -------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _cached_basis(group: Group, layer: str, k: int, basis: str, support: str, perm_key: bytes | None) -> BlockBasis:
    perm = None if perm_key is None else np.frombuffer(perm_key, dtype=np.int64).reshape(group.order, -1)
    if basis == "canonical":
        out = _canonical(group, layer, k, support, perm)
    else:
        out = _escnn(group, layer, k, perm)
    out.tensor.setflags(write=False)
    if out.index is not None:
        out.index.setflags(write=False)
    return out


def _support(group: Group, support: str) -> list[int]:
    return list(range(group.order)) if support == "full" else [0]


def _from_index(index: np.ndarray, dim: int) -> np.ndarray:
    """One-hot patterns: ``tensor[j]`` is 1 exactly where ``index == j``."""
    return (index[None] == np.arange(dim).reshape(-1, *([1] * index.ndim))).astype(np.float64)


def _canonical(group: Group, layer: str, k: int, support: str, perm: np.ndarray | None) -> BlockBasis:
    G = group.order
    mul = group.mul
    S = _support(group, support)
    if layer in ("lift", "gconv"):
        if not group.acts_exactly_on_grid():
            raise ValueError(
                f"basis: canonical needs a group that permutes the pixels of a square grid, and {group.name} "
                "does not; use C1, C2, C4, D1, D2 or D4, or basis: escnn"
            )
        taps = group.image_permutations(k, k)  # (L_g W).flat[q] = W.flat[taps[g, q]]
        kk = k * k
        if layer == "lift":
            index = taps[:, None, :].copy()  # [G, 1, k*k]
            in_size, fan, dim = 1, kk, kk
        else:
            index = np.full((G, G, kk), -1, dtype=np.int64)
            for g in range(G):
                for slot, s in enumerate(S):
                    h = mul[g, s]  # F[g, h] = L_g W[g^-1 h] for g^-1 h = s in S
                    index[g, h] = slot * kk + taps[g]
            in_size, fan, dim = G, len(S) * kk, len(S) * kk
        index = index.reshape(G, in_size, k, k)
    elif layer == "glift":
        index = perm.copy()  # filter[g] = L_g W: filter[g, i] = W[perm[g, i]]
        in_size = fan = dim = perm.shape[1]
    else:  # gdense
        index = np.full((G, G), -1, dtype=np.int64)
        for g in range(G):
            for slot, s in enumerate(S):
                index[g, mul[g, s]] = slot
        in_size, fan, dim = G, len(S), len(S)
    return BlockBasis(
        tensor=_from_index(index, dim),
        group=group,
        layer=layer,
        basis="canonical",
        support=support,
        kernel_size=k or None,
        in_size=in_size,
        fan_in_per_field=fan,
        scale=1.0,
        index=index,
    )


def _escnn(group: Group, layer: str, k: int, perm: np.ndarray | None) -> BlockBasis:
    # deferred: importing escnn takes about 2 s, and only escnn-basis layers need it
    from . import escnn_types as et

    G = group.order
    with torch.no_grad():
        if layer in ("lift", "gconv"):
            in_type = et.trivial_type(group, 1) if layer == "lift" else et.regular_type(group, 1)
            module = et.enn.R2Conv(in_type, et.regular_type(group, 1), k, bias=False, initialize=False)
        elif layer == "glift":
            # one field per orbit: the same basis as for the whole permutation representation
            # (escnn builds it block by block), without escnn's d^2-sized decomposition
            in_type, order = et.orbit_field_type(group, perm)
        else:
            in_type = et.regular_type(group, 1, "none")
        if layer in ("glift", "gdense"):
            module = et.enn.Linear(in_type, et.regular_type(group, 1, "none"), bias=False, initialize=False)
        # escnn shares its sampled bases between modules, so expand in its own dtype (float32)
        # without converting the module; a unit vector reads each sample out exactly
        expansion = module.basisexpansion
        dim = expansion.dimension()
        eye = torch.eye(dim, dtype=module.weights.dtype)
        raw = torch.stack([expansion(eye[j]) for j in range(dim)]).double().numpy()
    in_size = in_type.size
    shape = (dim, G, in_size, k, k) if layer in ("lift", "gconv") else (dim, G, in_size)
    raw = raw.reshape(shape)
    if layer == "glift":
        natural = np.empty_like(raw)
        natural[:, :, order] = raw  # back from orbit order to input positions
        raw = natural
    raw = _symmetrised(raw, group, layer, k, perm)
    taps = k * k if layer in ("lift", "gconv") else 1
    scale = float(np.sqrt(G * in_size * taps / np.sum(raw**2)))
    return BlockBasis(
        tensor=raw * scale,
        group=group,
        layer=layer,
        basis="escnn",
        support="full",
        kernel_size=k or None,
        in_size=in_size,
        fan_in_per_field=in_size * taps,
        scale=scale,
        index=None,
    )


def _symmetrised(raw: np.ndarray, group: Group, layer: str, k: int, perm: np.ndarray | None) -> np.ndarray:
    """escnn's float32 samples projected onto the equivariant filters, in float64.

    Every element of an equivariant basis is itself an equivariant filter: it is fixed by
    ``(T_r F)[g, h, q] = F[r g, r h, taps[r]^-1 q]`` (``gconv``; ``lift`` has no ``h``, and
    ``glift`` / ``gdense`` use the input permutation / no taps), which follows from
    ``F[g, h] = L_g W[g^-1 h]`` and ``L_rg = L_r L_g``. escnn's samples satisfy this only to
    float32 rounding (~1e-7 relative); their group average ``(1/|G|) sum_r T_r F`` satisfies it to
    float64 rounding, so float64 models and kernels are equivariant to ~1e-16 too. Groups that
    do not permute the grid (C8 on images) have no such exact action; their samples are kept.
    """
    if layer in ("lift", "gconv") and not group.acts_exactly_on_grid():
        return raw
    G, mul = group.order, group.mul
    D = raw.shape[0]
    if layer in ("lift", "gconv"):
        moves = np.argsort(group.image_permutations(k, k), axis=1)  # taps[r]^-1
        flat = raw.reshape(D, G, raw.shape[2], k * k)
    elif layer == "glift":
        moves = np.argsort(perm, axis=1)
        flat = raw[:, :, None, :]  # one input "field" whose entries the group permutes
    else:  # gdense: regular in, no taps
        moves = np.zeros((G, 1), dtype=np.int64)
        flat = raw[..., None]
    total = np.zeros_like(flat)
    for r in range(G):
        moved = flat[:, mul[r]]
        if layer in ("gconv", "gdense"):
            moved = moved[:, :, mul[r]]
        total += moved[..., moves[r]]
    return (total / G).reshape(raw.shape)


def _check_action(group: Group, perm: np.ndarray) -> None:
    """``perm`` must be a group action: ``perm[ab] = perm[b][perm[a]]`` (so ``L_a L_b = L_ab``)."""
    if perm.ndim != 2 or perm.shape[0] != group.order:
        raise ValueError(f"domain_perm must have shape [|G|={group.order}, d], got {perm.shape}")
    d = perm.shape[1]
    if not all(np.array_equal(np.sort(p), np.arange(d)) for p in perm):
        raise ValueError("domain_perm: every row must be a permutation of 0..d-1")
    mul = group.mul
    for a in range(group.order):
        for b in range(group.order):
            if not np.array_equal(perm[mul[a, b]], perm[b][perm[a]]):
                raise ValueError(f"domain_perm is not an action of {group.name} (fails at elements {a}, {b})")
