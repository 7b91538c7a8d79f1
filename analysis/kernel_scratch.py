"""Recycled float64 buffers for the big temporaries of the kernel rules.

The rules make a few memory-bound passes per layer over blocks sized to stay in cache. A
fresh multi-megabyte tensor costs more than the pass that fills it (glibc hands such blocks
back to the OS when they are freed, and the first touch of every page faults: measured
2-3 ms per 8 MB tensor against 0.6-1 ms for an elementwise pass), so dead buffers go to a
per-thread free list and are handed out again.

Only a tensor whose storage nothing else references may be recycled; ``recycle`` is called
by the engine for dead states and by rules for their own temporaries. Buffers are kept per
device: a GPU buffer is only handed out again for the same GPU.
"""

from __future__ import annotations

import math
import threading

import torch

__all__ = ["empty", "recycle", "clear"]

_MAX_BYTES = 512 * 2**20  # per thread; beyond this, dead buffers are simply freed
_MIN_NUMEL = 2**14  # small tensors are cheap to allocate; not worth tracking
_local = threading.local()


def _state():
    if not hasattr(_local, "free"):
        _local.free, _local.bytes, _local.ptrs = {}, 0, set()
    return _local


def empty(shape, device: torch.device) -> torch.Tensor:
    """An uninitialised float64 tensor of ``shape`` (contiguous) on ``device``, recycled when possible."""
    shape = tuple(int(s) for s in shape)
    n = math.prod(shape)
    st = _state()
    bucket = st.free.get((torch.device(device), n))
    if bucket:
        base = bucket.pop()
        st.bytes -= 8 * n
        st.ptrs.discard(base.data_ptr())
        return base.view(shape)
    return torch.empty(shape, dtype=torch.float64, device=device)


def recycle(*tensors) -> None:
    """Hand back buffers that are dead (nothing else may use their storage afterwards)."""
    st = _state()
    for t in tensors:
        if t is None or t.dtype != torch.float64 or t.numel() < _MIN_NUMEL:
            continue
        base = t if t._base is None else t._base
        if not base.is_contiguous() or base.numel() != t.numel() or base.storage_offset() != 0:
            continue  # a view of part of something larger
        if base.data_ptr() in st.ptrs or st.bytes + 8 * base.numel() > _MAX_BYTES:
            continue  # already free (a tensor can be handed back under two names)
        st.free.setdefault((base.device, base.numel()), []).append(base)
        st.ptrs.add(base.data_ptr())
        st.bytes += 8 * base.numel()


def clear() -> None:
    """Drop this thread's free list."""
    st = _state()
    st.free.clear()
    st.ptrs.clear()
    st.bytes = 0
