"""The analytic kernels of the study's SO(3) models (group SO3), with the call of ``analysis.kernels.KernelFn``.

``analysis.kernels.kernel_fn`` / ``mean_kernel_fn`` dispatch here for ``so3_gcnn`` and
``sphere_mlp`` (``ModelSpec.so3``). Each wraps ``analysis.kernel_so3`` for the
``study.sphere`` spec that ``study.spec.sphere_spec`` derives from the model spec (the same
one the workers build the finite model from):

- ``so3_gcnn``: ``so3_kernel_fn`` in the spec's ``kernel_mode`` (``grid`` by default: the
  kernel of the finite model as computed, aliasing included).
- ``sphere_mlp``: ``sphere_mlp_kernel_fn`` (the model's own kernel); its mean kernel under
  ``augmentation: random`` is the orbit average ``Theta_G(x, x') = int Theta(x, R x') dR``
  (``orbit_averaged_sphere_mlp_kernel``, SOFT quadrature of bandwidth ``ORBIT_B_Q``; docs/so3.md
  proves that the mean of randomly augmented linearised GD is kernel GD with ``Theta_G`` on
  the original data). ``orbit_quadrature_error`` measures that quadrature's error.

Everything float64; ``torch.get_num_threads()`` threads on a CPU, or on a GPU (``device``).
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch

from study.spec import ModelSpec, sphere_spec

from . import devices
from .kernel_so3 import (
    _mlp_from_sigma0,
    orbit_averaged_sphere_mlp_kernel,
    so3_kernel_fn,
    sphere_inner_products,
    sphere_mlp_kernel_fn,
)

__all__ = ["ORBIT_B_Q", "SO3KernelFn", "so3_study_kernel_fn", "orbit_quadrature_error"]

# SOFT bandwidth of the orbit average (8 B^3 = 4096 rotations). docs/so3.md measured its
# error at ~6e-6 (relu) and ~2e-5 (erf) of ||Theta(X, X)||, far below any ensemble's SE.
ORBIT_B_Q = 8
# Rows of x1 per block of the orbit average ([rows, N2, 8 B_q^3] float64 per tensor).
_ORBIT_BLOCK_BYTES = 32 * 2**20


def _np(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


class SO3KernelFn:
    """``kf(x1, x2=None, get=("nngp", "ntk"), block_size=None, diag=False) -> {name: array}``.

    ``kind``: ``so3_gcnn``, ``sphere_mlp`` or ``orbit_sphere_mlp`` (the orbit-averaged MLP kernel).
    """

    def __init__(self, spec, kind: str, mode: str = "grid", B_q: int = ORBIT_B_Q, description: str = "",
                 device=None):
        self.spec, self.kind, self.mode, self.B_q = spec, kind, mode, B_q
        self.description = description or kind
        self.device = device  # the default of every call (``analysis.devices.resolve_device``)

    def __repr__(self) -> str:
        return f"SO3KernelFn({self.description})"

    def _pair(self, x1, x2, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(NNGP, NTK) ``[N1, N2]`` for ``x2`` an array (``None``: ``x1`` with itself)."""
        if self.kind == "so3_gcnn":
            return so3_kernel_fn(self.spec, x1, x2, mode=self.mode, device=device)
        if self.kind == "sphere_mlp":
            return sphere_mlp_kernel_fn(self.spec, x1, x2, device=device)
        x2 = x1 if x2 is None else x2
        rows = max(1, _ORBIT_BLOCK_BYTES // (8 * 8 * self.B_q**3 * max(1, len(x2))))
        parts = [orbit_averaged_sphere_mlp_kernel(self.spec, x1[i:i + rows], x2, self.B_q, device=device)
                 for i in range(0, len(x1), rows)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def _paired(self, x1, x2, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(NNGP, NTK) ``[N]`` of the pairs ``(x1_i, x2_i)``."""
        if self.kind == "sphere_mlp":  # closed form per pair

            L = self.spec.L_in
            s = torch.stack([sphere_inner_products(a[None], b[None], L, device)[0, 0] for a, b in zip(x1, x2)])
            v1 = torch.stack([sphere_inner_products(a[None], a[None], L, device)[0, 0] for a in x1])
            v2 = torch.stack([sphere_inner_products(b[None], b[None], L, device)[0, 0] for b in x2])
            return _mlp_from_sigma0(self.spec, s, v1, v2)
        out = [self._pair(x1[i:i + 1], x2[i:i + 1], device) for i in range(len(x1))]
        return torch.cat([o[0].reshape(-1) for o in out]), torch.cat([o[1].reshape(-1) for o in out])

    def __call__(self, x1, x2=None, get: Sequence[str] = ("nngp", "ntk"), block_size: Optional[int] = None,
                 diag: bool = False, device=None) -> dict[str, np.ndarray]:
        get = (get,) if isinstance(get, str) else tuple(get)
        device = devices.resolve_device(self.device if device is None else device)
        x1 = _np(x1)
        with torch.no_grad():
            if diag:
                x2 = x1 if x2 is None else _np(x2)
                if len(x1) != len(x2):
                    raise ValueError(f"diag: x1 and x2 must pair up, got {len(x1)} and {len(x2)} inputs")
                nngp, ntk = self._paired(x1, x2, device)
            else:
                nngp, ntk = self._pair(x1, None if x2 is None else _np(x2), device)
        out = {"nngp": nngp, "ntk": ntk}
        return {g: devices.to_host(out[g]) for g in get}

    def diag(self, x, get: Sequence[str] = ("nngp", "ntk"), block_size: Optional[int] = None, device=None):
        return self(x, None, get=get, diag=True, device=device)


def so3_study_kernel_fn(spec: ModelSpec, input_shape: Sequence[int], n_out: int = 1, *,
                        orbit_average: bool = False, B_q: int = ORBIT_B_Q, device=None) -> SO3KernelFn:
    """The kernel of an SO(3) model; ``orbit_average`` (``sphere_mlp`` only): its SO(3) orbit average.
    ``device``: where its calls compute by default."""
    s = sphere_spec(spec, tuple(int(d) for d in input_shape), n_out)
    if spec.arch == "so3_gcnn":
        mode = spec.kernel_mode or "grid"
        return SO3KernelFn(s, "so3_gcnn", mode, description=f"{spec.name}: so3_gcnn, {mode} mode", device=device)
    if orbit_average:
        return SO3KernelFn(s, "orbit_sphere_mlp", B_q=B_q,
                           description=f"{spec.name}: sphere_mlp orbit-averaged over SO(3), B_q={B_q}", device=device)
    return SO3KernelFn(s, "sphere_mlp", description=f"{spec.name}: sphere_mlp", device=device)


def orbit_quadrature_error(spec: ModelSpec, x, n_out: int = 1, B_q: int = ORBIT_B_Q) -> float:
    """Estimated error of the orbit-averaged NTK on ``x`` at ``B_q``: ``||Theta_G(B_q) - Theta_G(B_q + 2)|| / ||Theta_G||``
    (Frobenius). The error falls about as ``B_q^-4`` (docs/so3.md), so this is about 0.6 of
    the error at ``B_q``."""
    shape = np.asarray(x).shape[1:]
    a = so3_study_kernel_fn(spec, shape, n_out, orbit_average=True, B_q=B_q)(x, get=("ntk",))["ntk"]
    b = so3_study_kernel_fn(spec, shape, n_out, orbit_average=True, B_q=B_q + 2)(x, get=("ntk",))["ntk"]
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
