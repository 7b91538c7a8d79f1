"""The pointwise nonlinearities of every finite model (docs/models.md); their kernel rules
(dual activations) are in ``analysis.kernel_nonlin``."""

from __future__ import annotations

import torch

NONLINEARITIES = ("relu", "erf", "identity")


def phi(kind: str, x: torch.Tensor) -> torch.Tensor:
    """The pointwise nonlinearity ``relu``, ``erf`` or ``identity``."""
    if kind == "relu":
        return torch.relu(x)
    if kind == "erf":
        return torch.erf(x)
    if kind == "identity":
        return x
    raise ValueError(f"nonlinearity: unknown {kind!r}; use {', '.join(NONLINEARITIES)}")
