"""Kernel matrices computed in blocks, as Ray tasks or locally, and assembled.

A kernel matrix over thousands of inputs is too slow for one process and often too big
for one call of the kernel engine. Here the inputs are cut into blocks of rows; each task
receives the model spec (a picklable pydantic model), the input shape, ``n_out`` and two
input blocks, builds the kernel engine for that spec (once per worker process) and
returns the block. A symmetric matrix (``x2 is None``) computes only the blocks on and above
the diagonal and fills the rest by transposition.

The engine is any callable with the signature of ``analysis.kernels.kernel_fn``:
``engine(spec, input_shape, n_out) -> KernelFn`` with
``KernelFn(x1, x2=None, get=(...)) -> {name: [N1, N2]}``. It is shipped to the workers by
pickling, so it must be importable there (a module-level function).

With ``num_gpus`` each task asks Ray for that share of a GPU and computes its block there
(``device="cuda"`` in the engine's call; Ray makes the GPU it grants the visible one).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import ray

from .kernels import kernel_fn

__all__ = ["blocked_kernel", "blocked_kernel_fn", "ensure_ray", "block_ranges", "gpu_share"]

_ENGINES: dict = {}  # per process: (engine, spec json, shape, n_out) -> KernelFn


def _default_engine(spec, input_shape, n_out):
    return kernel_fn(spec, input_shape, n_out)


def _engine_for(engine, spec, input_shape, n_out):
    # Building an engine can be costly (escnn samples its bases); a Ray worker process
    # serves many blocks of the same spec, so keep what it built.
    key = (engine, spec.model_dump_json(), tuple(input_shape), int(n_out))
    if key not in _ENGINES:
        _ENGINES[key] = (engine or _default_engine)(spec, tuple(input_shape), int(n_out))
    return _ENGINES[key]


def compute_block(engine, spec, input_shape, n_out, xa, xb, get, device=None) -> dict[str, np.ndarray]:
    """One block ``K(xa, xb)``; ``xb is None`` asks for the symmetric block ``K(xa, xa)``.
    ``device`` (when given) goes to the engine's call."""
    kf = _engine_for(engine, spec, input_shape, n_out)
    out = kf(xa, xb, get=tuple(get), **({} if device is None else {"device": device}))
    return {name: np.asarray(out[name], dtype=np.float64) for name in get}


def block_ranges(n: int, block_size: int) -> list[tuple[int, int]]:
    if block_size < 1:
        raise ValueError(f"block_size: must be at least 1, got {block_size}")
    return [(i, min(i + block_size, n)) for i in range(0, n, block_size)]


def ensure_ray(address: Optional[str] = None, num_cpus: Optional[int] = None) -> None:
    """Connect to Ray: the cluster at ``address``, or a local one started in this process.

    Does nothing when Ray is already initialised (the caller then owns its shutdown).
    """

    if ray.is_initialized():
        return
    kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
    if address is not None:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=num_cpus, **kwargs)


def gpu_share(num_gpus: float, use_ray: bool) -> tuple[float, Optional[str]]:
    """``(share of a GPU each task asks Ray for, device its engine computes on)``. On Ray, a
    cluster without GPUs gets ``(0, None)``: a task asking for a GPU there would wait forever."""
    if num_gpus <= 0 or (use_ray and not ray.cluster_resources().get("GPU")):
        return 0.0, None
    return num_gpus, "cuda"


def blocked_kernel(
    spec,
    input_shape: Sequence[int],
    n_out: int,
    x1,
    x2=None,
    *,
    get: Sequence[str] = ("nngp", "ntk"),
    block_size: int = 256,
    use_ray: bool = True,
    address: Optional[str] = None,
    engine: Optional[Callable] = None,
    num_gpus: float = 0,
) -> dict[str, np.ndarray]:
    """``{name: K(x1, x2)}`` (``[N1, N2]``, float64) assembled from blocks.

    ``x2 is None`` computes the symmetric ``K(x1, x1)`` from its upper blocks only.
    ``use_ray=False`` runs the same blocks one after another in this process.
    ``num_gpus``: the share of a GPU each Ray task asks for and computes on (0: the CPU;
    without Ray, any share means this process's GPU).
    """
    get = tuple(get)
    x1 = np.asarray(x1, dtype=np.float64)
    sym = x2 is None
    x2a = x1 if sym else np.asarray(x2, dtype=np.float64)
    rows, cols = block_ranges(len(x1), block_size), block_ranges(len(x2a), block_size)
    pairs = [(i, j) for i in range(len(rows)) for j in range(len(cols)) if not sym or j >= i]
    out = {name: np.empty((len(x1), len(x2a))) for name in get}

    def place(i, j, block):
        (r0, r1), (c0, c1) = rows[i], cols[j]
        for name in get:
            out[name][r0:r1, c0:c1] = block[name]
            if sym and i != j:
                out[name][c0:c1, r0:r1] = block[name].T

    def args(i, j, a_blocks, b_blocks):
        # a diagonal block of a symmetric matrix is itself a symmetric call
        return a_blocks[i], (None if sym and i == j else b_blocks[j])

    if not use_ray:
        _, device = gpu_share(num_gpus, use_ray=False)
        a_blocks = [x1[r0:r1] for r0, r1 in rows]
        b_blocks = [x2a[c0:c1] for c0, c1 in cols]
        for i, j in pairs:
            place(i, j, compute_block(engine, spec, tuple(input_shape), n_out, *args(i, j, a_blocks, b_blocks), get,
                                      device))
        return out


    ensure_ray(address)
    num_gpus, device = gpu_share(num_gpus, use_ray=True)
    remote = ray.remote(num_cpus=1, num_gpus=num_gpus)(compute_block)
    # Each input block goes to the object store once, however many tasks read it.
    a_refs = [ray.put(x1[r0:r1]) for r0, r1 in rows]
    b_refs = a_refs if sym else [ray.put(x2a[c0:c1]) for c0, c1 in cols]
    pending = {
        remote.remote(engine, spec, tuple(input_shape), n_out, *args(i, j, a_refs, b_refs), get, device): (i, j)
        for i, j in pairs
    }
    while pending:  # assemble blocks as they finish, so the driver holds few at once
        done, _ = ray.wait(list(pending), num_returns=1)
        for ref in done:
            place(*pending.pop(ref), ray.get(ref))
    return out


def blocked_kernel_fn(
    *,
    block_size: int = 256,
    use_ray: bool = True,
    address: Optional[str] = None,
    engine: Optional[Callable] = None,
) -> Callable:
    """A drop-in for ``analysis.kernels.kernel_fn`` whose matrices are computed in blocks.

    ``blocked_kernel_fn(...)(spec, input_shape, n_out)(x1, x2=None, get=...)``. Other keyword
    arguments of the call (such as a diagonal mode) go straight to the engine, unblocked.
    """

    def factory(spec, input_shape, n_out):
        def kf(x1, x2=None, get=("nngp", "ntk"), **kwargs):
            if kwargs:
                return _engine_for(engine, spec, tuple(input_shape), n_out)(x1, x2, get=get, **kwargs)
            if isinstance(get, str):
                get = (get,)
            return blocked_kernel(
                spec, input_shape, n_out, x1, x2,
                get=get, block_size=block_size, use_ray=use_ray, address=address, engine=engine,
            )

        return kf

    return factory
