"""Analytic ensemble mean and variance for every model of a results directory.

For each (model, lr) the infinite-width prediction (``analysis.predict.predict_as_trained``)
at every logged step, on every orbit point of the training inputs and of every eval set, in
the order the workers log them (``study.groups``: row ``i |G| + g`` is ``L_g x_i``). All
sets go through one call, so the training kernel is decomposed once per model.

The prediction does not depend on the width, so it is computed once per (model, lr) and
cached as ``DIR/analysis/theory-<model>-<lr>.npz``. The cache key hashes the resolved spec,
the lr, the logged steps, the data digest and the source of the kernel engine and the
predictor, so a changed study, data set or kernel code is recomputed and nothing else is.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from study.spec import ModelSpec
from study.store import ResultStore

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

    @property
    def ok(self) -> bool:
        return self.error is None


def orbit_points(spec: ModelSpec, x: np.ndarray) -> np.ndarray:
    """``[n, ...] -> [n |G|, ...]``, row ``i |G| + g`` is ``L_g x_i`` under the model's group."""
    grp = spec.group_obj
    x = np.asarray(x, dtype=np.float64)
    orbit = grp.orbit_image(x) if x.ndim == 4 else grp.orbit_ring(x)
    return orbit.reshape(len(x) * grp.order, *x.shape[1:])


def _code_digest() -> str:
    # The kernel engine and the predictor decide the numbers; a change to either invalidates the cache.
    h = hashlib.sha256()
    here = Path(__file__).parent
    for name in ("kernels.py", "predict.py"):
        p = here / name
        h.update(p.read_bytes() if p.is_file() else b"")
    return h.hexdigest()[:16]


def cache_key(spec: ModelSpec, lr: float, steps: list[int], data_digest: str) -> str:
    text = json.dumps(
        dict(spec=spec.model_dump(mode="json"), lr=float(lr), steps=list(map(int, steps)), data=data_digest,
             code=_code_digest(), format=_FORMAT),
        sort_keys=True,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_path(out: Path, model: str, lr: float) -> Path:
    return Path(out) / "analysis" / f"theory-{model}-{float(lr):g}.npz"


def compute_theory(spec: ModelSpec, data, lr: float, steps: list[int], kernel_fn: Optional[Callable] = None) -> Theory:
    """Analytic predictions for ``spec`` trained with ``lr`` on ``data`` (a ``StudyData``)."""
    from .predict import UnstableLearningRate, predict_as_trained

    sets = data.all_sets()
    order = spec.group_obj.order
    x_test = np.concatenate([orbit_points(spec, x) for x in sets.values()])
    th = Theory(model=spec.name, lr=float(lr), steps=list(steps))
    t0 = time.perf_counter()
    try:
        pred = predict_as_trained(spec, data.train_x, data.train_y, x_test, lr=lr, steps=steps, kernel_fn=kernel_fn)
    except UnstableLearningRate as e:
        th.error = f"unstable learning rate: {e}"
    except Exception as e:  # a model the kernel engine cannot do must not stop the other models
        th.error = f"{type(e).__name__}: {e}".splitlines()[0]
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


def _save(path: Path, key: str, th: Theory) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {"key": np.array(key), "steps": np.array(th.steps), "seconds": np.array(th.seconds),
              "error": np.array(th.error or "")}
    for name in th.mean:
        arrays[f"mean__{name}"] = th.mean[name]
        arrays[f"var__{name}"] = th.var[name]
    tmp = path.with_name("." + path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    tmp.replace(path)


def _load(path: Path, key: str, model: str, lr: float) -> Optional[Theory]:
    try:
        with np.load(path) as z:
            if str(z["key"]) != key:
                return None
            th = Theory(model=model, lr=float(lr), steps=[int(s) for s in z["steps"]],
                        error=str(z["error"]) or None, seconds=float(z["seconds"]), cached=True)
            for k in z.files:
                if k.startswith("mean__"):
                    th.mean[k[6:]] = z[k]
                elif k.startswith("var__"):
                    th.var[k[5:]] = z[k]
            return th
    except (OSError, KeyError, ValueError):
        return None  # missing or unreadable: recompute


def study_theory(out: Path, kernel_fn: Optional[Callable] = None, log=print) -> dict[tuple[str, float], Theory]:
    """``{(model, lr): Theory}`` for every model and lr of the study in ``out``, from the cache when valid.

    A failure that depends on the study (an unstable lr) is cached like a result; any other
    failure is not, so a fixed kernel engine is retried on the next run.
    """
    from study.config import StudyConfig

    out = Path(out)
    store = ResultStore(out)
    resolved = store.resolved_study()
    cfg = StudyConfig(**resolved["config"])
    steps = list(resolved["log_steps"])
    digest = resolved["data_digest"]
    data = None
    result = {}
    for spec in cfg.model_specs:
        for lr in cfg.lrs:
            key = cache_key(spec, lr, steps, digest)
            path = cache_path(out, spec.name, lr)
            th = _load(path, key, spec.name, lr)
            if th is None:
                if data is None:
                    data = store.load_data()
                th = compute_theory(spec, data, lr, steps, kernel_fn=kernel_fn)
                if th.ok or th.error.startswith("unstable"):
                    _save(path, key, th)
                log(f"theory {spec.name} lr={lr:g}: " + (f"{th.seconds:.1f} s" if th.ok else th.error))
            result[(spec.name, float(lr))] = th
    return result
