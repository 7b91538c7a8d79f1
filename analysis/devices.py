"""Where the analytic kernels compute: ``resolve_device`` turns what a caller or a study asks
for into a torch device (the kernels are float64 on every device)."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["resolve_device", "to_host"]


def resolve_device(device) -> torch.device:
    """``None``/``"cpu"`` -> the CPU; ``"auto"`` -> the current GPU when torch sees one, else the
    CPU; ``"cuda"`` -> the current GPU (an error if there is none); any other torch device as
    given. A GPU gets its index, so that buffers kept per device match the tensors' devices."""
    if device is None:
        return torch.device("cpu")
    if str(device) == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device: cuda was asked for but torch sees no GPU; use auto or cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    return device


def to_host(t: torch.Tensor) -> np.ndarray:
    """A computed kernel as a numpy array in host memory (a copy from a GPU, a view on the CPU)."""
    return t.cpu().numpy()
