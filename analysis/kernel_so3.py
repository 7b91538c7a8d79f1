"""Analytic NNGP and NTK of the SO(3) GCNN of ``workers.so3`` and of the sphere MLP (docs/so3.md).

The finite model and this kernel read the same ``study.sphere.SO3Spec`` and the same SOFT
grid and weights, so the kernel is that of the model as computed, aliasing included (no
idealised continuous SO(3)). Pre-activation kernels are kept over pairs of grid points,
``K[x, x', a, b]`` with ``P = 8 B^3`` points; float64 torch throughout, on the device of the
call (``device``: the CPU by default, or a GPU; the grids and Wigner matrices go there once
per call, the spherical harmonic transforms of the inputs stay numpy on the CPU).

Layer maps (docs/theory.md §2.3 and §7.1, with the layers of ``workers.so3``):

- Lifting: ``K(a, b) = sigma_w^2 / C sum_c sum_l u^l_c(x, a) . u^l_c(x', b) + sigma_b^2`` with
  ``u^l(x, a) = D^l(R_a)^T s^l(x)`` (SH coefficients by DH quadrature); ``Theta = K``.
- Nonlinearity: ``Psi``, ``Psi'`` per grid pair from ``analysis.kernel_nonlin`` (variances
  ``K(x, x)(a, a)`` from a first pass over each input with itself).
- Group convolution to band limit ``L``, with ``E_l(a', b') = w_a' w_b' Psi(a', b')``:
  ``K'(a, b) = sigma_w^2 sum_{l<L} (2l+1) tr(D_a^T M^l D_b) + sigma_b^2``,
  ``M^l_mp = sum_{a'b'n} E_l(a', b') D_a'[m, n] D_b'[p, n]``: the two-sided Fourier
  transform of ``Psi`` contracted over the right index, then synthesised back. Cost
  ``O(P^2 sum_l (2l+1)^2)`` per pair, never ``O(P^3)``. ``Theta' = K' + sigma_w^2 A[Psi' Theta]``.
- Pooling and readout: ``K = s_r^2 sum_ab w_a w_b Psi(a, b) + sigma_b^2`` and
  ``Theta = K + s_r^2 sum_ab w_a w_b (Psi' Theta)(a, b)``.

The sphere MLP's kernel is the plain MLP recursion on the quadrature inner product; its
orbit average ``Theta_G(x, x') = int Theta(x, R x') dR`` is a SOFT quadrature of bandwidth
``B_q`` over ``R`` (not exact: ``Theta(x, R x')`` is not band-limited in ``R``; the error
against ``B_q`` is measured in tests/test_so3_kernels.py and docs/so3.md).
"""

from __future__ import annotations

import math
from typing import List, Tuple

import numpy as np
import torch

from study.sphere import SO3Spec, SphereMLPSpec, degree_slice, dh_grid, sht, so3_analysis, so3_grid, so3_synthesis

from . import kernel_scratch as scratch
from .kernel_nonlin import gaussian_factors

__all__ = [
    "lift_coefficients",
    "lift_kernel",
    "conv_kernel_op",
    "pool_op",
    "so3_kernel_fn",
    "sphere_inner_products",
    "sphere_mlp_kernel_fn",
    "orbit_averaged_sphere_mlp_kernel",
]

_F64 = torch.float64
# Bytes for one block of the outer kernel [rows, N2, P, P]; a layer holds ~6 such tensors.
_BLOCK_BYTES = 64 * 2**20
# Bytes of one [pairs, P] tensor of the relative mode's pair chunk: small enough that the
# elementwise passes of the dual activations stay in cache (benchmarks/qm9_kernel_speed.py).
_PAIR_CHUNK_BYTES = 2 * 2**20


# On a GPU the relative mode's tiles of pairs are this large instead ([pairs, P] float64):
# cache-sized tiles leave a GPU idle, and its memory holds a handful of these easily.
_DEVICE_PAIR_CHUNK_BYTES = 256 * 2**20


def _t(a, device=None) -> torch.Tensor:
    return torch.tensor(np.asarray(a), dtype=_F64, device=device)  # a copy: the grids are read-only


def lift_coefficients(x, L_in: int, L: int, device=None) -> torch.Tensor:
    """SH coefficients ``[N, C, L^2]`` of DH samples ``[N, C, 2L_in, 2L_in]``, exactly as ``SO3Lift``."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    return _t(sht(x, dh_grid(L_in), L - 1), device)


def _lift_u(s: torch.Tensor, ds: List[torch.Tensor]) -> torch.Tensor:
    """``u[N, P, C * L^2]`` with ``u^l(a) = D^l(R_a)^T s^l`` (per channel, degrees packed)."""
    parts = [torch.einsum("amq,ncm->nacq", d, s[..., degree_slice(l)])
             for l, d in enumerate(ds)]
    u = torch.cat(parts, dim=-1)  # [N, P, C, L^2]
    return u.reshape(*u.shape[:2], -1)


def lift_kernel(spec: SO3Spec, x1, x2=None) -> torch.Tensor:
    """NNGP (= NTK) of the lifting layer over grid pairs, ``[N1, N2, P, P]``."""
    ds = [_t(d) for d in so3_grid(spec.B).wigner(spec.bands[0] - 1)]
    u1 = _lift_u(lift_coefficients(x1, spec.L_in, spec.bands[0]), ds)
    u2 = u1 if x2 is None else _lift_u(lift_coefficients(x2, spec.L_in, spec.bands[0]), ds)
    return torch.einsum("iak,jbk->ijab", u1, u2) * (spec.sigma_w**2 / spec.channels) + spec.sigma_b**2


class _GridOps:
    """The SOFT grid's weights and Wigner matrices as torch tensors, per degree."""

    def __init__(self, B: int, l_max: int, device=None):
        grid = so3_grid(B)
        self.w = _t(grid.weights, device)
        self.d = [_t(d, device) for d in grid.wigner(l_max)]  # [P, k, k]
        self.dflat = [d.reshape(d.shape[0], -1) for d in self.d]  # [P, k^2]
        self.wd = [self.w[:, None, None] * d for d in self.d]


def conv_kernel_op(M: torch.Tensor, ops: _GridOps, L: int) -> torch.Tensor:
    """``A[M](a, b) = sum_{l<L} (2l+1) tr(D_a^T M^l D_b)`` over the last two (grid) axes of ``M``.

    The kernel map of ``SO3Nonlin`` (analysis to band ``L``) followed by ``SO3Conv`` with
    ``sigma_w = 1``, no bias: ``E[out(a) out'(b)]`` when ``M`` is the channel mean of
    ``phi(f)(a) phi(f')(b)``.
    """
    out = None
    for l in range(L):
        k = 2 * l + 1
        t = (M @ (ops.w[:, None] * ops.dflat[l])).reshape(*M.shape[:-1], k, k)  # [.., a', p, n]
        mhat = torch.einsum("amn,...apn->...mp", ops.wd[l], t)
        g = torch.einsum("...mp,bpq->...bmq", mhat, ops.d[l]).reshape(*M.shape[:-2], M.shape[-1], k * k)
        term = (ops.dflat[l] @ g.transpose(-1, -2)) * k
        out = term if out is None else out.add_(term)
    return out


def pool_op(M: torch.Tensor, ops: _GridOps) -> torch.Tensor:
    """``sum_ab w_a w_b M(a, b)`` over the last two axes."""
    return (M @ ops.w) @ ops.w


def _expand(v: torch.Tensor, side: int, outer: bool) -> torch.Tensor:
    # v [N, P] against the kernel [N1, N2, P, P] (outer) or [N, P, P] (paired)
    if side == 1:
        v = v[..., :, None]
        return v[:, None] if outer else v
    v = v[..., None, :]
    return v[None] if outer else v


def _so3_run(spec: SO3Spec, ops: _GridOps, u1, u2, outer: bool, vars1=None, vars2=None):
    """Propagate (NNGP, NTK) from lifting features ``u``; returns ``(nngp, ntk, variances)``."""
    sw2, sb2, sr2 = spec.sigma_w**2, spec.sigma_b**2, spec.readout_sigma_w**2
    eq = "iak,jbk->ijab" if outer else "iak,ibk->iab"
    K = torch.einsum(eq, u1, u2).mul_(sw2 / spec.channels).add_(sb2)
    theta = K.clone()
    record = []
    for k in range(spec.depth + 1):
        if vars1 is None:  # paired self pass: the variances are this kernel's diagonal
            v1 = v2 = K.diagonal(dim1=-2, dim2=-1).clone()
            record.append(v1)
        else:
            v1, v2 = vars1[k], vars2[k]
        f = gaussian_factors(spec.nonlin, K, _expand(v1, 1, outer), _expand(v2, 2, outer), theta)
        psi = f.psi_core.mul_(f.psi_scale)
        dth = f.dtheta_core.mul_(f.dtheta_scale)
        if k < spec.depth:
            L = spec.bands[k + 1]
            K = conv_kernel_op(psi, ops, L).mul_(sw2).add_(sb2)
            theta = conv_kernel_op(dth, ops, L).mul_(sw2).add_(K)
        else:
            nngp = pool_op(psi, ops).mul_(sr2).add_(sb2)
            ntk = pool_op(dth, ops).mul_(sr2).add_(nngp)
    return nngp, ntk, record


def so3_kernel_fn(spec: SO3Spec, x1, x2=None, mode: str = "grid", device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """NNGP and NTK ``[N1, N2]`` (float64) of ``build_so3_model(spec, width)`` as width -> infinity.

    ``x1``, ``x2``: DH samples ``[N, C, 2L_in, 2L_in]`` (``x2 = None``: ``x1`` with itself).

    ``mode="grid"`` (default): the kernel of the finite model exactly as it computes, over
    grid pairs; memory in blocks of rows with ``rows * N2 * P^2 * 8`` bytes about 64 MB.
    ``mode="relative"``: every layer kernel is a function of ``g = R_a R_b^-1`` alone
    (docs/so3.md), kept as ``P`` samples per pair; the group convolution becomes the
    projection of ``Psi(g)`` onto degrees ``< L`` by one SOFT quadrature. ``P`` times cheaper;
    it differs from the grid-mode kernel by aliasing of the same order as the finite
    model's invariance error (measured in tests/test_so3_kernels.py).

    ``device``: where the kernels are computed (a torch device; default the CPU); the
    results are tensors there.
    """
    if mode == "relative":
        return _so3_relative(spec, x1, x2, device)
    if mode != "grid":
        raise ValueError(f"mode: unknown {mode!r}; use grid or relative")
    ops = _GridOps(spec.B, max(spec.bands) - 1, device)
    L0 = spec.bands[0]
    ds = ops.d[:L0]
    u1 = _lift_u(lift_coefficients(x1, spec.L_in, L0, device), ds)
    u2 = u1 if x2 is None else _lift_u(lift_coefficients(x2, spec.L_in, L0, device), ds)
    _, _, var1 = _so3_run(spec, ops, u1, u1, outer=False)
    var2 = var1 if x2 is None else _so3_run(spec, ops, u2, u2, outer=False)[2]
    P = ops.w.shape[0]
    rows = max(1, _BLOCK_BYTES // (8 * P * P * u2.shape[0]))
    return _in_row_blocks(lambda sl: _so3_run(spec, ops, u1[sl], u2, True, [v[sl] for v in var1], var2),
                          u1.shape[0], rows)


def _in_row_blocks(run, n_rows: int, rows: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """NNGP and NTK assembled from ``run(slice)`` over blocks of ``rows`` rows (bounded memory)."""
    nngp, ntk = [], []
    for i in range(0, n_rows, rows):
        n, t, _ = run(slice(i, i + rows))
        nngp.append(n)
        ntk.append(t)
    return torch.cat(nngp), torch.cat(ntk)


# ----- relative mode: kernels as functions of g = R_a R_b^-1 -------------------------------
class _RelOps:
    """Synthesis ``[F, P]``, analysis ``[P, F]`` and the value at the identity ``[F]`` per band limit."""

    def __init__(self, B: int, bands, device=None):
        grid = so3_grid(B)
        self.w = _t(grid.weights, device)
        self.d = [_t(d, device) for d in grid.wigner(max(bands) - 1)]
        self.synth = {L: _t(so3_synthesis(grid, L), device) for L in set(bands)}
        self.anal = {L: _t(so3_analysis(grid, L), device) for L in set(bands)}
        self.at_e = {L: torch.cat([math.sqrt(2 * l + 1) * torch.eye(2 * l + 1, dtype=_F64, device=device).reshape(-1)
                                   for l in range(L)]) for L in set(bands)}
        # the lifting's synthesis: rows D^l_mn(R_a) without the sqrt(2l+1) of the orthonormal basis
        L0 = bands[0]
        scale = torch.cat([torch.full(((2 * l + 1) ** 2,), 1 / math.sqrt(2 * l + 1), dtype=_F64, device=device)
                           for l in range(L0)])
        self.lift = (self.synth[L0] * scale[:, None]).contiguous()


def _pair_coefficients(s1: torch.Tensor, s2: torch.Tensor, L: int, outer: bool) -> torch.Tensor:
    """``G^l_mn = sum_c s1^l_cm s2^l_cn`` for ``l < L``, packed like ``so3_synthesis`` rows:
    ``[N1, N2, F_L]`` (``outer``) or ``[N, F_L]`` (pairs ``(s1_i, s2_i)``)."""
    eq = "icm,jcn->ijmn" if outer else "icm,icn->imn"
    parts = [torch.einsum(eq, s1[..., degree_slice(l)], s2[..., degree_slice(l)]) for l in range(L)]
    lead = parts[0].shape[:-2]
    return torch.cat([p.reshape(*lead, -1) for p in parts], dim=-1)


def _rel_run(spec: SO3Spec, ops: _RelOps, s1, s2, outer: bool, e1=None, e2=None):
    """``(nngp, ntk, values at the identity per nonlinearity)``; ``e1``/``e2`` None on a self pass.

    The lifting kernel is ``K(g) = sw^2/C sum_l sum_mn G^l_mn D^l_mn(g) + sb^2`` with the pair's
    channel products ``G`` (``_pair_coefficients``): one synthesis matmul per pair,
    ``O(F P)``, instead of rotating every input on the grid (``O(P C L^2)``, the reference)."""
    sw2, sb2, sr2 = spec.sigma_w**2, spec.sigma_b**2, spec.readout_sigma_w**2
    L0 = spec.bands[0]
    g = _pair_coefficients(s1, s2, L0, outer)
    k = torch.matmul(g, ops.lift, out=scratch.empty((*g.shape[:-1], ops.w.shape[0]), g.device)).mul_(sw2 / spec.channels).add_(sb2)
    k_e = (torch.einsum("icn,jcn->ij" if outer else "icn,icn->i", s1, s2)) * (sw2 / spec.channels) + sb2
    theta = k  # the lifting's NTK is its NNGP; neither is modified in place below
    record = []
    for layer in range(spec.depth + 1):
        if e1 is None:
            v1 = v2 = k_e
            record.append(k_e)
        else:
            v1, v2 = e1[layer], e2[layer]
        if outer:
            v1, v2 = v1[:, None, None], v2[None, :, None]
        else:
            v1, v2 = v1[:, None], v2[:, None]
        f = gaussian_factors(spec.nonlin, k, v1, v2, theta)
        scratch.recycle(k) if theta is k else scratch.recycle(k, theta)
        psi, dth = f.psi_core.mul_(f.psi_scale), f.dtheta_core.mul_(f.dtheta_scale)
        if layer < spec.depth:
            L = spec.bands[layer + 1]
            cp, ct = (psi @ ops.anal[L]).mul_(sw2), (dth @ ops.anal[L]).mul_(sw2)
            scratch.recycle(psi, dth)
            k = torch.matmul(cp, ops.synth[L], out=scratch.empty((*cp.shape[:-1], ops.w.shape[0]), cp.device)).add_(sb2)
            k_e = (cp @ ops.at_e[L]).add_(sb2)
            theta = torch.matmul(ct, ops.synth[L], out=scratch.empty(k.shape, k.device)).add_(k)
        else:
            nngp = (psi @ ops.w).mul_(sr2).add_(sb2)
            ntk = (dth @ ops.w).mul_(sr2).add_(nngp)
            scratch.recycle(psi, dth)
    return nngp, ntk, record


def _so3_relative(spec: SO3Spec, x1, x2=None, device=None):
    """Relative-mode NNGP and NTK. Per input once: SH coefficients and the values at the
    identity (the self pass). Per pair: the chain of dense matmuls and elementwise maps of
    ``_rel_run`` over square tiles of pairs with about ``_PAIR_CHUNK_BYTES`` per ``[pairs, P]``
    tensor (cache-sized: the elementwise passes are memory bound). ``x2 = None``: only the
    tiles on and above the diagonal, the rest by symmetry (the relative-mode kernel is
    symmetric to round-off). On a GPU the tiles are larger (``_DEVICE_PAIR_CHUNK_BYTES``)."""
    ops = _RelOps(spec.B, spec.bands, device)
    L0 = spec.bands[0]
    s1 = lift_coefficients(x1, spec.L_in, L0, device)
    s2 = s1 if x2 is None else lift_coefficients(x2, spec.L_in, L0, device)
    e1 = _rel_run(spec, ops, s1, s1, outer=False)[2]
    e2 = e1 if x2 is None else _rel_run(spec, ops, s2, s2, outer=False)[2]
    n1, n2, P = s1.shape[0], s2.shape[0], ops.w.shape[0]
    sym = x2 is None
    chunk = _PAIR_CHUNK_BYTES if s1.device.type == "cpu" else _DEVICE_PAIR_CHUNK_BYTES
    side = max(1, math.isqrt(max(1, chunk // (8 * P))))
    nngp, ntk = (torch.empty((n1, n2), dtype=_F64, device=s1.device) for _ in range(2))
    for r in range(0, n1, side):
        for c in range(r if sym else 0, n2, side):
            i, j = slice(r, min(r + side, n1)), slice(c, min(c + side, n2))
            nngp[i, j], ntk[i, j], _ = _rel_run(spec, ops, s1[i], s2[j], True, [v[i] for v in e1], [v[j] for v in e2])
            if sym and c != r:
                nngp[j, i], ntk[j, i] = nngp[i, j].T, ntk[i, j].T
    if sym:  # a diagonal tile computed (i, j) and (j, i) apart: keep one, so the matrix is exactly symmetric
        nngp, ntk = [torch.triu(m) + torch.triu(m, diagonal=1).T for m in (nngp, ntk)]
    return nngp, ntk


def _rel_run_reference(spec: SO3Spec, ops: _RelOps, s1, s2, outer: bool, e1=None, e2=None):
    """The first implementation (lifting by rotating every input on the grid, ``O(P C L^2)`` per
    pair), kept as the reference the fast path is tested and benchmarked against."""
    sw2, sb2, sr2 = spec.sigma_w**2, spec.sigma_b**2, spec.readout_sigma_w**2
    k = None
    for l in range(spec.bands[0]):
        sl = degree_slice(l)
        t = torch.einsum("amn,jcn->jcam", ops.d[l], s2[..., sl])
        term = torch.einsum("icm,jcam->ija" if outer else "icm,icam->ia", s1[..., sl], t)
        k = term if k is None else k.add_(term)
    k.mul_(sw2 / spec.channels).add_(sb2)
    k_e = (torch.einsum("icn,jcn->ij" if outer else "icn,icn->i", s1, s2)) * (sw2 / spec.channels) + sb2
    theta = k.clone()  # the NTK at the identity is never needed: the dual activations read NNGP variances
    record = []
    for layer in range(spec.depth + 1):
        if e1 is None:
            v1 = v2 = k_e
            record.append(k_e)
        else:
            v1, v2 = e1[layer], e2[layer]
        if outer:
            v1, v2 = v1[:, None, None], v2[None, :, None]
        else:
            v1, v2 = v1[:, None], v2[:, None]
        f = gaussian_factors(spec.nonlin, k, v1, v2, theta)
        psi, dth = f.psi_core.mul_(f.psi_scale), f.dtheta_core.mul_(f.dtheta_scale)
        if layer < spec.depth:
            L = spec.bands[layer + 1]
            cp, ct = (psi @ ops.anal[L]).mul_(sw2), (dth @ ops.anal[L]).mul_(sw2)
            k, k_e = (cp @ ops.synth[L]).add_(sb2), (cp @ ops.at_e[L]).add_(sb2)
            theta = (ct @ ops.synth[L]).add_(k)
        else:
            nngp = (psi @ ops.w).mul_(sr2).add_(sb2)
            ntk = (dth @ ops.w).mul_(sr2).add_(nngp)
    return nngp, ntk, record


def _so3_relative_reference(spec: SO3Spec, x1, x2=None):
    ops = _RelOps(spec.B, spec.bands)
    L0 = spec.bands[0]
    s1 = lift_coefficients(x1, spec.L_in, L0)
    s2 = s1 if x2 is None else lift_coefficients(x2, spec.L_in, L0)
    e1 = _rel_run_reference(spec, ops, s1, s1, outer=False)[2]
    e2 = e1 if x2 is None else _rel_run_reference(spec, ops, s2, s2, outer=False)[2]
    rows = max(1, _BLOCK_BYTES // (8 * ops.w.shape[0] * max(1, s2.shape[0]) * 4))
    return _in_row_blocks(lambda sl: _rel_run_reference(spec, ops, s1[sl], s2, True, [v[sl] for v in e1], e2),
                          s1.shape[0], rows)


# ----- the sphere MLP -----------------------------------------------------------------------
def sphere_inner_products(x1, x2, L_in: int, device=None) -> torch.Tensor:
    """``Sigma0[N1, N2] = (1/C) sum_c sum_x w_x x1_c(x) x2_c(x)`` (DH quadrature, normalised weights)."""
    g = dh_grid(L_in)
    a = np.asarray(x1.detach().cpu() if isinstance(x1, torch.Tensor) else x1, dtype=np.float64)
    b = np.asarray(x2.detach().cpu() if isinstance(x2, torch.Tensor) else x2, dtype=np.float64)
    return _t(np.einsum("icjk,jk,dcjk->id", a, g.weights, b, optimize=True) / a.shape[1], device)


def _self_psi(kind: str, v: torch.Tensor) -> torch.Tensor:
    f = gaussian_factors(kind, v, v, v)
    return f.psi_core * f.psi_scale


def _mlp_from_sigma0(spec: SphereMLPSpec, s12: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor):
    """The MLP recursion on input kernels ``s12`` with input variances ``v1``, ``v2`` (broadcast)."""
    sw2, sb2, sr2 = spec.sigma_w**2, spec.sigma_b**2, spec.readout_sigma_w**2
    if spec.depth == 0:
        nngp = s12 * sr2 + sb2
        return nngp, nngp.clone()
    K, k1, k2 = s12 * sw2 + sb2, v1 * sw2 + sb2, v2 * sw2 + sb2
    theta = K.clone()
    for layer in range(spec.depth):
        f = gaussian_factors(spec.nonlin, K, k1, k2, theta)
        psi, dth = f.psi_core.mul_(f.psi_scale), f.dtheta_core.mul_(f.dtheta_scale)
        p1, p2 = _self_psi(spec.nonlin, k1), _self_psi(spec.nonlin, k2)
        s = sr2 if layer == spec.depth - 1 else sw2
        K, k1, k2 = psi * s + sb2, p1 * s + sb2, p2 * s + sb2
        theta = dth * s + K
    return K, theta


def sphere_mlp_kernel_fn(spec: SphereMLPSpec, x1, x2=None, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """NNGP and NTK ``[N1, N2]`` of ``build_sphere_mlp(spec, width)`` as width -> infinity."""
    x2 = x1 if x2 is None else x2
    s12 = sphere_inner_products(x1, x2, spec.L_in, device)
    v1 = sphere_inner_products(x1, x1, spec.L_in, device).diagonal()[:, None]
    v2 = sphere_inner_products(x2, x2, spec.L_in, device).diagonal()[None, :]
    return _mlp_from_sigma0(spec, s12, v1, v2)


def orbit_averaged_sphere_mlp_kernel(spec: SphereMLPSpec, x1, x2=None, B_q: int = 8, device=None
                                     ) -> Tuple[torch.Tensor, torch.Tensor]:
    """``Theta_G(x, x') = sum_a w_a Theta(x, R_a x')`` over the SOFT grid of bandwidth ``B_q`` (and the NNGP alike).

    ``R x'`` is ``rotate_signal(x', R)`` (band limit ``< L_in``; exact for band-limited
    inputs), so ``Sigma0(x, R x') = (1/C) sum_c sum_l sht(x)_l . D^l(R) sht(x')_l`` exactly,
    and its variance is the norm of the projected ``x'``. Quadrature error: see docs/so3.md.
    The rotated inner products are numpy on the CPU; the recursion runs on ``device``.
    """
    x2 = x1 if x2 is None else x2
    L = spec.L_in
    g = dh_grid(L)
    to_np = lambda x: np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
    c1, c2 = sht(to_np(x1), g, L - 1), sht(to_np(x2), g, L - 1)  # [N, C, L^2]
    grid = so3_grid(B_q)
    C = c1.shape[1]
    s12 = np.zeros((c1.shape[0], c2.shape[0], grid.size))
    for l, d in enumerate(grid.wigner(L - 1)):
        sl = degree_slice(l)
        rc2 = np.einsum("amn,jcn->jcam", d, c2[..., sl], optimize=True)
        s12 += np.einsum("icm,jcam->ija", c1[..., sl], rc2, optimize=True) / C
    v1 = sphere_inner_products(x1, x1, L, device).diagonal()[:, None, None]
    v2 = _t((c2**2).sum(axis=(1, 2)) / C, device)[None, :, None]
    nngp, ntk = _mlp_from_sigma0(spec, _t(s12, device), v1, v2)
    w = _t(grid.weights, device)
    return nngp @ w, ntk @ w
