"""Gaussian expectations of the nonlinearities (docs/theory.md §2), elementwise in float64.

For ``(u, v)`` jointly Gaussian with ``E u^2 = v1``, ``E v^2 = v2``, ``E uv = k12``:
``psi = E[phi(u) phi(v)]`` and ``dpsi = E[phi'(u) phi'(v)]``; the NTK recursion needs
``psi`` and ``dpsi * theta``. ``v1`` and ``v2`` broadcast against ``k12`` and are much
smaller (the variances of one input each), so every factor that depends only on them is
computed on their outer product. The full-size work is a few passes over memory (these
kernels are memory bound): each result is ``core * scale`` with a full-size ``core`` and a
small ``scale``, so a following mean over the group can run before the scaling.
"""

from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch

from . import kernel_scratch as scratch

__all__ = ["Factors", "gaussian_factors", "gaussian_expectations"]

# acos has an infinite slope at +-1: a few ulps of rounding in cos (the same input computed
# through two summation orders) would move dpsi by ~1e-9. Scaling cos by (1 + _SNAP) before
# clipping to [-1, 1] makes everything within _SNAP of +-1 exactly +-1, so identical inputs get
# identical kernels however they were computed. Elsewhere it changes cos by 1e-14 relative;
# genuinely distinct features that close to parallel move by at most
# sqrt(2 _SNAP) / (2 pi) ~ 2e-8 in dpsi, the order of their own rounding sensitivity.
_SNAP = 1e-14


class Factors(NamedTuple):
    """``psi = psi_core * psi_scale``; ``dpsi * theta = dtheta_core * dtheta_scale`` (None without theta)."""

    psi_core: torch.Tensor
    psi_scale: object
    dtheta_core: Optional[torch.Tensor]
    dtheta_scale: object


def gaussian_factors(kind: str, k12: torch.Tensor, v1: torch.Tensor, v2: torch.Tensor,
                     theta: Optional[torch.Tensor] = None) -> Factors:
    """The factors of ``psi`` and ``dpsi * theta`` for ``kind`` in ``relu``, ``erf``, ``identity``.

    Cores are new tensors (``k12`` and ``theta`` are not modified); scales are tensors that
    broadcast against them, or floats.
    """
    if kind == "identity":
        return Factors(k12.clone(), 1.0, None if theta is None else theta.clone(), 1.0)
    if kind == "relu":
        return _relu(k12, v1, v2, theta)
    if kind == "erf":
        return _erf(k12, v1, v2, theta)
    raise ValueError(f"nonlinearity: unknown {kind!r}; use relu, erf or identity")


def gaussian_expectations(kind: str, k12, v1, v2, want_d: bool = True):
    """``(psi, dpsi)`` as full tensors (``dpsi`` None unless ``want_d``); for tests and small uses."""
    f = gaussian_factors(kind, k12, v1, v2, torch.ones_like(k12) if want_d else None)
    psi = f.psi_core.mul_(f.psi_scale)
    return psi, (f.dtheta_core.mul_(f.dtheta_scale) if want_d else None)


def _inv_sqrt(v: torch.Tensor) -> torch.Tensor:
    # A unit whose pre-activation variance is exactly 0 (an all-zero patch and no bias) is
    # the constant 0: relu(0) = 0 and torch's relu'(0) = 0, so its expectations vanish.
    return torch.where(v > 0, v.clamp(min=torch.finfo(v.dtype).tiny).rsqrt(), torch.zeros_like(v))


def _relu(k12, v1, v2, theta):
    # cos t = k12 / sqrt(v1 v2); with pm = pi - t = acos(-cos):
    #   psi = sqrt(v1 v2) / (2 pi) * (sin t + (pi - t) cos t),  dpsi = (pi - t) / (2 pi)
    neg_scale = (_inv_sqrt(v1) * (-(1.0 + _SNAP))) * _inv_sqrt(v2)
    ncos = torch.mul(k12, neg_scale, out=scratch.empty(k12.shape, k12.device)).clamp_(-1.0, 1.0)  # -cos t
    pm = torch.acos(ncos, out=scratch.empty(k12.shape, k12.device))
    psi = torch.sin(pm, out=scratch.empty(k12.shape, k12.device)).addcmul_(ncos, pm, value=-1.0)  # sin t + (pi - t) cos t
    scratch.recycle(ncos)
    psi_scale = (v1.sqrt() / (2 * math.pi)) * v2.sqrt()
    if theta is None:
        return Factors(psi, psi_scale, None, None)
    # Units of zero variance contribute nothing; one broadcast factor covers both cases
    # without reading values back (which would stall a GPU) and equals 1/(2 pi) exactly
    # where both variances are positive.
    alive = ((v1 > 0).to(k12.dtype) / (2 * math.pi)) * (v2 > 0).to(k12.dtype)
    return Factors(psi, psi_scale, pm.mul_(theta), alive)


def _erf(k12, v1, v2, theta):
    # With c = 2 k12 / sqrt(Q), Q = (1 + 2 v1)(1 + 2 v2):
    #   psi = (2/pi) asin(c),  dpsi = (4/pi) / sqrt(Q - 4 k12^2) = (2/pi) (2/sqrt(Q)) / sqrt(1 - c^2)
    r = (2.0 / torch.sqrt(1 + 2 * v1)) / torch.sqrt(1 + 2 * v2)
    c = torch.mul(k12, r, out=scratch.empty(k12.shape, k12.device)).clamp_(-1.0, 1.0)
    psi = torch.asin(c, out=scratch.empty(k12.shape, k12.device))
    if theta is None:
        scratch.recycle(c)
        return Factors(psi, 2 / math.pi, None, None)
    core = c.mul_(c).neg_().add_(1.0).rsqrt_().mul_(theta)
    return Factors(psi, 2 / math.pi, core, r * (2 / math.pi))
