"""Finite-width kernels of the workers' models, to check the analytic kernels against.

For a network ``f`` with parameters ``theta`` drawn N(0, 1) (``workers.models``):

- empirical NTK: ``Theta_theta(x, x') = sum_p df(x)/dtheta_p df(x')/dtheta_p`` (output unit 0);
- NNGP: the covariance of the output over initialisations. It is estimated by its
  conditional expectation over the readout's weights and bias given the hidden layers,
  ``sw^2 <h(x), h(x')> / n + sb^2`` (``h`` the readout's input, ``n`` its fan-in): the same
  mean as ``f(x) f(x')``, without the readout's sampling noise, so the estimate converges
  like the NTK's (fluctuations O(1/sqrt(width n_init))) instead of O(1/sqrt(n_init)).

Both are averaged over initialisations; the standard errors are those of the means.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from .models import build_model, init_parameters

__all__ = ["EmpiricalKernels", "empirical_kernels"]


@dataclass(frozen=True)
class EmpiricalKernels:
    """Means over initialisations (``[N, N]``) and their standard errors."""

    nngp: np.ndarray
    ntk: np.ndarray
    nngp_se: np.ndarray
    ntk_se: np.ndarray
    n_init: int


def _readout(model):
    layer = model.layers[-1]
    return layer, layer.weight.shape[1]


def single_init(model, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """``(nngp estimate, empirical NTK)`` of one initialised model (float64), output unit 0."""
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for i in range(len(x)):
        out = model(x[i : i + 1])[0, 0]
        grads = torch.autograd.grad(out, params, allow_unused=True)
        rows.append(torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(grads, params)]))
    jac = torch.stack(rows)
    ntk = (jac @ jac.T).numpy()
    layer, fan_in = _readout(model)
    with torch.no_grad():
        h = model.features(x, upto=len(model.layers) - 1).reshape(len(x), -1)
    nngp = (layer.w_scale**2) * (h @ h.T).numpy()
    if layer.bias is not None:
        nngp = nngp + layer.sigma_b**2
    return nngp, ntk


def empirical_kernels(spec, width: int, input_shape: Sequence[int], x, seeds: Sequence[int]) -> EmpiricalKernels:
    """Mean finite-width NNGP and NTK of ``spec`` at ``width`` over the initialisations ``seeds``."""
    x = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    model = build_model(spec, width, tuple(input_shape), 1).double()
    nngps, ntks = [], []
    for seed in seeds:
        init_parameters(model, int(seed))
        a, b = single_init(model, x)
        nngps.append(a)
        ntks.append(b)
    nngps, ntks = np.stack(nngps), np.stack(ntks)
    n = len(seeds)
    se = (lambda s: s.std(0, ddof=1) / np.sqrt(n)) if n > 1 else (lambda s: np.full(s.shape[1:], np.nan))
    return EmpiricalKernels(nngps.mean(0), ntks.mean(0), se(nngps), se(ntks), n)
