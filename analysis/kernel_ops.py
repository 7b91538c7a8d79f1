"""Tensor operations the kernel rules are built from (float64 torch, any leading batch dims).

Spatial conventions (docs/models.md, torch's ``conv2d``): a ``k x k`` filter reads offsets
``delta`` in ``[-lo, hi]`` per axis with ``lo = (k-1)//2``, ``hi = k//2``. ``circular`` and
``zero`` keep the grid size; ``valid`` output position ``i`` is input position ``i + lo``
(each layer shrinks the grid by ``k - 1``). Group elements act on offsets through the same
pixel map ``R_g`` as ``study.groups.Group`` acts on images.
"""

from __future__ import annotations

import copy
from functools import lru_cache
from itertools import product

import numpy as np
import torch
import torch.nn.functional as F

from study.groups import Group

from . import kernel_scratch as scratch

__all__ = [
    "offsets",
    "out_size",
    "patches",
    "window_rotations",
    "axis_maps",
    "diagonal_shift_sum",
    "tap_weighted_shift_sum",
    "TorusCorrelation",
]


def offsets(k: int) -> tuple[int, int]:
    """``(lo, hi)``: a filter of size ``k`` reads offsets ``-lo .. hi``."""
    return (k - 1) // 2, k // 2


def out_size(n: int, k: int, padding: str) -> int:
    if padding != "valid":
        return n
    if n - k + 1 < 1:
        raise ValueError(f"kernel_size: valid {k}x{k} convolutions shrink the grid to nothing (size {n}); "
                         "use fewer layers, larger inputs or padding")
    return n - k + 1


def patches(x: torch.Tensor, k: int, padding: str) -> torch.Tensor:
    """``[N, C, H, W] -> [N, C, k*k, H', W']`` with ``out[n, c, t, i, j] = x_c((i, j) + delta_t)``.

    Patch index ``t = a * k + b`` is the filter tap ``(a, b)``, offset ``(a - lo, b - lo)``.
    """
    lo, hi = offsets(k)
    if padding == "circular":
        x = F.pad(x, (lo, hi, lo, hi), mode="circular")
    elif padding == "zero":
        x = F.pad(x, (lo, hi, lo, hi))
    elif padding != "valid":
        raise ValueError(f"padding: unknown {padding!r}")
    u = x.unfold(2, k, 1).unfold(3, k, 1)  # [N, C, H', W', k, k]
    n, c, h, w = u.shape[:4]
    return u.permute(0, 1, 4, 5, 2, 3).reshape(n, c, k * k, h, w)


@lru_cache(maxsize=None)
def window_rotations(group: Group, k: int) -> np.ndarray:
    """``rot[g, t]``: the tap at offset ``R_g delta_t`` (``[|G|, k*k]``).

    ``L_g`` moves the value at offset ``delta`` to ``R_g delta`` (``(L_g x)(R_g d) = x(d)``).
    """
    idx = np.arange(k * k).reshape(k, k)
    rot = np.empty((group.order, k * k), dtype=np.int64)
    for g in range(group.order):
        moved = np.asarray(group.act_image(idx, g)).reshape(-1)
        rot[g] = np.argsort(moved)  # moved[rot[g, t]] = t
    return rot


@lru_cache(maxsize=None)
def axis_maps(group: Group) -> tuple[tuple[tuple[int, int], tuple[int, int]], ...]:
    """For each element ``g``: ``R_g e_row = s0 e_{a0}``, ``R_g e_col = s1 e_{a1}`` as ``((a0, s0), (a1, s1))``."""
    rot = window_rotations(group, 3)
    maps = []
    for g in range(group.order):
        pair = []
        for t in (7, 5):  # offsets (1, 0) and (0, 1) in a 3x3 window (centre 4)
            r, c = divmod(int(rot[g, t]), 3)
            d = (r - 1, c - 1)
            axis = 0 if d[0] != 0 else 1
            pair.append((axis, int(d[axis])))
        maps.append(tuple(pair))
    return tuple(maps)


def _segments(n_in: int, n_out: int, d: int, padding: str, base: int) -> list[tuple[int, int, int]]:
    """``(out_start, in_start, length)`` runs of ``out[i] += in[i + base + d]`` along one axis.

    ``base`` is ``lo`` for ``valid`` (output i is input i + lo) and 0 otherwise; circular
    wraps around, zero padding drops what falls outside.
    """
    if padding == "valid":
        return [(0, base + d, n_out)]
    if d >= 0:
        runs = [(0, d, n_in - d)]
        if d and padding == "circular":
            runs.append((n_in - d, 0, d))
    else:
        runs = [(-d, 0, n_in + d)]
        if padding == "circular":
            runs.append((0, n_in + d, -d))
    return [r for r in runs if r[2] > 0]


def diagonal_shift_sum(x: torch.Tensor, k: int, padding: str, ap: int, aq: int | None = None, sign: int = 1,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """``out[.., i, .., j, ..] = sum_{delta=-lo..hi} x[.., i + delta, .., j + sign * delta, ..]``.

    ``ap`` and ``aq`` are the axes shifted together (``aq=None``: only ``ap``); axes count
    from the end when negative. Out-of-grid entries are periodic (``circular``), zero
    (``zero``), or not produced (``valid``). Works by in-place adds of shifted sub-blocks,
    so nothing is padded or rolled; ``out`` may be given (for example a slice of a larger
    tensor).
    """
    lo, hi = offsets(k)
    ap = ap % x.ndim
    aq = None if aq is None else aq % x.ndim
    qlo = lo if sign > 0 else hi
    n_p = out_size(x.shape[ap], k, padding)
    shape = list(x.shape)
    shape[ap] = n_p
    if aq is not None:
        n_q = out_size(x.shape[aq], k, padding)
        shape[aq] = n_q
    if out is None:
        out = scratch.empty(shape, x.device)
    for i, d in enumerate([0] + [d for d in range(-lo, hi + 1) if d]):
        runs_p = _segments(x.shape[ap], n_p, d, padding, lo)
        runs_q = _segments(x.shape[aq], n_q, sign * d, padding, qlo) if aq is not None else [None]
        for op_, ip_, lp in runs_p:
            for rq in runs_q:
                o = out.narrow(ap, op_, lp)
                v = x.narrow(ap, ip_, lp)
                if rq is not None:
                    o = o.narrow(aq, rq[0], rq[2])
                    v = v.narrow(aq, rq[1], rq[2])
                if i == 0:
                    o.copy_(v)
                else:
                    o.add_(v)
    return out


def tap_weighted_shift_sum(x: torch.Tensor, weights: np.ndarray, padding: str, row_axes: tuple[int, ...],
                           col_axes: tuple[int, ...]) -> torch.Tensor:
    """``out = sum_{(a, b)} weights[a, b] x`` shifted by the tap's offset ``(a - lo, b - lo)``:
    every axis of ``row_axes`` by ``a - lo`` and every axis of ``col_axes`` by ``b - lo``.

    The per-tap form of two ``diagonal_shift_sum`` passes (rows, then columns), which need
    equal weights on every tap: for a right-invariant kernel ``[.., H, W, H, W]`` with
    ``row_axes = (-4, -2)``, ``col_axes = (-3, -1)`` it is
    ``out(p, q) = sum_t w_t x(p + delta_t, q + delta_t)``; for ``positions`` ``[.., H, W]`` use
    ``(-2,)`` and ``(-1,)``. Padding as ``diagonal_shift_sum``; taps of weight 0 cost nothing.
    """
    k = weights.shape[0]
    lo, _ = offsets(k)
    row_axes = tuple(a % x.ndim for a in row_axes)
    col_axes = tuple(a % x.ndim for a in col_axes)
    shape = list(x.shape)
    for a in row_axes + col_axes:
        shape[a] = out_size(x.shape[a], k, padding)
    out = scratch.empty(shape, x.device).zero_()
    for a, b in product(range(k), range(k)):
        w = float(weights[a, b])
        if w == 0.0:
            continue
        moves = [(ax, a - lo) for ax in row_axes] + [(ax, b - lo) for ax in col_axes]
        runs = [_segments(x.shape[ax], shape[ax], d, padding, lo) for ax, d in moves]
        for blocks in product(*runs):
            o, v = out, x
            for (ax, _), (o_start, i_start, length) in zip(moves, blocks):
                o, v = o.narrow(ax, o_start, length), v.narrow(ax, i_start, length)
            o.add_(v, alpha=w)
    return out


_MAX_SPECTRUM_BYTES = 3 * 2**30


class TorusCorrelation:
    """A multi-channel 4D correlation over pairs of positions ``(p, q)``, by FFT.

    ``out[h](p, q) = sum_{c, t, t'} w[h, c, t, t'] * M[c](p + delta_t, q + delta_t')`` with
    ``M [*, c, H, W, H, W]`` and ``w [h, c, k*k, k*k]``; padding as in the module docstring.
    The FFT runs on a torus large enough that nothing wraps where it must not.
    """

    def __init__(self, w: np.ndarray, k: int, padding: str, height: int, width: int):
        lo, hi = offsets(k)
        self.k, self.padding = k, padding
        self.h_in, self.w_in = height, width
        self.h_out, self.w_out = out_size(height, k, padding), out_size(width, k, padding)
        extra = lo + hi if padding == "zero" else 0  # zero padding: room for the zeros
        self.sizes = (height + extra, width + extra, height + extra, width + extra)
        shift = lo if padding == "valid" else 0  # valid output i reads input i + lo + delta
        n_out, n_in = w.shape[:2]
        n_freq = self.sizes[0] * self.sizes[1] * self.sizes[2] * (self.sizes[3] // 2 + 1)
        need = 16 * n_out * n_in * n_freq
        if need > _MAX_SPECTRUM_BYTES:
            raise MemoryError(
                f"the filter spectrum of this layer needs {need / 2**30:.1f} GiB ({n_out} x {n_in} channels on a "
                f"{self.sizes} torus). Without right invariance the channels are pairs of group elements; "
                "a basis whose covariance is right invariant needs |G| times fewer (see analysis.stax.right_invariant)"
            )
        torus = np.zeros((n_out, n_in) + self.sizes)
        tap = np.arange(k)
        rows = (tap - lo + shift) % self.sizes[0]
        cols = (tap - lo + shift) % self.sizes[1]
        wr = w.reshape(n_out, n_in, k, k, k, k)
        torus[np.ix_(range(n_out), range(n_in), rows, cols, rows, cols)] = wr
        spectrum = torch.fft.rfftn(torch.from_numpy(torus), dim=(-4, -3, -2, -1))
        # correlation = product with the conjugate spectrum; channels last-but-one for bmm
        self.n_freq = int(np.prod(spectrum.shape[2:]))
        self.freq_shape = spectrum.shape[2:]
        self.spectrum = spectrum.conj().reshape(n_out, n_in, self.n_freq).permute(2, 0, 1).contiguous()

    def to(self, device: torch.device) -> "TorusCorrelation":
        """The same correlation with its spectrum on ``device``."""
        moved = copy.copy(self)
        moved.spectrum = self.spectrum.to(device)
        return moved

    def __call__(self, m: torch.Tensor) -> torch.Tensor:
        batch = m.shape[:-5]
        n_in = m.shape[-5]
        m = m.reshape(-1, n_in, self.h_in, self.w_in, self.h_in, self.w_in)
        if self.padding == "zero":
            ph, pw = self.sizes[0] - self.h_in, self.sizes[1] - self.w_in
            m = F.pad(m, (0, pw, 0, ph, 0, pw, 0, ph))
        spec = torch.fft.rfftn(m, dim=(-4, -3, -2, -1)).reshape(m.shape[0], n_in, self.n_freq)
        # [f, out, in] @ [f, in, b] -> [f, out, b]
        prod = torch.bmm(self.spectrum, spec.permute(2, 1, 0))
        n_out = prod.shape[1]
        prod = prod.permute(2, 1, 0).reshape(m.shape[0], n_out, *self.freq_shape)
        out = torch.fft.irfftn(prod, s=self.sizes, dim=(-4, -3, -2, -1))
        out = out[..., : self.h_out, : self.w_out, : self.h_out, : self.w_out]
        return out.reshape(*batch, n_out, self.h_out, self.w_out, self.h_out, self.w_out)
