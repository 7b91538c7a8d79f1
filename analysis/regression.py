"""Infinite-width kernel regression: cached kernel matrices, learning curves, confidence
intervals and paired differences (THEORY section 7; the paper's second claim).

For each model spec the kernel of its analytic ensemble mean (``mean_kernel_fn``: the
orbit-averaged kernel for a full-orbit augmented MLP/CNN, the model's own kernel otherwise)
is computed once on the pool of all training candidates, ``K(P, P)``, and between the test
set and the pool, ``K(T, P)``, in blocks as Ray tasks (``analysis.blocks``). The matrices are
cached in ``DIR/kernels/<key>.npz`` where the key hashes the model spec (its name excluded)
and the pool and test inputs, so a rerun with more sizes, draws or times (or a renamed model)
recomputes nothing. Each learning-curve draw then indexes into them.

Prediction (``analysis.predict.GDPredictor``): gradient flow on the mean squared loss from a
zero-mean prior, driven by the chosen kernel (``ntk``: the NTK; ``nngp``: the NNGP, i.e. the
NNGP posterior mean at ``t = inf``). Each kernel is first divided by the mean of its pool
diagonal, so ``diag_reg`` (the ridge at every time) and the times are in units in which the
kernel's average self-similarity is 1, and are comparable across models. At ``t = inf``
with ``diag_reg`` this is ridge regression ``K(x,X) (K(X,X) + diag_reg I)^-1 Y``.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from itertools import combinations
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from study.seeds import derive_seed

__all__ = [
    "mean_engine", "kernel_key", "cached_kernels", "draw_indices", "predict_curve",
    "learning_curves", "summarize", "paired_differences", "ci95",
]

KERNEL_NAMES = ("nngp", "ntk")


def mean_engine(spec, input_shape, n_out):
    """The engine for ``analysis.blocks``: the kernel of the analytic ensemble mean."""
    from .kernels import mean_kernel_fn

    return mean_kernel_fn(spec, input_shape, n_out)


def inputs_digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def kernel_key(spec, n_out: int, data_digest: str) -> str:
    """Cache key of one model's kernels: the spec without its name, ``n_out`` and the inputs."""
    desc = spec.model_dump(mode="json")
    desc.pop("name", None)
    text = json.dumps({"spec": desc, "n_out": int(n_out), "data": data_digest, "engine": "mean_kernel_fn"}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_kernels(
    cache_dir: Path,
    spec,
    pool_x: np.ndarray,
    test_x: np.ndarray,
    n_out: int,
    *,
    block_size: int = 100,
    use_ray: bool = True,
    address: Optional[str] = None,
    log=print,
) -> dict:
    """``{"nngp_pool", "ntk_pool", "nngp_test", "ntk_test", "seconds", "cached"}`` for one spec,
    from the cache when present, else computed in blocks and written there (atomically)."""
    from .blocks import blocked_kernel

    digest = inputs_digest(pool_x, test_x)
    key = kernel_key(spec, n_out, digest)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"{key}.npz"
    meta_path = cache_dir / f"{key}.json"
    if path.is_file() and meta_path.is_file():
        with np.load(path) as z:
            out = {k: z[k] for k in z.files}
        meta = json.loads(meta_path.read_text())
        if out["ntk_pool"].shape == (len(pool_x), len(pool_x)) and out["ntk_test"].shape == (len(test_x), len(pool_x)):
            log(f"  {spec.name}: kernels from cache {path.name} (computed in {meta['seconds']:.1f} s)")
            return {**out, "seconds": meta["seconds"], "cached": True, "key": key}
    shape = tuple(pool_x.shape[1:])
    t0 = time.perf_counter()
    kw = dict(get=KERNEL_NAMES, block_size=block_size, use_ray=use_ray, address=address, engine=mean_engine)
    pool = blocked_kernel(spec, shape, n_out, pool_x, None, **kw)
    test = blocked_kernel(spec, shape, n_out, test_x, pool_x, **kw)
    seconds = time.perf_counter() - t0
    out = {f"{k}_pool": pool[k] for k in KERNEL_NAMES} | {f"{k}_test": test[k] for k in KERNEL_NAMES}
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = cache_dir / f".{key}.npz.tmp"
    with open(tmp, "wb") as f:
        np.savez(f, **out)
    tmp.replace(path)
    meta = {"model": spec.name, "spec": spec.model_dump(mode="json"), "n_out": n_out, "data_digest": digest,
            "pool": len(pool_x), "test": len(test_x), "block_size": block_size, "seconds": seconds}
    tmp = cache_dir / f".{key}.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2))
    tmp.replace(meta_path)
    log(f"  {spec.name}: kernels computed in {seconds:.1f} s ({len(pool_x)} pool x {len(pool_x)} + {len(test_x)} test)")
    return {**out, "seconds": seconds, "cached": False, "key": key}


def draw_indices(seed: int, pool: int, size: int, draw: int) -> np.ndarray:
    """The training set of one draw: ``size`` distinct pool indices; the same for every model."""
    rng = np.random.default_rng(derive_seed("regression-draw", seed, pool, size, draw))
    return np.sort(rng.choice(pool, size=size, replace=False))


def normalised(k_pool: np.ndarray, k_test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both blocks divided by the mean diagonal of the pool block."""
    s = float(np.mean(np.diag(k_pool)))
    return k_pool / s, k_test / s


def predict_curve(k_pool, k_test, y_pool, idx, times: Sequence[float], diag_reg: float) -> np.ndarray:
    """Mean predictions ``[len(times), n_test, n_out]`` from the training subset ``idx``
    (kernels already normalised)."""
    from .predict import GDPredictor

    p = GDPredictor(k_pool[np.ix_(idx, idx)], None, y_pool[idx], diag_reg=diag_reg)
    return p.mean(k_test[:, idx], times=list(times))


def metrics(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Test accuracy (argmax) and test MSE (squared error summed over outputs, mean over inputs)."""
    acc = float(np.mean(np.argmax(pred, axis=-1) == np.argmax(y, axis=-1)))
    mse = float(np.mean(np.sum((pred - y) ** 2, axis=-1)))
    return acc, mse


def learning_curves(
    kernels: dict[str, dict],
    specs: dict,
    y_pool: np.ndarray,
    y_test: np.ndarray,
    *,
    sizes: Sequence[int],
    draws: int,
    kernel_names: Sequence[str],
    times: Sequence[float],
    diag_reg: float,
    seed: int,
) -> pd.DataFrame:
    """One row per (model, kernel, time, size, draw): ``test_accuracy``, ``test_mse``.
    A size equal to the pool gets a single draw (every draw would be the same set)."""
    rows = []
    pool = len(y_pool)
    for name, kmats in kernels.items():
        spec = specs[name]
        for kname in kernel_names:
            kp, kt = normalised(kmats[f"{kname}_pool"], kmats[f"{kname}_test"])
            for size in sizes:
                # a size that takes the whole pool has one possible training set: one draw
                for d in range(1 if size == pool else draws):
                    idx = draw_indices(seed, pool, size, d)
                    preds = predict_curve(kp, kt, y_pool, idx, times, diag_reg)
                    for t, pred in zip(times, preds):
                        acc, mse = metrics(pred, y_test)
                        rows.append(dict(
                            model=name, arch=spec.arch, group=spec.group, basis=spec.basis, support=spec.support,
                            augmentation=spec.augmentation, kernel=kname, time=float(t), diag_reg=float(diag_reg),
                            size=int(size), draw=int(d), test_accuracy=acc, test_mse=mse,
                        ))
    return pd.DataFrame(rows)


def ci95(values) -> tuple[float, float, float]:
    """Mean and Student-t 95% interval over draws (``nan`` bounds with one draw)."""
    from scipy import stats

    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    if len(v) < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - half, m + half


METRICS = ("test_accuracy", "test_mse")


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% CI over draws per (model, kernel, time, size)."""
    rows = []
    for (model, kernel, t, size), g in table.groupby(["model", "kernel", "time", "size"], sort=False):
        row = dict(model=model, kernel=kernel, time=t, size=size, draws=len(g))
        for m in METRICS:
            row[m], row[f"{m}_lo"], row[f"{m}_hi"] = ci95(g[m])
        rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(table: pd.DataFrame) -> pd.DataFrame:
    """``a - b`` on the same draws: every pair of models under one kernel, and ``ntk - nngp``
    for every model. Mean and 95% CI over draws; ``significant`` when the CI excludes 0."""
    rows = []
    key = ["time", "size", "draw"]
    models = list(dict.fromkeys(table["model"]))
    kernels = list(dict.fromkeys(table["kernel"]))
    pairs = [((a, k), (b, k)) for k in kernels for a, b in combinations(models, 2)]
    if "ntk" in kernels and "nngp" in kernels:
        pairs += [((m, "ntk"), (m, "nngp")) for m in models]
    for (am, ak), (bm, bk) in pairs:
        a = table[(table.model == am) & (table.kernel == ak)].set_index(key)
        b = table[(table.model == bm) & (table.kernel == bk)].set_index(key)
        both = a.join(b, lsuffix="_a", rsuffix="_b", how="inner")
        for (t, size), g in both.groupby(level=["time", "size"], sort=True):
            for m in METRICS:
                mean, lo, hi = ci95(g[f"{m}_a"] - g[f"{m}_b"])
                rows.append(dict(a_model=am, a_kernel=ak, b_model=bm, b_kernel=bk, time=t, size=size,
                                 metric=m, mean_diff=mean, ci_lo=lo, ci_hi=hi, draws=len(g),
                                 significant=bool(lo > 0 or hi < 0)))
    return pd.DataFrame(rows)
