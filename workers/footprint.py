"""What a work unit needs in memory, predicted before anything is built at its size.

A model's parameter count is a polynomial of degree at most 2 in its width: weights between
two hidden layers grow as width^2 (for group layers, fields x fields x basis size), those
next to the input or the readout and the biases linearly, and the rest not at all. Three
small builds (widths 1, 2, 3) therefore fix it exactly, and it is evaluated at any width
without allocating a parameter.

A unit keeps, per member, its parameters, their gradients and the vectorised backward's
cotangents (``workers.ensemble``): about three copies of the parameters in the unit's dtype.
Activations are computed in chunks within a fixed working-memory budget
(``ensemble.CPU_MEMORY_BUDGET``), added once.
"""

from __future__ import annotations

import os
from functools import lru_cache

from study.spec import ModelSpec

from .ensemble import CPU_MEMORY_BUDGET
from .models import build_model

PARAMETER_COPIES = 3  # parameters, gradients, backward cotangents
_ITEMSIZE = {"float32": 4, "float64": 8}


@lru_cache(maxsize=None)
def _quadratic(spec: ModelSpec, input_shape: tuple, n_out: int) -> tuple[int, int, int]:
    """``(a, b, c)`` with ``parameters(width) = a + b width + c width^2`` (exact: three builds)."""
    p1, p2, p3 = (sum(p.numel() for p in build_model(spec, w, input_shape, n_out).parameters()) for w in (1, 2, 3))
    c2 = p3 - 2 * p2 + p1  # = 2c
    b = p2 - p1 - 3 * c2 // 2
    return p1 - b - c2 // 2, b, c2 // 2


def parameter_count(spec: ModelSpec, width: int, input_shape: tuple, n_out: int) -> int:
    """The number of parameters of one member of ``spec`` at ``width``."""
    a, b, c = _quadratic(spec, tuple(input_shape), int(n_out))
    return a + b * int(width) + c * int(width) ** 2


def member_bytes(spec: ModelSpec, width: int, input_shape: tuple, n_out: int, dtype: str) -> int:
    """What each member adds to a unit: its parameter copies."""
    return PARAMETER_COPIES * parameter_count(spec, width, input_shape, n_out) * _ITEMSIZE[dtype]


def unit_bytes(spec: ModelSpec, width: int, members: int, input_shape: tuple, n_out: int, dtype: str) -> int:
    """Predicted memory of a unit of ``members`` members at ``width``: the parameter copies
    and the working-memory budget of its chunked forward and backward passes."""
    return members * member_bytes(spec, width, input_shape, n_out, dtype) + CPU_MEMORY_BUDGET


def members_fitting(spec: ModelSpec, width: int, input_shape: tuple, n_out: int, dtype: str, available: int) -> int:
    """The most members at ``width`` whose unit fits in ``available`` bytes (0: not even one)."""
    return max(0, (available - CPU_MEMORY_BUDGET) // member_bytes(spec, width, input_shape, n_out, dtype))


def machine_bytes() -> int:
    """This machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
