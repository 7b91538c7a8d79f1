"""Finite SO(3) GCNNs on spherical signals, in NTK parameterisation (docs/so3.md).

Features after the lifting live on SO(3) and are held as Fourier coefficients: per channel
and degree ``l < L`` a matrix ``f^l [2l+1, 2l+1]``, packed row-major into one axis of
``fourier_size(L)`` entries (``study.sphere.fourier_slice``). The function they stand for is
``f(R) = sum_l sqrt(2l+1) sum_mn D^l_mn(R) f^l_mn`` (an orthonormal basis, so the mean of
``f^2`` over SO(3) is ``sum_l |f^l|_F^2``), and a rotation ``Q`` of the input acts by
``f^l -> D^l(Q) f^l``, i.e. ``f(R) -> f(Q^-1 R)``.

Layers (all weights N(0, 1); scale ``sigma_w / sqrt(C (2l+1))`` per degree, which makes each
layer a correlation with a white-noise filter, ``sigma_w / sqrt(C) sum_c <f_c, filter(R^-1 .)>``):

- ``SO3Lift``: ``f_o^l = sigma_w / sqrt(C (2l+1)) sum_c s_c^l (psi_{o,c}^l)^T`` from the SH
  coefficients ``s_c^l`` of the input (DH quadrature), plus ``sigma_b b_o`` on ``l = 0``.
  Then ``f_o(R) = sigma_w / sqrt(C) sum_c mean_x s_c(R x) psi_{o,c}(x)``, exactly equivariant.
- ``SO3Nonlin``: synthesis on the SOFT grid of bandwidth ``B``, pointwise ``phi``, analysis
  back to band limit ``L_out`` by SOFT quadrature. Equivariant only up to aliasing, which
  falls with ``B`` (measured in tests/test_so3_models.py); exactly equivariant for the
  rotations ``Rz(2 pi j / 2B)``, which permute the grid.
- ``SO3Conv``: ``f_o^l = sigma_w / sqrt(C (2l+1)) sum_c f_c^l psi_{o,c}^l`` with a
  ``[2l+1, 2l+1]`` matrix per ``(o, c, l)``: the general equivariant linear map between
  band-limited regular fields, i.e. a group convolution, exact for every rotation.
- ``SO3Pool``: ``sum_a w_a phi(f(R_a))`` (the ``l = 0`` coefficient of ``phi(f)``), then the
  dense ``NTKLinear`` readout.

Relation to escnn (``escnn.group.so3_group``): a packed ``f`` is an escnn feature of type
``so3.bl_regular_representation(L - 1)`` (``2l+1`` copies of irrep ``l``: the columns of
``f^l``), up to escnn's own basis of the irreps and its ``sqrt(2l+1)`` convention;
``SO3Conv`` is escnn's ``Linear`` on ``no_base_space(so3)`` between such types (whose
equivariant basis is exactly right multiplication by a free matrix per degree);
``SO3Nonlin`` is escnn's ``FourierPointwise`` with our SOFT grid instead of escnn's grids
(escnn has no SOFT grid; ours makes the forward transform exact and the weights known);
``SO3Lift`` is a ``Linear`` from ``bl_sphere_representation`` to ``bl_regular``. We keep plain
torch modules so that the kernel (``analysis.kernel_so3``) and the model share their
normalisation exactly.

The sphere-MLP baseline (``SphereMLP``) reads DH samples weighted by ``sqrt(n_pix w)``.
Everything defaults to float64.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from study.sphere import (
    SO3Spec,
    SphereMLPSpec,
    degree_slice,
    dh_grid,
    fourier_size,
    fourier_slice,
    so3_analysis,
    so3_grid,
    so3_synthesis,
    wigner_d,
)

from .pointwise import phi

__all__ = [
    "phi",
    "rotate_fourier",
    "SO3Lift",
    "SO3Nonlin",
    "SO3Conv",
    "SO3Pool",
    "NTKLinear",
    "SO3Net",
    "build_so3_model",
    "sphere_mlp_inputs",
    "SphereMLP",
    "build_sphere_mlp",
]


def _normal(*shape: int, generator: Optional[torch.Generator], dtype) -> nn.Parameter:
    return nn.Parameter(torch.randn(*shape, generator=generator, dtype=dtype))


def rotate_fourier(f: torch.Tensor, R, L: int) -> torch.Tensor:
    """The left action ``f^l -> D^l(R) f^l`` on packed coefficients ``[..., fourier_size(L)]``.

    ``R`` is one rotation ``[3, 3]`` (numpy or torch).
    """
    ds = wigner_d(L - 1, np.asarray(R, dtype=np.float64))
    parts = []
    for l, d in enumerate(ds):
        k = 2 * l + 1
        blk = f[..., fourier_slice(l)].reshape(*f.shape[:-1], k, k)
        parts.append((torch.as_tensor(d, dtype=f.dtype) @ blk).reshape(*f.shape[:-1], k * k))
    return torch.cat(parts, dim=-1)


class SO3Lift(nn.Module):
    """DH grid signals ``[N, C, 2L_in, 2L_in]`` -> packed SO(3) coefficients ``[N, width, fourier_size(L)]``."""

    def __init__(self, channels: int, width: int, L_in: int, L: int, sigma_w: float, sigma_b: float,
                 generator: Optional[torch.Generator] = None, dtype=torch.float64):
        super().__init__()
        self.C, self.width, self.L, self.sigma_w, self.sigma_b = channels, width, L, sigma_w, sigma_b
        g = dh_grid(L_in)
        wy = (g.harmonics(L - 1) * g.weights[..., None]).reshape(-1, L * L)
        self.register_buffer("wy", torch.as_tensor(wy, dtype=dtype), persistent=False)  # [n_pix, L^2]
        # psi^l_{o,c} in R^{2l+1}, all degrees packed: [width, C, L^2] (same layout as SH coefficients)
        self.weight = _normal(width, channels, L * L, generator=generator, dtype=dtype)
        self.bias = _normal(width, generator=generator, dtype=dtype)

    def coefficients(self, x: torch.Tensor) -> torch.Tensor:
        """SH coefficients ``[N, C, L^2]`` of the input by DH quadrature."""
        return x.reshape(*x.shape[:-2], -1) @ self.wy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.coefficients(x)
        parts = []
        for l in range(self.L):
            sl, k = degree_slice(l), 2 * l + 1
            scale = self.sigma_w / math.sqrt(self.C * k)
            f = torch.einsum("ncm,ocq->nomq", s[..., sl], self.weight[..., sl]) * scale
            parts.append(f.reshape(*f.shape[:2], k * k))
        out = torch.cat(parts, dim=-1)
        if self.sigma_b:
            out = torch.cat([out[..., :1] + self.sigma_b * self.bias[:, None], out[..., 1:]], dim=-1)
        return out


class SO3Nonlin(nn.Module):
    """``phi`` on the SOFT grid: ``[N, C, fourier_size(L_in)] -> [N, C, fourier_size(L_out)]``."""

    def __init__(self, L_in: int, L_out: int, B: int, nonlin: str, dtype=torch.float64):
        super().__init__()
        grid = so3_grid(B)
        self.nonlin = nonlin
        self.register_buffer("synth", torch.as_tensor(so3_synthesis(grid, L_in), dtype=dtype), persistent=False)
        self.register_buffer("anal", torch.as_tensor(so3_analysis(grid, L_out), dtype=dtype), persistent=False)

    def samples(self, f: torch.Tensor) -> torch.Tensor:
        """``f(R_a)`` at the grid points, ``[N, C, P]``."""
        return f @ self.synth

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return phi(self.nonlin, self.samples(f)) @ self.anal


class SO3Pool(SO3Nonlin):
    """``phi`` then the invariant mean ``sum_a w_a phi(f(R_a))``: ``[N, C, fourier_size(L)] -> [N, C]``."""

    def __init__(self, L_in: int, B: int, nonlin: str, dtype=torch.float64):
        super().__init__(L_in, 1, B, nonlin, dtype)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return super().forward(f)[..., 0]


class SO3Conv(nn.Module):
    """Group convolution in the Fourier domain: ``f_o^l = sigma_w / sqrt(C (2l+1)) sum_c f_c^l psi^l_{o,c}``."""

    def __init__(self, channels: int, width: int, L: int, sigma_w: float, sigma_b: float,
                 generator: Optional[torch.Generator] = None, dtype=torch.float64):
        super().__init__()
        self.C, self.L, self.sigma_w, self.sigma_b = channels, L, sigma_w, sigma_b
        self.weight = _normal(width, channels, fourier_size(L), generator=generator, dtype=dtype)
        self.bias = _normal(width, generator=generator, dtype=dtype)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        parts = []
        for l in range(self.L):
            sl, k = fourier_slice(l), 2 * l + 1
            fl = f[..., sl].reshape(*f.shape[:-1], k, k)
            wl = self.weight[..., sl].reshape(*self.weight.shape[:2], k, k)
            out = torch.einsum("ncmj,ocjq->nomq", fl, wl) * (self.sigma_w / math.sqrt(self.C * k))
            parts.append(out.reshape(*out.shape[:2], k * k))
        out = torch.cat(parts, dim=-1)
        if self.sigma_b:
            out = torch.cat([out[..., :1] + self.sigma_b * self.bias[:, None], out[..., 1:]], dim=-1)
        return out


class NTKLinear(nn.Module):
    """``sigma_w / sqrt(fan_in) W h + sigma_b b``."""

    def __init__(self, fan_in: int, fan_out: int, sigma_w: float, sigma_b: float,
                 generator: Optional[torch.Generator] = None, dtype=torch.float64):
        super().__init__()
        self.scale, self.sigma_b = sigma_w / math.sqrt(fan_in), sigma_b
        self.weight = _normal(fan_out, fan_in, generator=generator, dtype=dtype)
        self.bias = _normal(fan_out, generator=generator, dtype=dtype)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = (h @ self.weight.T) * self.scale
        return out + self.sigma_b * self.bias if self.sigma_b else out


class SO3Net(nn.Module):
    """Lift -> [nonlin, group conv] x depth -> nonlin + pool -> readout; ``[N, C, 2L_in, 2L_in] -> [N, outputs]``."""

    def __init__(self, spec: SO3Spec, width: int, generator: Optional[torch.Generator] = None,
                 dtype=torch.float64):
        super().__init__()
        s, b = spec, spec.bands
        self.spec, self.width = spec, width
        self.lift = SO3Lift(s.channels, width, s.L_in, b[0], s.sigma_w, s.sigma_b, generator, dtype)
        self.nonlins = nn.ModuleList(SO3Nonlin(b[k], b[k + 1], s.B, s.nonlin, dtype) for k in range(s.depth))
        self.convs = nn.ModuleList(
            SO3Conv(width, width, b[k + 1], s.sigma_w, s.sigma_b, generator, dtype) for k in range(s.depth)
        )
        self.pool = SO3Pool(b[-1], s.B, s.nonlin, dtype)
        self.readout = NTKLinear(width, s.outputs, s.readout_sigma_w, s.sigma_b, generator, dtype)

    def features(self, x: torch.Tensor) -> list:
        """Every layer's output, in order (lift, then nonlin/conv pairs, pool, readout)."""
        out = [self.lift(x)]
        for nl, conv in zip(self.nonlins, self.convs):
            out.append(nl(out[-1]))
            out.append(conv(out[-1]))
        out.append(self.pool(out[-1]))
        out.append(self.readout(out[-1]))
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.lift(x.to(self.readout.weight.dtype))  # inputs in the parameters' dtype, as workers.models.Network
        for nl, conv in zip(self.nonlins, self.convs):
            f = conv(nl(f))
        return self.readout(self.pool(f))


def build_so3_model(spec: SO3Spec, width: int, seed: Optional[int] = None, dtype=torch.float64) -> SO3Net:
    """The finite model of ``spec`` at ``width`` channels, weights N(0, 1) from ``seed``."""
    gen = None if seed is None else torch.Generator().manual_seed(int(seed))
    return SO3Net(spec, width, gen, dtype)


# ----- the MLP on the sampled sphere (augmentation baseline) --------------------------------
def sphere_mlp_inputs(x, L_in: int, dtype=torch.float64) -> torch.Tensor:
    """``[N, C, 2L, 2L]`` DH samples -> ``[N, C * 4L^2]`` with ``z = sqrt(n_pix w) x``.

    Then ``z . z' / (C n_pix) = (1/C) sum_c sum_x w_x x_c x'_c``, the quadrature inner product
    (exact, so rotation invariant, for inputs of band limit ``< L``).
    """
    return _weighted(torch.as_tensor(x, dtype=dtype), _sample_scale(L_in, dtype))


def _sample_scale(L_in: int, dtype) -> torch.Tensor:
    """``sqrt(n_pix w)`` on the DH grid of bandwidth ``L_in``, ``[2L, 2L]``."""
    g = dh_grid(L_in)
    return torch.as_tensor(np.sqrt(g.weights * g.weights.size), dtype=dtype)


def _weighted(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return (x.to(scale.dtype) * scale).flatten(-3)


class SphereMLP(nn.Module):
    """Dense NTK-parameterised MLP on ``sphere_mlp_inputs``: ``[N, C, 2L, 2L] -> [N, outputs]``.

    The input weights ``sqrt(n_pix w)`` are a buffer (cast with the module), so the forward is
    a pure function of parameters and input (``functional_call``/``vmap``, any device).
    """

    def __init__(self, spec: SphereMLPSpec, width: int, generator: Optional[torch.Generator] = None,
                 dtype=torch.float64):
        super().__init__()
        self.spec = spec
        d = spec.channels * (2 * spec.L_in) ** 2
        sizes: Sequence[int] = [d] + [width] * spec.depth
        self.hidden = nn.ModuleList(
            NTKLinear(sizes[i], sizes[i + 1], spec.sigma_w, spec.sigma_b, generator, dtype) for i in range(spec.depth)
        )
        self.readout = NTKLinear(sizes[-1], spec.outputs, spec.readout_sigma_w, spec.sigma_b, generator, dtype)
        self.register_buffer("scale", _sample_scale(spec.L_in, dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = _weighted(x, self.scale)  # [N, C 4L^2], as sphere_mlp_inputs
        for layer in self.hidden:
            h = phi(self.spec.nonlin, layer(h))
        return self.readout(h)


def build_sphere_mlp(spec: SphereMLPSpec, width: int, seed: Optional[int] = None, dtype=torch.float64) -> SphereMLP:
    gen = None if seed is None else torch.Generator().manual_seed(int(seed))
    return SphereMLP(spec, width, gen, dtype)
