"""Analytic NNGP and NTK of every model the study can build (docs/theory.md §2-§4, §6).

``kernel_fn(spec, input_shape, n_out)`` turns the model's layer plan into kernel rules
(``analysis.stax``) and returns a ``KernelFn``:

    kf = kernel_fn(spec, (1, 8, 8))
    kf(x1, x2)                      # {"nngp": [N1, N2], "ntk": [N1, N2]}, float64
    kf(x1, None, get=("ntk",))      # symmetric K(x1, x1), upper blocks only
    kf(x1, diag=True)               # K(x_i, x_i): [N1]; with x2: K(x1_i, x2_i)
    kf(x1, x2, device="cuda")       # the same on a GPU (float64 there too), numpy results

The kernel is that of one output unit (all outputs share it). Work proceeds over blocks of
input pairs so memory stays bounded: cache-sized blocks on parallel threads on a CPU, large
blocks one after another on a GPU. ``orbit_averaged`` gives the kernel of a network
trained with full-orbit augmentation, ``mean_kernel_fn`` picks the kernel the analytic
ensemble mean uses.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Sequence

import numpy as np
import torch

from study.architecture import layer_plan
from study.groups import Group
from study.spec import ModelSpec

from . import devices
from . import kernel_scratch as scratch
from .kernel_so3_study import so3_study_kernel_fn
from .stax import Pairs, build_rules, var_of

__all__ = ["KernelFn", "kernel_fn", "orbit_averaged", "mean_kernel_fn"]

# Bytes one kernel tensor of a block may take; a block holds a handful of such tensors
# (NNGP, NTK and the temporaries of a nonlinearity), so peak memory is several times this.
# On a CPU blocks stay in cache; a GPU needs large blocks to keep its cores busy, and its
# memory (tens of GB) holds a few tensors of 512 MB easily.
_BLOCK_BYTES = 8 * 2**20
_DEVICE_BLOCK_BYTES = 512 * 2**20
_MAX_DEVICE_SIDE = 8192  # inputs per side of a block on a GPU (512 on a CPU)


def _as_tensor(x, input_shape, name, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        t = x.detach().to(device, torch.float64)
    else:
        t = torch.from_numpy(np.asarray(x, dtype=np.float64)).to(device)
    if tuple(t.shape[1:]) != tuple(input_shape):
        raise ValueError(f"{name}: expected inputs of shape [N, {', '.join(map(str, input_shape))}], got {list(t.shape)}")
    return t.contiguous()


def _get(get) -> tuple[str, ...]:
    get = (get,) if isinstance(get, str) else tuple(get)
    bad = [g for g in get if g not in ("nngp", "ntk")]
    if bad or not get:
        raise ValueError(f"get: choose from 'nngp' and 'ntk', got {get!r}")
    return get


class KernelFn:
    """The analytic kernel of one model: ``kf(x1, x2=None, get=..., block_size=None, diag=False)``."""

    def __init__(self, rules, input_shape: tuple[int, ...], description: str = "", device=None):
        self.rules = rules
        self.input_shape = tuple(input_shape)
        self.description = description
        self.device = device  # the default of every call (resolved then): None is the CPU
        self._per_pair = max(r.meta_out.entries for r in rules)
        self._rules_on = {torch.device("cpu"): rules}

    def __repr__(self) -> str:
        return f"KernelFn({self.description})"

    # ----- block sizes --------------------------------------------------------------------
    def default_block_size(self, device=None) -> int:
        """Inputs per side of a block of pairs, from the memory budget of ``device`` (default CPU)."""
        return self._block_side(devices.resolve_device(device).type == "cpu")

    def _block_side(self, cpu: bool) -> int:
        pairs = max(1, (_BLOCK_BYTES if cpu else _DEVICE_BLOCK_BYTES) // (8 * self._per_pair))
        return int(max(1, min(512 if cpu else _MAX_DEVICE_SIDE, math.isqrt(pairs))))

    def _self_block(self, block_size: Optional[int], cpu: bool = True) -> int:
        if block_size is None:
            budget, cap = (_BLOCK_BYTES, 4096) if cpu else (_DEVICE_BLOCK_BYTES, _MAX_DEVICE_SIDE**2)
            return int(max(1, min(cap, budget // (8 * self._per_pair))))
        return max(1, block_size**2)

    def rules_on(self, device: torch.device) -> list:
        """The rules with their constant tensors on ``device`` (moved once, then kept)."""
        if device not in self._rules_on:
            self._rules_on[device] = [rule.to(device) for rule in self.rules]
        return self._rules_on[device]

    # ----- passes -------------------------------------------------------------------------
    def _run(self, x1, x2, outer: bool, want_ntk: bool, vars1=None, vars2=None, record: bool = False):
        """One pass over a block; ``record``: x1 is x2 paired, variances read off the state."""
        st = Pairs("input", outer, x1=x1, x2=x2)
        recorded = []
        i = 0
        for rule in self.rules_on(x1.device):
            if rule.uses_var:
                if record:
                    v = var_of(st)
                    recorded.append(v)
                    new = rule(st, want_ntk, v, v)
                else:
                    new = rule(st, want_ntk, vars1[i], vars2[i])
                i += 1
            else:
                new = rule(st, want_ntk)
            _recycle_dead(st, new)
            st = new
        return st, recorded

    def _self_pass(self, x: torch.Tensor, want_ntk: bool, block: int, workers: int):
        """Variances at every nonlinearity and the final kernels of ``(x_i, x_i)``."""
        starts = list(range(0, len(x), block))
        parts: list = [None] * len(starts)

        def work(i):
            xb = x[starts[i] : starts[i] + block]
            st, rec = self._run(xb, xb, False, want_ntk, record=True)
            parts[i] = (rec, st.nngp, st.ntk if want_ntk else None)

        _for_each(work, range(len(starts)), workers)
        n_var = sum(r.uses_var for r in self.rules)
        variances = [torch.cat([p[0][i] for p in parts]) for i in range(n_var)] if parts else []
        empty = torch.zeros(0, dtype=torch.float64, device=x.device)
        out = {"nngp": torch.cat([p[1] for p in parts]) if parts else empty}
        if want_ntk:
            out["ntk"] = torch.cat([p[2] for p in parts]) if parts else empty
        return variances, out

    # ----- the call -----------------------------------------------------------------------
    def __call__(self, x1, x2=None, get: Sequence[str] = ("nngp", "ntk"), block_size: Optional[int] = None,
                 diag: bool = False, device=None) -> dict[str, np.ndarray]:
        """``{name: K(x1, x2)}``, float64 ``[N1, N2]`` (``x2=None``: symmetric ``K(x1, x1)``);
        with ``diag=True`` ``K(x1_i, x1_i)`` (or ``K(x1_i, x2_i)``), ``[N1]``.

        ``block_size``: inputs per side of a block of pairs (default: as many as keep one
        kernel tensor of the block near 8 MB on a CPU, small enough to stay in cache, or
        512 MB on a GPU). On a CPU blocks run on ``torch.get_num_threads()`` worker threads
        with one torch thread each (set for the duration of the call, then restored); on a
        GPU one after another. ``device`` (default: this kernel's, else the CPU): where the
        kernels are computed, see ``analysis.devices.resolve_device``; the results are numpy arrays either way.
        """
        get = _get(get)
        want_ntk = "ntk" in get
        device = devices.resolve_device(self.device if device is None else device)
        cpu = device.type == "cpu"
        x1 = _as_tensor(x1, self.input_shape, "x1", device)
        sym = x2 is None
        x2 = x1 if sym else _as_tensor(x2, self.input_shape, "x2", device)
        sblock = self._self_block(block_size, cpu)
        threads = max(1, torch.get_num_threads())
        workers = threads if cpu else 1
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                if diag:
                    return self._diag(x1, None if sym else x2, get, want_ntk, sblock, workers)
                block = block_size or self._block_side(cpu)
                return self._matrix(x1, x2, sym, get, want_ntk, block, sblock, workers)
        finally:
            torch.set_num_threads(threads)
            scratch.clear()

    def diag(self, x, get: Sequence[str] = ("nngp", "ntk"), block_size: Optional[int] = None, device=None):
        """``K(x_i, x_i)`` for each input: ``{name: [N]}``."""
        return self(x, None, get=get, block_size=block_size, diag=True, device=device)

    def _diag(self, x1, x2, get, want_ntk, sblock, workers):
        if x2 is None:
            _, out = self._self_pass(x1, want_ntk, sblock, workers)
            return {g: devices.to_host(out[g]) for g in get}
        if len(x1) != len(x2):
            raise ValueError(f"diag: x1 and x2 must pair up, got {len(x1)} and {len(x2)} inputs")
        v1, _ = self._self_pass(x1, False, sblock, workers)
        v2, _ = self._self_pass(x2, False, sblock, workers)
        res = {g: np.empty(len(x1)) for g in get}

        def work(s):
            sl = slice(s, s + sblock)
            st, _ = self._run(x1[sl], x2[sl], False, want_ntk, [v[sl] for v in v1], [v[sl] for v in v2])
            for g in get:
                res[g][sl] = devices.to_host(getattr(st, g))

        _for_each(work, range(0, len(x1), sblock), workers)
        return res

    def _matrix(self, x1, x2, sym, get, want_ntk, block, sblock, workers):
        v1, _ = self._self_pass(x1, False, sblock, workers)
        v2 = v1 if sym else self._self_pass(x2, False, sblock, workers)[0]
        n1, n2 = len(x1), len(x2)
        res = {g: np.empty((n1, n2)) for g in get}
        jobs = [
            (slice(i, min(i + block, n1)), slice(j, min(j + block, n2)))
            for i in range(0, n1, block)
            for j in range(i if sym else 0, n2, block)
        ]

        def work(job):
            r, c = job
            st, _ = self._run(x1[r], x2[c], True, want_ntk, [v[r] for v in v1], [v[c] for v in v2])
            for g in get:
                b = devices.to_host(getattr(st, g))
                if sym and r == c:
                    b = 0.5 * (b + b.T)  # equal up to rounding; keep the matrix exactly symmetric
                res[g][r, c] = b
                if sym and r != c:
                    res[g][c, r] = b.T

        _for_each(work, jobs, workers)
        return res


def _recycle_dead(old: Pairs, new: Pairs) -> None:
    """Hand the old state's kernels to the scratch pool unless the new state still uses them."""
    keep = {t.untyped_storage().data_ptr() for t in (new.nngp, new.ntk, new.x1, new.x2) if t is not None}
    dead = [t for t in (old.nngp, old.ntk) if t is not None and t.untyped_storage().data_ptr() not in keep]
    scratch.recycle(*dead)


def _for_each(work, jobs, workers: int) -> None:
    """Run ``work`` on every job: blocks in parallel on worker threads.

    The rules are memory-bound passes over blocks small enough to stay in cache; whole
    blocks in parallel scale better than torch's intra-op threads, which also stall
    badly when the machine is shared (torch releases the GIL inside each operation).
    """
    jobs = list(jobs)
    workers = min(workers, len(jobs))
    pending = iter(jobs)
    lock = threading.Lock()

    def worker():
        try:
            while True:
                with lock:
                    job = next(pending, None)
                if job is None:
                    return
                work(job)
        finally:
            scratch.clear()

    if workers <= 1:
        worker()
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for f in [pool.submit(worker) for _ in range(workers)]:
            f.result()


def kernel_fn(spec: ModelSpec, input_shape: Sequence[int], n_out: int = 1, *, route: str = "auto",
              device=None) -> KernelFn:
    """The analytic kernel of ``spec`` itself (never orbit-averaged, whatever its augmentation).

    ``route`` (for checks): ``auto`` (fastest exact rules), ``basis`` (group layers through
    their basis covariance), ``basis_full`` (the same without right invariance). ``device``:
    where its calls compute by default (``KernelFn.__call__``).
    """
    input_shape = tuple(int(s) for s in input_shape)
    if spec.so3:  # built whole, not from a layer plan (study.architecture)
        return so3_study_kernel_fn(spec, input_shape, n_out, device=device)
    plan = layer_plan(spec, input_shape, n_out)
    rules = build_rules(plan, input_shape, spec.group_obj, route)
    return KernelFn(rules, input_shape, f"{spec.name}: {spec.arch}, route {route}", device)


class OrbitAveraged:
    """``Theta_G(x, x') = (1/|G|) sum_g Theta(x, L_g x')`` (docs/theory.md §1, §6), same call as ``KernelFn``.

    Equals the double average ``(1/|G|^2) sum_{g,g'} Theta(L_g x, L_g' x')`` when ``Theta`` is jointly
    invariant (MLPs; CNNs with rotation-invariant padding and readout).
    """

    def __init__(self, base, group: Group):
        self.base, self.group = base, group

    def __call__(self, x1, x2=None, get: Sequence[str] = ("nngp", "ntk"), block_size: Optional[int] = None,
                 diag: bool = False, device=None) -> dict[str, np.ndarray]:
        get = _get(get)
        where = {} if device is None else {"device": device}  # the base kernel's own default otherwise
        x1 = _to_numpy(x1)
        x2 = x1 if x2 is None else _to_numpy(x2)
        G = self.group.order
        orbit = self.group.orbit_rows(x2)  # [N2 |G|, ...], row j |G| + g is L_g x2_j
        if diag:
            if len(x1) != len(x2):
                raise ValueError(f"diag: x1 and x2 must pair up, got {len(x1)} and {len(x2)} inputs")
            out = self.base(np.repeat(x1, G, axis=0), orbit, get=get, block_size=block_size, diag=True, **where)
            return {g: out[g].reshape(len(x1), G).mean(1) for g in get}
        out = self.base(x1, orbit, get=get, block_size=block_size, **where)
        return {g: out[g].reshape(len(x1), len(x2), G).mean(-1) for g in get}

    def diag(self, x, get: Sequence[str] = ("nngp", "ntk"), block_size: Optional[int] = None, device=None):
        return self(x, None, get=get, block_size=block_size, diag=True, device=device)


def _to_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().to(torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def orbit_averaged(kernel_fn, group) -> OrbitAveraged:
    """The kernel of a model trained with full-orbit augmentation under ``group`` (name or ``Group``),
    for images or ring signals (``Group.orbit``)."""
    if isinstance(group, str):
        group = Group.parse(group)
    return OrbitAveraged(kernel_fn, group)


def mean_kernel_fn(spec: ModelSpec, input_shape: Sequence[int], n_out: int = 1, **kwargs):
    """The kernel of the analytic ensemble mean: orbit-averaged for an augmented ``mlp``/``cnn``
    (docs/theory.md §6), else the model's own kernel. A ``sphere_mlp`` with ``augmentation:
    random`` gets its SO(3) orbit average (``analysis.kernel_so3_study``; docs/so3.md)."""
    if spec.so3:
        return so3_study_kernel_fn(spec, input_shape, n_out, orbit_average=spec.augmentation != "none",
                                   device=kwargs.get("device"))
    kf = kernel_fn(spec, input_shape, n_out, **kwargs)
    if spec.arch in ("mlp", "cnn") and spec.augmentation != "none":
        return orbit_averaged(kf, spec.group_obj)
    return kf
