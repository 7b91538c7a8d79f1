"""Analytic ensemble mean and variance for every model of a results directory.

For each (model, lr) the infinite-width prediction (``analysis.predict.predict_as_trained``)
at every logged step, on every orbit point of the training inputs and of every eval set, in
the order the workers log them (``study.groups``: row ``i |G| + g`` is ``L_g x_i``). All
sets go through one call, so the training kernel is decomposed once per model; rows of the
test kernel that are training inputs are copied from the training kernel, and invariant
models (GCNN, group MLP) are evaluated once per orbit after a check (``compute_theory``).

Only full-batch GD on the MSE has an analytic counterpart: a model trained with ``optimizer:
sgd`` or ``loss: cross_entropy`` gets a ``Theory`` with ``applicable`` false and no arrays,
and no kernel is computed for it (``no_counterpart``).

The prediction does not depend on the width, so it is computed once per (model, lr) and
cached as ``DIR/analysis/theory-<model>-<lr>.npz``. The cache key hashes the resolved spec,
the lr, the logged steps, the data digest and the source of the kernel engine, the
predictor and their inputs (``_code_digest``), so a changed study, data set or kernel code is
recomputed and nothing else is. Uncached predictions run in parallel processes on a CPU, or
one after another on a GPU when torch sees one and the study does not say ``device: cpu``
(``theory_device``): the kernels are float64 there too, equal to the CPU's up to rounding.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing as mp
import os
import pickle
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from study.atomic import atomic_savez
from study.config import StudyConfig
from study.data import StudyData
from study.spec import ModelSpec

from . import devices, kernels
from .kernel_so3_study import ORBIT_B_Q, orbit_quadrature_error
from .predict import Prediction, UnstableLearningRate, predict_as_trained

_FORMAT = 1  # bump when the cached arrays change meaning


@dataclass
class Theory:
    """Analytic predictions of one (model, lr): per eval set ``mean [T, n, |G|, n_out]`` and
    ``var [T, n, |G|]`` (shared by all outputs; NaN where there is no closed form)."""

    model: str
    lr: float
    steps: list[int]
    mean: dict[str, np.ndarray] = field(default_factory=dict)
    var: dict[str, np.ndarray] = field(default_factory=dict)
    error: Optional[str] = None  # why there is no prediction (e.g. lr above the stability bound)
    seconds: float = 0.0
    cached: bool = False
    applicable: bool = True  # false: the model's training has no analytic counterpart (SGD, cross-entropy)
    note: str = ""  # how the prediction was made where that needs saying (SO3: kernel, quadrature error)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def status(self) -> str:
        """``ok``, ``not applicable`` (no analytic counterpart) or ``unavailable`` (the computation failed)."""
        return "ok" if self.ok else ("unavailable" if self.applicable else "not applicable")


def no_counterpart(spec: ModelSpec) -> Optional[str]:
    """Why the NTK theory does not describe how ``spec`` is trained, or None when it does."""
    if spec.analytic:
        return None
    how = []
    if spec.optimizer != "gd":
        how.append(f"optimizer {spec.optimizer} (batch_size {spec.batch_size})")
    if spec.loss != "mse":
        how.append(f"loss {spec.loss}")
    return "no analytic counterpart: trained with " + " and ".join(how) + "; the theory is full-batch GD on the MSE"


def orbit_points(spec: ModelSpec, x: np.ndarray) -> np.ndarray:
    """``[n, ...] -> [n |G|, ...]``, row ``i |G| + g`` is ``L_g x_i`` under the model's group (docs/theory.md §1)."""
    return spec.group_obj.orbit_rows(np.asarray(x, dtype=np.float64))


# Source files whose code decides the analytic numbers: the kernel engine (every analysis
# module but the comparison and reporting ones), the predictor, this module, and what they
# read from study/ and workers/ (layer plans, group actions, filter bases).
_NOT_THEORY = {"__init__.py", "empirical.py", "compare.py", "jackknife.py", "summary.py", "verdicts.py", "plots.py",
               "report.py", "invariance.py", "regression.py", "regression_report.py"}
_THEORY_DEPS = ["study/architecture.py", "study/groups.py", "study/spec.py", "study/sphere.py", "study/bases.py"]


def _code_digest() -> str:
    # A change to any of them invalidates the cache (a recompute costs seconds, a stale cache a wrong report).
    h = hashlib.sha256()
    here = Path(__file__).parent
    files = sorted(p for p in here.glob("*.py") if p.name not in _NOT_THEORY)
    files += [here.parent / d for d in _THEORY_DEPS]
    for p in files:
        h.update(p.name.encode())
        h.update(p.read_bytes() if p.is_file() else b"")
    return h.hexdigest()[:16]


def cache_key(spec: ModelSpec, lr: float, steps: list[int], data_digest: str) -> str:
    text = json.dumps(
        dict(spec=spec.model_dump(mode="json"), lr=float(lr), steps=list(map(int, steps)), data=data_digest,
             code=_code_digest(), format=_FORMAT),
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(cache_dir: Path, model: str, lr: float) -> Path:
    return Path(cache_dir) / f"theory-{model}-{float(lr):g}.npz"


class _ReuseTrainKernel:
    """Wraps a kernel engine so that rows already in the training kernel are not recomputed.

    ``predict_as_trained`` asks for ``K(X, X)`` and then ``K(x_test, X)``; our test points
    contain the training inputs (the ``train`` set, and for full-orbit augmentation the whole
    augmented set), so those rows are copied from ``K(X, X)`` and only the others are computed.
    Same inputs, same kernel: this changes nothing but rounding.
    """

    def __init__(self, kernel_fn: Optional[Callable]):
        self.kernel_fn = kernel_fn or kernels.kernel_fn

    def __call__(self, spec, input_shape, n_out):
        base = self.kernel_fn(spec, input_shape, n_out)
        memory = {}  # the last symmetric K(X, X): row bytes -> index, X bytes, results

        def rows(x):
            return [r.tobytes() for r in np.ascontiguousarray(x, dtype=np.float64).reshape(len(x), -1)]

        def kf(x1, x2=None, get=("nngp", "ntk"), diag=False, **kwargs):
            get = (get,) if isinstance(get, str) else tuple(get)
            if x2 is None and not diag:
                out = base(x1, None, get=get, **kwargs)
                memory.clear()
                memory.update(index={r: i for i, r in enumerate(rows(x1))}, x=np.asarray(x1, np.float64).tobytes(),
                              k={n: np.asarray(out[n]) for n in get})
                return out
            known = memory and all(n in memory["k"] for n in get)
            if not known or (x2 is not None and np.asarray(x2, np.float64).tobytes() != memory["x"]):
                return base(x1, x2, get=get, diag=diag, **kwargs)
            where = np.array([memory["index"].get(r, -1) for r in rows(x1)])
            new = np.flatnonzero(where < 0)
            fresh = base(np.asarray(x1)[new], x2, get=get, diag=diag, **kwargs) if len(new) else None
            old = np.flatnonzero(where >= 0)
            out = {}
            for n in get:
                k = memory["k"][n]
                full = np.empty(len(x1)) if diag else np.empty((len(x1), k.shape[1]))
                full[old] = np.diag(k)[where[old]] if diag else k[where[old]]
                if len(new):
                    full[new] = fresh[n]
                out[n] = full
            return out

        return kf


def _predict(spec, data, x_test, lr, steps, kernel_fn, mean_kernel_fn):
    return predict_as_trained(spec, data.train_x, data.train_y, x_test, lr=lr, steps=steps,
                              kernel_fn=_ReuseTrainKernel(kernel_fn), mean_kernel_fn=mean_kernel_fn)


def theory_device(study_device: str) -> torch.device:
    """Where the analytic kernels of a study are computed: the GPU when torch sees one, unless
    the study says ``device: cpu``. A study that trained on GPUs (``device: cuda``) is still
    analysed on a machine without one, on its CPU."""
    return devices.resolve_device("cpu" if study_device == "cpu" else "auto")


# Orbit invariance of an equivariant model's prediction is checked to this relative accuracy
# (float64 kernels are invariant to ~1e-13; a real failure is of order one).
_INVARIANCE_RTOL = 1e-7


def compute_theory(spec: ModelSpec, data, lr: float, steps: list[int], kernel_fn: Optional[Callable] = None,
                   device=None) -> Theory:
    """Analytic predictions for ``spec`` trained with ``lr`` on ``data`` (a ``StudyData``).

    ``device``: where ``analysis.kernels`` computes the kernels (default: the CPU); a
    ``kernel_fn`` given instead of that engine is used as it is, wherever it computes.

    A GCNN or group MLP pools over the group, so its output, its kernels and hence its
    analytic mean and variance are the same at every point of an orbit: it is evaluated at
    one point per orbit, and the full orbit of the first input of each set confirms the
    invariance before the values are copied along the orbits (otherwise every orbit point is
    computed).
    """
    th = Theory(model=spec.name, lr=float(lr), steps=list(steps))
    if no_counterpart(spec):
        th.error, th.applicable = no_counterpart(spec), False
        return th
    sets = data.all_sets()
    order = spec.group_obj.order
    mean_kernel_fn = None if kernel_fn else partial(kernels.mean_kernel_fn, device=device)
    kernel_fn = kernel_fn or partial(kernels.kernel_fn, device=device)
    t0 = time.perf_counter()
    try:
        pred = None
        if spec.equivariant and order > 1:
            base = np.concatenate(list(sets.values()))
            probes = np.concatenate([orbit_points(spec, x[:1]) for x in sets.values()])
            p = _predict(spec, data, np.concatenate([base, probes]), lr, steps, kernel_fn, mean_kernel_fn)
            firsts = np.cumsum([0] + [len(x) for x in sets.values()])[:-1]
            if _invariant(p, len(base), firsts, order):
                pred = _along_orbits(p, len(base), order)
        if pred is None:
            x_test = np.concatenate([orbit_points(spec, x) for x in sets.values()])
            pred = _predict(spec, data, x_test, lr, steps, kernel_fn, mean_kernel_fn)
    except UnstableLearningRate as e:
        th.error = f"unstable learning rate: {e}"
    except Exception as e:  # a model the kernel engine cannot do must not stop the other models
        th.error = f"{type(e).__name__}: {e}".splitlines()[0]
    if th.error is None and spec.so3:
        th.note = _so3_note(spec, data)
    th.seconds = time.perf_counter() - t0
    if th.error:
        return th
    start = 0
    n_out = data.n_out
    for name, x in sets.items():
        n = len(x)
        rows = slice(start, start + n * order)
        th.mean[name] = pred.mean[:, rows].reshape(len(steps), n, order, n_out)
        th.var[name] = pred.variance[:, rows].reshape(len(steps), n, order)
        start += n * order
    return th


def _so3_note(spec: ModelSpec, data) -> str:
    """What an SO(3) model's prediction is: its kernel, and for random augmentation the measured
    quadrature error of the orbit average and why there is no variance."""
    if spec.arch == "so3_gcnn":
        return f"own kernel, {spec.kernel_mode or 'grid'} mode (SOFT B={spec.so3_grid}); mean and variance"
    if spec.augmentation == "none":
        return "own kernel; mean and variance"

    err = orbit_quadrature_error(spec, data.train_x, data.n_out)
    return (f"mean: kernel GD with the SO(3) orbit-averaged NTK (SOFT B_q={ORBIT_B_Q}, quadrature error "
            f"{err:.1e} of ||Theta_G(X, X)||); variance: no closed form under random augmentation (NaN)")


def _invariant(p, n_base: int, firsts, order: int) -> bool:
    """Whether the probes' orbit predictions (rows after ``n_base``) equal those at the probes themselves."""
    mean, var = p.mean, p.variance
    scale_m = np.sqrt(np.mean(mean[:, :n_base] ** 2)) + 1e-300
    scale_v = np.max(np.abs(var[:, :n_base])) + 1e-300
    for j, i in enumerate(firsts):
        orbit = slice(n_base + j * order, n_base + (j + 1) * order)
        if np.max(np.abs(mean[:, orbit] - mean[:, i:i + 1])) > _INVARIANCE_RTOL * scale_m:
            return False
        if np.max(np.abs(var[:, orbit] - var[:, i:i + 1])) > _INVARIANCE_RTOL * scale_v:
            return False
    return True


def _along_orbits(p, n_base: int, order: int):
    """One point per orbit -> every orbit point (row ``i |G| + g``), dropping the probes."""
    return Prediction(mean=np.repeat(p.mean[:, :n_base], order, axis=1),
                      variance=np.repeat(p.variance[:, :n_base], order, axis=1))


def _save(path: Path, key: str, th: Theory) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"key": np.array(key), "steps": np.array(th.steps), "seconds": np.array(th.seconds),
              "error": np.array(th.error or ""), "note": np.array(th.note)}
    for name in th.mean:
        arrays[f"mean__{name}"] = th.mean[name]
        arrays[f"var__{name}"] = th.var[name]
    atomic_savez(path, arrays)


def _load(path: Path, key: str, model: str, lr: float) -> Optional[Theory]:
    try:
        with np.load(path) as z:
            if str(z["key"]) != key:
                return None
            th = Theory(model=model, lr=float(lr), steps=[int(s) for s in z["steps"]],
                        error=str(z["error"]) or None, seconds=float(z["seconds"]), cached=True,
                        note=str(z["note"]) if "note" in z.files else "")
            for k in z.files:
                if k.startswith("mean__"):
                    th.mean[k[6:]] = z[k]
                elif k.startswith("var__"):
                    th.var[k[5:]] = z[k]
            return th
    except (OSError, KeyError, ValueError):
        return None  # missing or unreadable: recompute


def _cost_guess(spec: ModelSpec) -> float:
    # Kernel cost grows with the spatial pair count and, for full-orbit augmentation, with the
    # |G|^2 larger training kernel; used only to start the slowest jobs first.
    return (100.0 if spec.spatial else 1.0) * (spec.group_obj.order ** 2 if spec.augmentation != "none" else 1.0)


def _worker_init(threads: int) -> None:
    torch.set_num_threads(threads)


def _compute_job(args) -> Theory:
    spec, data, lr, steps, kernel_fn = args
    return compute_theory(spec, data, lr, steps, kernel_fn=kernel_fn)  # CPU workers


def study_theory(cfg: StudyConfig, steps: list[int], data_digest: str, load_data: Callable[[], StudyData],
                 cache_dir: Path, kernel_fn: Optional[Callable] = None, log=print,
                 workers: Optional[int] = None, device=None) -> dict[tuple[str, float], Theory]:
    """``{(model, lr): Theory}`` for every model and lr of ``cfg`` at the logged ``steps``, from
    the cache in ``cache_dir`` when valid (keyed by ``data_digest``); ``load_data()`` gives the
    study's arrays when something must be computed.

    Predictions not in the cache are computed in ``workers`` processes (default: one per CPU,
    at most one per job); the kernel engine must then be picklable, otherwise they are
    computed here one after another. On a GPU (``device``, default ``theory_device(cfg.device)``)
    they are computed here one after another, each on the whole GPU. A failure that depends on the study (an unstable lr)
    is cached like a result; any other failure is not, so a fixed kernel engine is retried.
    A model without an analytic counterpart (``no_counterpart``) is neither computed nor cached.
    """
    steps, digest = list(steps), data_digest
    result, todo = {}, []
    for spec in cfg.model_specs:
        for lr in cfg.lrs_of(spec.name):
            if no_counterpart(spec):  # nothing to compute or cache
                result[(spec.name, float(lr))] = Theory(model=spec.name, lr=float(lr), steps=list(steps),
                                                        error=no_counterpart(spec), applicable=False)
                continue
            key = cache_key(spec, lr, steps, digest)
            th = _load(cache_path(cache_dir, spec.name, lr), key, spec.name, lr)
            if th is None:
                todo.append((spec, float(lr), key))
            result[(spec.name, float(lr))] = th
    if not todo:
        return result
    data = load_data()
    todo.sort(key=lambda job: -_cost_guess(job[0]))
    device = torch.device(device) if device is not None else theory_device(cfg.device)
    on_gpu = kernel_fn is None and device.type != "cpu"
    cpus = os.cpu_count() or 1
    workers = 1 if on_gpu else min(workers or cpus, len(todo))
    if workers > 1:
        try:
            pickle.dumps(kernel_fn)
        except Exception:
            workers = 1

    def finish(spec, lr, key, th):
        if th.ok or th.error.startswith("unstable"):
            _save(cache_path(cache_dir, spec.name, lr), key, th)
        log(f"theory {spec.name} lr={lr:g}: " + (f"{th.seconds:.1f} s" if th.ok else th.error)
            + (f" on {device}" if on_gpu and th.ok else "")
            + (f" ({th.note})" if th.note else ""))
        result[(spec.name, lr)] = th

    if workers <= 1:
        for spec, lr, key in todo:
            finish(spec, lr, key, compute_theory(spec, data, lr, steps, kernel_fn=kernel_fn,
                                                 device=device if on_gpu else None))
        return result
    # spawn: a fresh interpreter per worker, never a fork of a process that holds torch or Ray threads
    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_init,
                             initargs=(max(1, cpus // workers),)) as pool:
        futures = [(job, pool.submit(_compute_job, (job[0], data, job[1], steps, kernel_fn))) for job in todo]
        for (spec, lr, key), fut in futures:
            finish(spec, lr, key, fut.result())
    return result
