"""Kernel rules: one per entry of a layer plan (``study.architecture``), as in neural-tangents' stax.

A rule maps the NNGP and NTK of a batch of input pairs through one layer (docs/theory.md
§2-§4). ``RULES`` holds one rule factory per layer type of the plan. The batch is ``outer``
(``[B1, B2, ...]``: every x1 with every x2) or paired (``[B, ...]``: x1[i] with x2[i]). A
state's ``form`` says how it stores the kernel: ``input``, ``input_flat``, ``flat``,
``positions``, ``right_invariant``, ``full`` or ``group``, defined (with their tensor layouts)
in ``study.architecture``, next to the feature kinds they hold.

Nonlinearities need the variances ``K(x, x)`` of each input at each unit; ``var_of`` reads
them off a paired state of ``(x, x)``, and the engine (``analysis.kernels``) records them
in a first pass over the inputs alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from study.architecture import (
    Conv,
    Dense,
    Flatten,
    GlobalAvgPool,
    GroupConv,
    GroupDense,
    GroupLift,
    GroupPool,
    Layer,
    Lift,
    Nonlin,
)
from study.bases import domain_permutation, filter_basis
from study.groups import Group

from . import kernel_scratch as scratch
from .kernel_nonlin import gaussian_factors
from .kernel_ops import (
    TorusCorrelation,
    axis_maps,
    diagonal_shift_sum,
    out_size,
    patches,
    tap_weighted_shift_sum,
    window_rotations,
)

__all__ = ["Pairs", "Meta", "RULES", "build_rules", "var_of"]

# A basis covariance counts as right invariant when it is so up to this relative error
# (round-off of the covariance sum). escnn's bases, symmetrised in float64 by
# study.bases, are right invariant for C1..D4 (the group permutes the grid); for other n
# escnn's float32 sampling breaks it at ~1e-8, and the kernel then takes the full route,
# exact for the model as sampled.
_RIGHT_INV_RTOL = 1e-12


@dataclass
class Pairs:
    """NNGP and NTK of a batch of input pairs (see the module docstring)."""

    form: str
    outer: bool
    nngp: Optional[torch.Tensor] = None
    ntk: Optional[torch.Tensor] = None
    x1: Optional[torch.Tensor] = None
    x2: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class Meta:
    """The kernel between layers: its storage ``form``, group size, grid, input size."""

    form: str
    G: int = 1
    H: int = 0
    W: int = 0
    d: int = 0  # input: channels (images, rings); input_flat: vector size

    @property
    def entries(self) -> int:
        """Numbers stored per input pair."""
        hw = max(self.H, 1) * max(self.W, 1)
        return {
            "input": self.d * hw,
            "input_flat": 1,
            "flat": 1,
            "positions": hw,
            "right_invariant": self.G * hw * hw,
            "full": self.G**2 * hw * hw,
            "group": self.G**2,
        }[self.form]


def var_of(st: Pairs) -> torch.Tensor:
    """The variances ``K(x, x)`` at each unit, from a paired state of ``(x, x)``."""
    return _var_view(st).clone()  # a copy: the engine recycles the state's storage


def _var_view(st: Pairs) -> torch.Tensor:
    k = st.nngp
    if st.form in ("flat", "positions"):
        return k
    if st.form == "right_invariant":
        b, (h, w) = k.shape[:-5], k.shape[-2:]
        return k[..., 0, :, :, :, :].reshape(*b, h * w, h * w).diagonal(dim1=-2, dim2=-1).reshape(*b, h, w)
    if st.form == "full":
        b, (g, h, w) = k.shape[:-6], k.shape[-3:]
        n = g * h * w
        return k.reshape(*b, n, n).diagonal(dim1=-2, dim2=-1).reshape(*b, g, h, w)
    if st.form == "group":
        return k.diagonal(dim1=-2, dim2=-1)
    raise ValueError(f"no variances in a state of form {st.form!r}")


def _expand_var(form: str, var: torch.Tensor, side: int, outer: bool) -> torch.Tensor:
    """Broadcast the variances of side 1 (rows) or 2 (columns) against the state's kernel."""
    if outer:
        var = var.unsqueeze(1) if side == 1 else var.unsqueeze(0)
    if form in ("flat", "positions"):
        return var
    if form == "right_invariant":  # var [.., H, W] against [.., G, H, W, H, W]
        var = var.unsqueeze(-3)
        return var[..., None, None] if side == 1 else var.unsqueeze(-3).unsqueeze(-3)
    if form == "full":  # var [.., G, H, W] against [.., G, H, W, G, H, W]
        return var[..., None, None, None] if side == 1 else var[..., None, None, None, :, :, :]
    if form == "group":  # var [.., G] against [.., G, G]
        return var[..., :, None] if side == 1 else var[..., None, :]
    raise ValueError(f"no nonlinearity on a state of form {form!r}")


# ----- rules --------------------------------------------------------------------------------
class Rule:
    """One layer's action on a state. ``meta_out`` is the kernel's shape after the layer;
    ``fuses_next``: the rule also does the next plan entry's work (that entry gets no rule)."""

    uses_var = False
    fuses_next = False
    meta_out: Meta

    def __call__(self, st: Pairs, want_ntk: bool, var1=None, var2=None) -> Pairs:
        raise NotImplementedError

    def to(self, device: torch.device) -> "Rule":
        """The same rule with its constant tensors (index maps, basis tensors, spectra) on ``device``."""
        moved = copy.copy(self)
        for name, value in vars(self).items():
            setattr(moved, name, _to_device(value, device))
        return moved


def _to_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, list):
        return [_to_device(v, device) for v in value]
    if isinstance(value, TorusCorrelation):
        return value.to(device)
    return value


class _Linear(Rule):
    """``K' = sw^2 A[K] + sb^2``, ``Theta' = K' + sw^2 A[Theta]`` for a linear operator ``A``.

    Operators return a fresh unnormalised sum ``S`` with ``A[M] = scale * S``, so that the
    normalisation and ``sw^2`` cost one pass together.
    """

    scale = 1.0

    def __init__(self, affine):
        self.sw2 = affine.sigma_w**2
        self.sb2 = affine.sigma_b**2 if affine.bias else 0.0

    def _finish(self, st: Pairs, form: str, a_nngp, a_ntk, want_ntk: bool, scale: float | None = None) -> Pairs:
        f = self.sw2 * (self.scale if scale is None else scale)
        nngp = a_nngp.mul_(f)
        if self.sb2:
            nngp.add_(self.sb2)
        ntk = None
        if want_ntk:
            # First weight layer: Theta = K. The two may share storage because no rule
            # modifies the tensors of its input state in place.
            if a_ntk is None:
                ntk = nngp
            else:
                ntk = torch.add(nngp, a_ntk, alpha=f, out=scratch.empty(nngp.shape, nngp.device))
                scratch.recycle(a_ntk)
        return Pairs(form, st.outer, nngp, ntk)

    def _linear_both(self, st: Pairs, op, form: str, want_ntk: bool) -> Pairs:
        a_ntk = op(st.ntk) if (want_ntk and st.ntk is not None) else None
        return self._finish(st, form, op(st.nngp), a_ntk, want_ntk)


class _Parameterless(Rule):
    """A fixed linear map of the features (pooling, flattening): the same ``A`` on both kernels."""

    def _map(self, st: Pairs, op, form: str, want_ntk: bool) -> Pairs:
        ntk = op(st.ntk) if (want_ntk and st.ntk is not None) else None
        return Pairs(form, st.outer, op(st.nngp), ntk)


def _gram(a: torch.Tensor, b: torch.Tensor, outer: bool) -> torch.Tensor:
    """``sum_i a[n, i] b[m, i]``: ``[N1, N2]`` (outer) or ``[N]`` (paired)."""
    return a @ b.T if outer else (a * b).sum(-1)


class DenseRule(_Linear):
    def __init__(self, layer: Dense, meta: Meta):
        super().__init__(layer.affine)
        if meta.form not in ("input_flat", "positions", "flat"):
            raise ValueError(f"Dense needs flat features, got a {meta.form} kernel")
        self.meta_out = Meta("flat")

    def __call__(self, st, want_ntk, var1=None, var2=None):
        if st.form == "input_flat":
            k = _gram(st.x1, st.x2, st.outer)
            return self._finish(st, "flat", k, None, want_ntk, scale=1.0 / st.x1.shape[-1])
        if st.form == "positions":
            return self._linear_both(st, lambda m: m.mean(dim=(-2, -1)), "flat", want_ntk)
        return self._linear_both(st, lambda m: m.clone(), "flat", want_ntk)


class FlattenRule(_Parameterless):
    def __init__(self, meta: Meta):
        self.meta_in = meta
        if meta.form == "input":
            self.meta_out = Meta("input_flat", d=meta.d * max(meta.H, 1) * max(meta.W, 1))
        elif meta.form in ("right_invariant", "positions") and meta.G == 1:
            self.meta_out = Meta("positions", 1, meta.H, meta.W)
        elif meta.form == "flat":
            self.meta_out = meta
        else:
            raise ValueError(f"Flatten of a {meta.form} kernel (G={meta.G}) is not a layer of any plan")

    def __call__(self, st, want_ntk, var1=None, var2=None):
        if st.form == "input":
            b1, b2 = st.x1.shape[0], st.x2.shape[0]
            return Pairs("input_flat", st.outer, x1=st.x1.reshape(b1, -1), x2=st.x2.reshape(b2, -1))
        if st.form == "right_invariant":
            h, w = self.meta_in.H, self.meta_in.W

            def diag(m):
                b = m.shape[:-5]
                return m.reshape(*b, h * w, h * w).diagonal(dim1=-2, dim2=-1).reshape(*b, h, w)

            return self._map(st, diag, "positions", want_ntk)
        return st


class GlobalAvgPoolRule(_Parameterless):
    def __init__(self, meta: Meta):
        if meta.form != "right_invariant" or meta.G != 1:
            raise ValueError(f"global average pooling needs a plain grid, got a {meta.form} kernel (G={meta.G})")
        self.meta_out = Meta("flat")

    def __call__(self, st, want_ntk, var1=None, var2=None):
        return self._map(st, lambda m: m.mean(dim=(-5, -4, -3, -2, -1)), "flat", want_ntk)


class GroupPoolRule(_Parameterless):
    def __init__(self, meta: Meta):
        if meta.form in ("right_invariant", "full"):
            self.meta_out = Meta("right_invariant", 1, meta.H, meta.W)
        elif meta.form == "group":
            self.meta_out = Meta("flat")
        else:
            raise ValueError(f"group pooling needs regular fields, got a {meta.form} kernel")

    def __call__(self, st, want_ntk, var1=None, var2=None):
        if st.form == "right_invariant":  # (1/G^2) sum_{g,g'} K(g' g^-1) = mean over the relative element
            return self._map(st, _group_mean, "right_invariant", want_ntk)
        if st.form == "full":
            return self._map(st, lambda m: m.mean(dim=-3).mean(dim=-5).unsqueeze(-5), "right_invariant", want_ntk)
        return self._map(st, lambda m: m.mean(dim=(-2, -1)), "flat", want_ntk)


def _group_mean(m: torch.Tensor) -> torch.Tensor:
    shape = list(m.shape)
    shape[-5] = 1
    return torch.mean(m, dim=-5, keepdim=True, out=scratch.empty(shape, m.device))


class NonlinRule(Rule):
    """``K' = E[phi phi]``, ``Theta' = E[phi' phi'] * Theta``. With ``pool`` (right-invariant
    kernels only) the group mean of the next layer is fused in: it runs before the factors
    that depend only on the variances, which carry no group index."""

    uses_var = True

    def __init__(self, layer: Nonlin, meta: Meta, pool: bool = False):
        if meta.form in ("input", "input_flat"):
            raise ValueError("a nonlinearity must follow a weight layer")
        if pool and meta.form != "right_invariant":
            raise ValueError("only right-invariant kernels fuse the group mean into the nonlinearity")
        self.nonlin, self.pool = layer.kind, pool
        self.fuses_next = pool
        self.meta_out = Meta("right_invariant", 1, meta.H, meta.W) if pool else meta

    def __call__(self, st, want_ntk, var1=None, var2=None):
        v1 = _expand_var(st.form, var1, 1, st.outer)
        v2 = _expand_var(st.form, var2, 2, st.outer)
        need_d = want_ntk and st.ntk is not None
        f = gaussian_factors(self.nonlin, st.nngp, v1, v2, st.ntk if need_d else None)
        if self.pool:
            psi = _group_mean(f.psi_core).mul_(f.psi_scale)
            ntk = _group_mean(f.dtheta_core).mul_(f.dtheta_scale) if need_d else None
            scratch.recycle(f.psi_core, f.dtheta_core)
        else:
            psi = f.psi_core.mul_(f.psi_scale)
            ntk = f.dtheta_core.mul_(f.dtheta_scale) if need_d else None
        return Pairs(st.form, st.outer, psi, ntk)


# ----- convolutions with canonical (independent-tap) filters ---------------------------------
def _first_layer_patches(st: Pairs, k: int, padding: str):
    p1, p2 = patches(st.x1, k, padding), patches(st.x2, k, padding)
    return p1, p2  # [N, C, k*k, H', W']


class ConvRule(_Linear):
    """Plain convolution (docs/theory.md §2.3): ``A[M](p, q) = (1/k^2) sum_delta M(p+delta, q+delta)``.

    With per-tap variances ``v`` (``Conv.variances()``, 0 off the filter support) the taps are
    weighted as the finite layer draws them: ``A[M](p, q) = (1/sum v) sum_t v_t M(p + delta_t, q + delta_t)``
    (docs/theory.md §3.4). The full uniform window keeps the separable shifted sums.
    ``diag_only``: keep only the ``(p, p)`` entries, which is all a flatten readout needs.
    """

    def __init__(self, layer: Conv, meta: Meta, diag_only: bool):
        super().__init__(layer.affine)
        self.k, self.padding = layer.kernel_size, layer.padding
        self.uniform = layer.uniform
        self.v = layer.variances()
        self.tap_weights = torch.from_numpy(self.v.reshape(1, 1, -1, 1, 1))
        self.scale = 1.0 / self.k**2 if self.uniform else 1.0 / float(self.v.sum())
        self.diag_only = diag_only
        if meta.form not in ("input", "right_invariant", "positions") or meta.G != 1:
            raise ValueError(f"Conv needs images or a plain grid, got a {meta.form} kernel (G={meta.G})")
        h, w = out_size(meta.H, self.k, self.padding), out_size(meta.W, self.k, self.padding)
        self.meta_out = Meta("positions" if diag_only else "right_invariant", 1, h, w)

    def __call__(self, st, want_ntk, var1=None, var2=None):
        if st.form == "input":
            return self._first_layer(st, want_ntk)
        if st.form == "positions":
            return self._linear_both(st, self._positions_op, "positions", want_ntk)
        return self._linear_both(st, self._grid_op, "right_invariant", want_ntk)

    def _first_layer(self, st, want_ntk):
        k = self.k
        p1, p2 = _first_layer_patches(st, k, self.padding)
        n1, c, kk, h, w = p1.shape
        n2 = p2.shape[0]
        if not self.uniform:  # one side carries the tap weights: sum_t v_t x(p + d_t) x'(q + d_t)
            p1 = p1 * self.tap_weights
        a = p1.reshape(n1, c * kk, h * w)
        b = p2.reshape(n2, c * kk, h * w)
        if self.diag_only:
            if st.outer:  # [P, N1, K] @ [P, K, N2]
                m = torch.bmm(a.permute(2, 0, 1), b.permute(2, 1, 0)).permute(1, 2, 0)
            else:
                m = (a * b).sum(1)
            m = m.reshape(*m.shape[:-1], h, w)
            form = "positions"
        else:
            if st.outer:
                m = a.permute(0, 2, 1).reshape(n1 * h * w, c * kk) @ b.permute(1, 0, 2).reshape(c * kk, n2 * h * w)
                m = m.reshape(n1, h * w, n2, h * w).permute(0, 2, 1, 3)
            else:
                m = torch.bmm(a.transpose(1, 2), b)
            m = m.reshape(*m.shape[:-2], 1, h, w, h, w)
            form = "right_invariant"
        taps = kk if self.uniform else float(self.v.sum())
        return self._finish(st, form, m, None, want_ntk, scale=1.0 / (c * taps))

    def _positions_op(self, m):
        k = self.k
        if not self.uniform:
            return tap_weighted_shift_sum(m, self.v, self.padding, (-2,), (-1,))
        t = diagonal_shift_sum(m, k, self.padding, -2)
        out = diagonal_shift_sum(t, k, self.padding, -1)
        scratch.recycle(t)
        return out

    def _grid_op(self, m):
        k = self.k
        if not self.uniform:
            return tap_weighted_shift_sum(m, self.v, self.padding, (-4, -2), (-3, -1))
        t = diagonal_shift_sum(m, k, self.padding, -4, -2, 1)
        out = diagonal_shift_sum(t, k, self.padding, -3, -1, 1)
        scratch.recycle(t)
        return out


class LiftRule(_Linear):
    """Canonical lifting: ``K~(h, p, q) = (1/(C k^2)) sum_{c,delta} x_c(p+delta) x'_c(q + R_h delta)``."""

    def __init__(self, layer: Lift, meta: Meta, group: Group):
        super().__init__(layer.affine)
        if meta.form != "input":
            raise ValueError("a lifting layer reads the input images")
        self.k, self.padding, self.G = layer.kernel_size, layer.padding, group.order
        self.rot = torch.from_numpy(window_rotations(group, self.k))
        h, w = out_size(meta.H, self.k, self.padding), out_size(meta.W, self.k, self.padding)
        self.meta_out = Meta("right_invariant", group.order, h, w)

    def __call__(self, st, want_ntk, var1=None, var2=None):
        p1, p2 = _first_layer_patches(st, self.k, self.padding)
        n1, c, kk, h, w = p1.shape
        n2, G, P = p2.shape[0], self.G, h * w
        # x'(q + R_h delta_t) is tap rot[h, t] of the patch at q
        p2r = p2.reshape(n2, c, kk, P)[:, :, self.rot]  # [N2, C, G, kk, P]
        a = p1.reshape(n1, c * kk, P).transpose(1, 2)  # [N1, P, K]
        b = p2r.permute(0, 2, 1, 3, 4).reshape(n2, G, c * kk, P)  # [N2, G, K, P]
        if st.outer:  # broadcast matmul writes [N1, N2, G, P, P] directly
            m = torch.matmul(a[:, None, None], b[None], out=scratch.empty((n1, n2, G, P, P), a.device))
        else:
            m = torch.matmul(a[:, None], b, out=scratch.empty((n1, G, P, P), a.device))
        m = m.reshape(*m.shape[:-3], G, h, w, h, w)
        return self._finish(st, "right_invariant", m, None, want_ntk, scale=1.0 / (c * kk))


class GroupConvRule(_Linear):
    """Canonical group convolution on right-invariant kernels (any support, docs/theory.md §3):
    ``K~'(h, p, q) = (1/k^2) sum_delta Psi~(h, p + delta, q + R_h delta)``, a separable shifted sum."""

    def __init__(self, layer: GroupConv, meta: Meta, group: Group):
        super().__init__(layer.affine)
        if meta.form != "right_invariant" or meta.G != group.order:
            raise ValueError(f"group convolution needs right-invariant regular fields, got a {meta.form} kernel")
        self.k, self.padding = layer.kernel_size, layer.padding
        self.scale = 1.0 / self.k**2
        self.maps = axis_maps(group)
        h, w = out_size(meta.H, self.k, self.padding), out_size(meta.W, self.k, self.padding)
        self.meta_out = Meta("right_invariant", group.order, h, w)

    def _op(self, m):
        k, pad = self.k, self.padding
        b = m.shape[:-5]
        h_out, w_out = self.meta_out.H, self.meta_out.W
        out = scratch.empty((*b, len(self.maps), h_out, w_out, h_out, w_out), m.device)
        for h, ((a0, s0), (a1, s1)) in enumerate(self.maps):
            x = m.select(-5, h)  # [.., H, W, H, W]; offsets: rows (-4, q axis -2 + a0), cols (-3, -2 + a1)
            x = diagonal_shift_sum(x, k, pad, -4, -2 + a0, s0)
            diagonal_shift_sum(x, k, pad, -3, -2 + a1, s1, out=out.select(-5, h))
            scratch.recycle(x)
        return out

    def __call__(self, st, want_ntk, var1=None, var2=None):
        return self._linear_both(st, self._op, "right_invariant", want_ntk)


# ----- layers given by a parameter basis (docs/theory.md §4) ----------------------------------
def _covariance(basis) -> np.ndarray:
    """``C[(a, b, t), (a', b', t')] = sum_j B_j B_j / fan_in_per_field`` as ``[G, b, t, G, b, t]``."""
    T = np.asarray(basis.tensor, dtype=np.float64)
    T = T.reshape(T.shape[0], T.shape[1], T.shape[2], -1)
    return np.einsum("jabt,jcdu->abtcdu", T, T) / basis.fan_in_per_field


def right_invariant(basis, group: Group) -> bool:
    """Whether ``C[(a s, b s, .), (a' s, b' s, .)] = C`` for every ``s`` (then kernels stay right invariant)."""
    C = _covariance(basis)
    mul = group.mul
    scale = np.abs(C).max()
    for s in range(group.order):
        po = mul[:, s]
        pi = mul[:, s] if C.shape[1] == group.order else np.arange(C.shape[1])
        moved = C[po][:, pi][:, :, :, po][:, :, :, :, pi]
        if np.abs(moved - C).max() > _RIGHT_INV_RTOL * scale:
            return False
    return True


def _to_full(m: torch.Tensor, group: Group) -> torch.Tensor:
    """Right-invariant ``[.., G, H, W, H, W]`` -> full ``[.., G, H, W, G, H, W]`` (``K(a, a') = K~(a' a^-1)``)."""
    G = group.order
    rel = torch.from_numpy(group.mul[np.arange(G)[None, :], group.inverse[:, None]]).to(m.device)  # [a, a'] -> a' a^-1
    full = m[..., rel, :, :, :, :]  # [.., a, a', H, W, H, W]
    return full.permute(*range(full.ndim - 6), -6, -4, -3, -5, -2, -1)


class LiftBasisRule(_Linear):
    """Lifting with filter covariance from a basis: ``K = (1/(C fan)) sum_{c,j} Y_j(a, p) Y'_j(a', q)``,
    ``Y_j = x * B_j``; right-invariant storage when the covariance allows it."""

    def __init__(self, layer: Lift, meta: Meta, group: Group, basis, right_inv: bool):
        super().__init__(layer.affine)
        if meta.form != "input":
            raise ValueError("a lifting layer reads the input images")
        self.k, self.padding, self.G, self.right_inv = layer.kernel_size, layer.padding, group.order, right_inv
        T = np.array(basis.tensor, dtype=np.float64)  # [D, G, 1, k, k] (a writable copy)
        self.T = torch.from_numpy(T.reshape(T.shape[0], T.shape[1], -1))  # [D, G, kk]
        self.fan = basis.fan_in_per_field
        h, w = out_size(meta.H, self.k, self.padding), out_size(meta.W, self.k, self.padding)
        self.meta_out = Meta("right_invariant" if right_inv else "full", group.order, h, w)

    def __call__(self, st, want_ntk, var1=None, var2=None):
        p1, p2 = _first_layer_patches(st, self.k, self.padding)
        n1, c, kk, h, w = p1.shape
        n2, G, P = p2.shape[0], self.G, h * w
        D = self.T.shape[0]
        y2 = torch.einsum("nctp,jat->ncjap", p2.reshape(n2, c, kk, P), self.T).reshape(n2, c * D, G * P)
        if self.right_inv:  # only a = e on the left
            y1 = torch.einsum("nctp,jt->ncjp", p1.reshape(n1, c, kk, P), self.T[:, 0]).reshape(n1, c * D, P)
            left = P
        else:
            y1 = torch.einsum("nctp,jat->ncjap", p1.reshape(n1, c, kk, P), self.T).reshape(n1, c * D, G * P)
            left = G * P
        if st.outer:
            m = (y1.transpose(1, 2).reshape(n1 * left, c * D) @ y2.permute(1, 0, 2).reshape(c * D, n2 * G * P))
            m = m.reshape(n1, left, n2, G * P).permute(0, 2, 1, 3)
        else:
            m = torch.bmm(y1.transpose(1, 2), y2)
        b = m.shape[:-2]
        if self.right_inv:  # [.., P, (h, q)] -> [.., h, p, q]
            m = m.reshape(*b, P, G, P).movedim(-2, -3).reshape(*b, G, h, w, h, w)
            form = "right_invariant"
        else:
            m = m.reshape(*b, G, h, w, G, h, w)
            form = "full"
        return self._finish(st, form, m, None, want_ntk, scale=1.0 / (c * self.fan))


class GroupConvBasisRule(_Linear):
    """Group convolution with filter covariance from a basis, as a 4D correlation by FFT.

    Right-invariant: ``K~'(h, p, q) = sum_{c, t, t'} W[h, c, t, t'] K~(c, p + d_t, q + d_t')`` with
    ``W[h, c] = sum_b C[(e, b), (h, c b)]``. Full: channels are pairs ``(a, a')`` and
    ``W[(a, a'), (b, b')] = C[(a, b), (a', b')]``.
    """

    def __init__(self, layer: GroupConv, meta: Meta, group: Group, basis, right_inv: bool):
        super().__init__(layer.affine)
        if meta.form not in ("right_invariant", "full") or meta.G != group.order:
            raise ValueError(f"group convolution needs regular fields, got a {meta.form} kernel")
        self.group, self.right_inv = group, right_inv
        self.in_right_inv = meta.form == "right_invariant"
        k, G = layer.kernel_size, group.order
        C = _covariance(basis)  # [G, G, kk, G, G, kk]
        if right_inv:
            mul = group.mul
            cb = mul[np.arange(G)[:, None], np.arange(G)[None, :]]  # [c, b] -> c b
            w = _right_inv_weights(C, cb)  # W[h, c, t, u] = sum_b C[e, b, t, h, c b, u]
        else:
            w = C.transpose(0, 3, 1, 4, 2, 5).reshape(G * G, G * G, k * k, k * k)
        self.corr = TorusCorrelation(w, k, layer.padding, meta.H, meta.W)
        self.meta_out = Meta("right_invariant" if right_inv else "full", G, self.corr.h_out, self.corr.w_out)

    def _op(self, m):
        if self.right_inv:
            return self.corr(m)
        if self.in_right_inv:
            m = _to_full(m, self.group)
        G = self.group.order
        b, (h, w) = m.shape[:-6], m.shape[-2:]
        m = m.permute(*range(len(b)), -6, -3, -5, -4, -2, -1).reshape(*b, G * G, h, w, h, w)
        out = self.corr(m)
        ho, wo = out.shape[-2:]
        out = out.reshape(*b, G, G, ho, wo, ho, wo)
        return out.permute(*range(len(b)), -6, -4, -3, -5, -2, -1)

    def __call__(self, st, want_ntk, var1=None, var2=None):
        return self._linear_both(st, self._op, "right_invariant" if self.right_inv else "full", want_ntk)


def _right_inv_weights(C: np.ndarray, cb: np.ndarray) -> np.ndarray:
    """``W[h, c, t, u] = sum_b C[e, b, t, h, c b, u]`` (``C [G, G, kk, G, G, kk]``, ``cb[c, b] = c b``)."""
    G = C.shape[0]
    Ce = C[0]  # [b, t, h, b', u]
    w = np.zeros((G, G, C.shape[2], C.shape[5]))
    for c in range(G):
        for b in range(G):
            w[:, c] += Ce[b, :, :, cb[c, b], :].transpose(1, 0, 2)
    return w


# ----- regular fields without base space (group MLP) ------------------------------------------
class GroupLiftRule(_Linear):
    """Vector -> regular fields. Canonical: ``K(a, a') = (1/d) <v, L_{a a'^-1} v'>``.
    Basis: ``K(a, a') = (1/d) sum_j (B_j v)_a (B_j v')_a'``."""

    def __init__(self, layer: GroupLift, meta: Meta, group: Group, perm: np.ndarray, basis=None):
        super().__init__(layer.affine)
        if meta.form != "input_flat":
            raise ValueError("a group lifting layer reads the flattened input")
        G = group.order
        self.G = G
        self.perm = torch.from_numpy(np.asarray(perm, dtype=np.int64))  # [G, d]
        self.rel = torch.from_numpy(group.mul[np.arange(G)[:, None], group.inverse[None, :]])  # a a'^-1
        self.T = None if basis is None else torch.from_numpy(np.array(basis.tensor, dtype=np.float64))
        self.fan = meta.d if basis is None else basis.fan_in_per_field
        self.meta_out = Meta("group", G)

    def __call__(self, st, want_ntk, var1=None, var2=None):
        x1, x2 = st.x1, st.x2
        if self.T is None:
            moved = x2[:, self.perm]  # [N2, G, d]: L_h v'
            if st.outer:
                s = (x1 @ moved.reshape(-1, x2.shape[-1]).T).reshape(x1.shape[0], x2.shape[0], self.G)
            else:
                s = torch.einsum("nd,nhd->nh", x1, moved)
            m = s[..., self.rel]
        else:
            y1 = torch.einsum("jad,nd->naj", self.T, x1)
            y2 = torch.einsum("jad,nd->naj", self.T, x2)
            m = torch.einsum("naj,mbj->nmab", y1, y2) if st.outer else torch.einsum("naj,nbj->nab", y1, y2)
        return self._finish(st, "group", m, None, want_ntk, scale=1.0 / self.fan)


class GroupDenseRule(_Linear):
    """Regular -> regular fields. Canonical: ``K'(a, a') = (1/|S|) sum_{s in S} Psi(a s, a' s)``.
    Basis: ``K'(a, a') = sum_{b, b'} C[(a, b), (a', b')] Psi(b, b')``."""

    def __init__(self, layer: GroupDense, meta: Meta, group: Group, basis=None):
        super().__init__(layer.affine)
        if meta.form != "group":
            raise ValueError("a group dense layer reads regular fields without base space")
        G = group.order
        self.G = G
        if basis is None:
            S = range(G) if layer.support == "full" else [0]
            self.idx = [torch.from_numpy(group.mul[:, s]) for s in S]
            self.scale = 1.0 / len(S)
            self.cmat = None
        else:
            C = _covariance(basis)[:, :, 0, :, :, 0]  # [a, b, a', b']
            self.cmat = torch.from_numpy(C.transpose(0, 2, 1, 3).reshape(G * G, G * G).copy())
        self.meta_out = Meta("group", G)

    def _op(self, m):
        if self.cmat is None:
            out = None
            for i in self.idx:
                v = m[..., i, :][..., :, i]
                out = v if out is None else out.add_(v)
            return out
        b = m.shape[:-2]
        return (m.reshape(-1, self.G * self.G) @ self.cmat.T).reshape(*b, self.G, self.G)

    def __call__(self, st, want_ntk, var1=None, var2=None):
        return self._linear_both(st, self._op, "group", want_ntk)


# ----- the plan -----------------------------------------------------------------------------
def _diag_only_flags(plan: list[Layer]) -> list[bool]:
    """For each layer: may it keep only the ``(p, p)`` entries? True for plain convolutions
    whose output reaches a flatten readout without pooling over positions."""
    flags = [False] * len(plan)
    diag = False
    for i in range(len(plan) - 1, -1, -1):
        layer = plan[i]
        if isinstance(layer, Flatten):
            diag = True
        elif isinstance(layer, (Conv, Nonlin)):
            pass
        else:
            diag = False
        flags[i] = diag and isinstance(layer, Conv)
    return flags


@dataclass(frozen=True)
class PlanContext:
    """What a rule factory reads besides its layer and the incoming kernel's ``Meta``."""

    plan: list[Layer]
    input_shape: tuple[int, ...]
    group: Group
    diag_only: list[bool]  # per entry: may a plain convolution keep only the (p, p) entries
    use_basis: dict[int, bool]  # per group layer (by index): through its basis covariance
    right_inv: bool  # right-invariant storage for the grid layers

    def basis(self, layer):
        return _basis(layer, self.group, self.input_shape)


def _basis(layer, group: Group, input_shape: tuple):
    """The parameter basis of a group layer for one input field, as the finite layer draws it."""
    if isinstance(layer, Lift):
        return filter_basis(group, "lift", 1, layer.kernel_size, layer.basis, "full")
    if isinstance(layer, GroupConv):
        return filter_basis(group, "gconv", 1, layer.kernel_size, layer.basis, layer.support)
    if isinstance(layer, GroupLift):
        return filter_basis(group, "glift", 1, 0, layer.basis, "full", domain_permutation(group, input_shape))
    return filter_basis(group, "gdense", 1, 0, layer.basis, layer.support)


# One rule factory per layer type of the plan: ``(layer, meta, index in the plan, context) -> Rule``.
RuleFactory = Callable[[Layer, Meta, int, PlanContext], Rule]
RULES: dict[type, RuleFactory] = {}


def rule_for(*layer_types: type):
    """Register the decorated function as the kernel rule factory of ``layer_types``."""

    def register(fn: RuleFactory) -> RuleFactory:
        for t in layer_types:
            RULES[t] = fn
        return fn

    return register


@rule_for(Dense)
def _dense(layer, meta, i, ctx):
    return DenseRule(layer, meta)


@rule_for(Flatten)
def _flatten(layer, meta, i, ctx):
    return FlattenRule(meta)


@rule_for(GlobalAvgPool)
def _global_avg_pool(layer, meta, i, ctx):
    return GlobalAvgPoolRule(meta)


@rule_for(GroupPool)
def _group_pool(layer, meta, i, ctx):
    return GroupPoolRule(meta)


@rule_for(Nonlin)
def _nonlin(layer, meta, i, ctx):
    plan = ctx.plan
    pool = meta.form == "right_invariant" and i + 1 < len(plan) and isinstance(plan[i + 1], GroupPool)
    return NonlinRule(layer, meta, pool=pool)


@rule_for(Conv)
def _conv(layer, meta, i, ctx):
    return ConvRule(layer, meta, ctx.diag_only[i])


@rule_for(Lift)
def _lift(layer, meta, i, ctx):
    if ctx.use_basis[i]:
        return LiftBasisRule(layer, meta, ctx.group, ctx.basis(layer), ctx.right_inv)
    return LiftRule(layer, meta, ctx.group)


@rule_for(GroupConv)
def _group_conv(layer, meta, i, ctx):
    if ctx.use_basis[i]:
        return GroupConvBasisRule(layer, meta, ctx.group, ctx.basis(layer), ctx.right_inv)
    return GroupConvRule(layer, meta, ctx.group)


@rule_for(GroupLift)
def _group_lift(layer, meta, i, ctx):
    perm = domain_permutation(ctx.group, ctx.input_shape)
    return GroupLiftRule(layer, meta, ctx.group, perm, ctx.basis(layer) if ctx.use_basis[i] else None)


@rule_for(GroupDense)
def _group_dense(layer, meta, i, ctx):
    return GroupDenseRule(layer, meta, ctx.group, ctx.basis(layer) if ctx.use_basis[i] else None)


def build_rules(plan: list[Layer], input_shape: tuple[int, ...], group: Group, route: str = "auto") -> list[Rule]:
    """The kernel rules of a layer plan for inputs of ``input_shape`` (no batch axis).

    ``route``: ``auto`` uses the fast canonical rules where the basis is canonical and the
    basis covariance (right-invariant where it allows) otherwise; ``basis`` takes the
    covariance route for every group layer; ``basis_full`` too, without right invariance.
    """
    if route not in ("auto", "basis", "basis_full"):
        raise ValueError(f"route: unknown {route!r}; use auto, basis or basis_full")
    if len(input_shape) == 3:
        meta = Meta("input", 1, input_shape[1], input_shape[2], d=input_shape[0])
    else:
        meta = Meta("input", 1, input_shape[1], 1, d=input_shape[0])
    use_basis = {
        i: layer.basis != "canonical" or route != "auto"
        for i, layer in enumerate(plan)
        if isinstance(layer, (Lift, GroupConv, GroupLift, GroupDense))
    }
    # Right-invariant storage for the grid layers when every basis layer allows it.
    right_inv = route != "basis_full" and all(
        right_invariant(_basis(plan[i], group, input_shape), group)
        for i, b in use_basis.items()
        if b and isinstance(plan[i], (Lift, GroupConv))
    )
    ctx = PlanContext(list(plan), tuple(input_shape), group, _diag_only_flags(plan), use_basis, right_inv)

    rules: list[Rule] = []
    skip = False
    for i, layer in enumerate(plan):
        if skip:  # fused into the rule before it
            skip = False
            continue
        rule = RULES[type(layer)](layer, meta, i, ctx)
        skip = rule.fuses_next
        rules.append(rule)
        meta = rule.meta_out
    if meta.form != "flat":
        raise ValueError(f"the plan must end in flat outputs, ends in {meta.form}")
    return rules
