"""Infinite-width kernel regression: cached kernel matrices, learning curves, confidence
intervals and paired differences (docs/theory.md §7; the paper's second claim).

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

Molecules (``cached_molecule_kernels``): a per-atom network summed over the atoms of a
molecule, ``E(M) = sum_{i in M} f(env_i)``, has the kernel
``K(M, M') = sum_{i in M} sum_{j in M'} k(env_i, env_j)``. The atom kernel ``k`` is computed
once over the real atoms (pool atoms x pool atoms, test atoms x pool atoms, blocked as
above) and summed by the sparse atom-to-molecule matrix ``A`` (``A[m, i] = 1`` when atom
``i`` belongs to molecule ``m``): ``K_mol = A_1 k A_2^T``. Regression targets (energies) are
scored by MAE and RMSE instead of accuracy; a baseline linear in per-molecule features (the
element counts, or a constant) is fitted on each draw's training subset and the kernel
regresses what it leaves (``learning_curves(..., baseline=...)``).
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
from scipy import sparse, stats

from study.atomic import atomic_savez, atomic_write
from study.seeds import derive_seed
from study.spec import sphere_spec

from .blocks import blocked_kernel
from .devices import resolve_device
from .kernel_so3 import so3_kernel_fn, sphere_mlp_kernel_fn
from .kernels import mean_kernel_fn
from .molecule_blocks import blocked_molecule_kernel
from .predict import GDPredictor

__all__ = [
    "mean_engine", "kernel_key", "cached_kernels", "draw_indices", "predict_curve",
    "learning_curves", "summarize", "paired_differences", "ci95",
    "molecule_matrix", "molecule_kernel", "cached_molecule_kernels", "regression_metrics", "fit_baseline",
]

KERNEL_NAMES = ("nngp", "ntk")
# Rows of molecule-level descriptor kernels (analysis.coulomb): one kernel filed under both names.
DESCRIPTOR_ARCHS = ("coulomb_laplacian",)


def mean_engine(spec, input_shape, n_out):
    """The engine for ``analysis.blocks``: the kernel of the analytic ensemble mean."""
    return mean_kernel_fn(spec, input_shape, n_out)


def inputs_digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(str(a.shape).encode())
        h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
    return h.hexdigest()[:16]


def kernel_key(spec, n_out: int, data_digest: str, engine: str = "mean_kernel_fn") -> str:
    """Cache key of one model's kernels: the spec without its name, ``n_out``, the inputs and
    how the kernels were made (``engine``: ``mean_kernel_fn``, or ``molecule_sum`` for
    per-atom kernels summed over molecules)."""
    desc = spec.model_dump(mode="json")
    desc.pop("name", None)
    text = json.dumps({"spec": desc, "n_out": int(n_out), "data": data_digest, "engine": engine}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _cache_paths(cache_dir: Path, key: str) -> tuple[Path, Path]:
    cache_dir = Path(cache_dir)
    return cache_dir / f"{key}.npz", cache_dir / f"{key}.json"


def load_cached_kernels(cache_dir: Path, key: str, n_pool: int, n_test: int, name: str, log) -> Optional[dict]:
    path, meta_path = _cache_paths(cache_dir, key)
    if not (path.is_file() and meta_path.is_file()):
        return None
    with np.load(path) as z:
        out = {k: z[k] for k in z.files}
    meta = json.loads(meta_path.read_text())
    if out["ntk_pool"].shape != (n_pool, n_pool) or out["ntk_test"].shape != (n_test, n_pool):
        return None
    log(f"  {name}: kernels from cache {path.name} (computed in {meta['seconds']:.1f} s)")
    return {**out, "seconds": meta["seconds"], "cached": True, "key": key}


def _to_cache(cache_dir: Path, key: str, out: dict, meta: dict) -> None:
    path, meta_path = _cache_paths(cache_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_savez(path, out)
    atomic_write(meta_path, json.dumps(meta, indent=2).encode())


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
    num_gpus: float = 0,
    log=print,
) -> dict:
    """``{"nngp_pool", "ntk_pool", "nngp_test", "ntk_test", "seconds", "cached"}`` for one spec,
    from the cache when present, else computed in blocks and written there (atomically).
    ``num_gpus``: the share of a GPU each block's Ray task takes and computes on."""
    digest = inputs_digest(pool_x, test_x)
    key = kernel_key(spec, n_out, digest)
    hit = load_cached_kernels(cache_dir, key, len(pool_x), len(test_x), spec.name, log)
    if hit is not None:
        return hit
    shape = tuple(pool_x.shape[1:])
    t0 = time.perf_counter()
    kw = dict(get=KERNEL_NAMES, block_size=block_size, use_ray=use_ray, address=address, engine=mean_engine,
              num_gpus=num_gpus)
    pool = blocked_kernel(spec, shape, n_out, pool_x, None, **kw)
    test = blocked_kernel(spec, shape, n_out, test_x, pool_x, **kw)
    seconds = time.perf_counter() - t0
    out = {f"{k}_pool": pool[k] for k in KERNEL_NAMES} | {f"{k}_test": test[k] for k in KERNEL_NAMES}
    meta = {"model": spec.name, "spec": spec.model_dump(mode="json"), "n_out": n_out, "data_digest": digest,
            "pool": len(pool_x), "test": len(test_x), "block_size": block_size, "seconds": seconds}
    _to_cache(cache_dir, key, out, meta)
    log(f"  {spec.name}: kernels computed in {seconds:.1f} s ({len(pool_x)} pool x {len(pool_x)} + {len(test_x)} test)")
    return {**out, "seconds": seconds, "cached": False, "key": key}


# ----- molecules: per-atom kernels summed over atoms ----------------------------------------
def molecule_matrix(mask: np.ndarray):
    """The sparse atom-to-molecule matrix ``A [N, n_atoms]`` (CSR) of a padded atom ``mask [N, A]``:
    ``A[m, i] = 1`` when the ``i``-th real atom (row-major order of ``mask``, i.e. the order of
    ``x[mask]``) belongs to molecule ``m``."""
    mask = np.asarray(mask, dtype=bool)
    rows = np.nonzero(mask)[0]
    return sparse.csr_matrix((np.ones(len(rows)), (rows, np.arange(len(rows)))), shape=(mask.shape[0], len(rows)))


def molecule_kernel(k_atom: np.ndarray, mask1: np.ndarray, mask2: np.ndarray) -> np.ndarray:
    """``K(M, M') = sum_{i in M} sum_{j in M'} k(i, j)``: ``A_1 k A_2^T`` for an atom kernel
    ``k_atom [atoms of mask1, atoms of mask2]`` (atoms in the order of ``x[mask]``)."""
    a1, a2 = molecule_matrix(mask1), molecule_matrix(mask2)
    if k_atom.shape != (a1.shape[1], a2.shape[1]):
        raise ValueError(f"molecule_kernel: atom kernel {k_atom.shape} does not match the masks' "
                         f"{a1.shape[1]} x {a2.shape[1]} atoms")
    return np.asarray(a2 @ (a1 @ k_atom).T).T


class _SphereKernel:
    """``kf(x1, x2=None, get=...) -> {name: [N1, N2]}`` of an SO(3) model (``so3_gcnn``:
    ``analysis.kernel_so3.so3_kernel_fn`` in the spec's ``kernel_mode``, grid when unset;
    ``sphere_mlp``: ``sphere_mlp_kernel_fn``) on single-atom signals ``[C, 2L, 2L]``."""

    def __init__(self, spec, input_shape, n_out):
        self.arch, self.mode = spec.arch, spec.kernel_mode or "grid"
        self.sspec = sphere_spec(spec, tuple(input_shape), n_out)

    def __call__(self, x1, x2=None, get=KERNEL_NAMES, device=None):
        get = (get,) if isinstance(get, str) else tuple(get)
        device = resolve_device(device)
        if self.arch == "so3_gcnn":
            nngp, ntk = so3_kernel_fn(self.sspec, x1, x2, mode=self.mode, device=device)
        else:
            nngp, ntk = sphere_mlp_kernel_fn(self.sspec, x1, x2, device=device)
        mats = {"nngp": nngp, "ntk": ntk}
        return {k: np.asarray(mats[k].detach().cpu().numpy() if hasattr(mats[k], "detach") else mats[k],
                              dtype=np.float64) for k in get}


def psd_projected(k: np.ndarray) -> tuple[np.ndarray, float]:
    """The nearest (Frobenius) positive semidefinite matrix to the symmetric part of ``k``
    (negative eigenvalues set to 0), and the most negative eigenvalue relative to the mean
    diagonal (0 when there was none). ``k`` is returned unchanged (symmetrised) when PSD.

    Why: the relative-mode SO(3) kernel (docs/so3.md) is the continuum kernel under a SOFT
    quadrature, exact for no finite model, so its matrices can have eigenvalues slightly
    below 0 (measured on the built-in molecules: about -2e-4 of the mean diagonal at B = 4),
    which ``GDPredictor`` rightly refuses. Clipping them changes the kernel by no more than
    that quadrature error."""
    k = 0.5 * (k + k.T)
    lam, v = np.linalg.eigh(k)
    scale = float(np.mean(np.diag(k)))
    if lam[0] >= 0:
        return k, 0.0
    out = (v * np.maximum(lam, 0.0)) @ v.T
    return 0.5 * (out + out.T), float(lam[0] / scale)


def atom_engine(spec, input_shape, n_out):
    """The per-atom kernel engine for ``analysis.blocks``: for the SO(3) models (``so3_gcnn``,
    ``sphere_mlp``) their analytic kernel on single-atom signals ``[C, 2L, 2L]``; for any other
    model ``mean_kernel_fn``."""
    if getattr(spec, "so3", False):
        return _SphereKernel(spec, input_shape, n_out)

    return mean_kernel_fn(spec, input_shape, n_out)


def cached_molecule_kernels(
    cache_dir: Path,
    spec,
    pool_x: np.ndarray,
    pool_mask: np.ndarray,
    test_x: np.ndarray,
    test_mask: np.ndarray,
    n_out: int = 1,
    *,
    block_size: int = 100,
    use_ray: bool = True,
    address: Optional[str] = None,
    engine=None,
    num_gpus: float = 0,
    log=print,
) -> dict:
    """As :func:`cached_kernels`, for molecules (``num_gpus``: a GPU share per block's task): ``pool_x [P, A, C, ...]`` padded per-atom
    inputs with ``pool_mask [P, A]`` (and the test set alike). The atom kernel (an ``engine``
    for ``analysis.blocks``, default :func:`atom_engine`) is computed between blocks of
    molecules holding about ``block_size`` atoms each and summed over each molecule's atoms
    inside the task (``analysis.molecule_blocks``; pool blocks on and above the diagonal
    only), so no atom matrix larger than a block is ever held. Each block is cached in
    ``cache_dir/blocks/<key>-b<block_size>/`` as it arrives, so an interrupted run resumes.
    Same cache layout and keys as :func:`cached_kernels` (engine ``molecule_sum``; the key
    covers the masks)."""
    pool_mask, test_mask = np.asarray(pool_mask, dtype=bool), np.asarray(test_mask, dtype=bool)
    digest = inputs_digest(pool_x, test_x, pool_mask, test_mask)
    key = kernel_key(spec, n_out, digest, engine="molecule_sum")
    hit = load_cached_kernels(cache_dir, key, len(pool_x), len(test_x), spec.name, log)
    if hit is not None:
        return hit
    n_pool_atoms, n_test_atoms = int(pool_mask.sum()), int(test_mask.sum())
    shape = tuple(np.asarray(pool_x).shape[2:])
    t0 = time.perf_counter()
    mats, info = blocked_molecule_kernel(
        spec, shape, n_out, pool_x, pool_mask, test_x, test_mask, engine=engine or atom_engine,
        block_atoms=block_size, get=KERNEL_NAMES, block_dir=Path(cache_dir) / "blocks" / f"{key}-b{block_size}",
        use_ray=use_ray, address=address, num_gpus=num_gpus, log=log)
    seconds = time.perf_counter() - t0
    out, clipped = {}, {}
    for k in KERNEL_NAMES:
        out[f"{k}_pool"], clipped[k] = psd_projected(mats[f"{k}_pool"])
        out[f"{k}_test"] = mats[f"{k}_test"]
    meta = {"model": spec.name, "spec": spec.model_dump(mode="json"), "n_out": n_out, "data_digest": digest,
            "engine": "molecule_sum", "pool": len(pool_x), "test": len(test_x), "pool_atoms": n_pool_atoms,
            "test_atoms": n_test_atoms, "block_size": block_size, "seconds": seconds,
            "psd_clipped": clipped, **info}
    _to_cache(cache_dir, key, out, meta)
    log(f"  {spec.name}: atom kernels computed in {seconds:.1f} s ({n_pool_atoms} pool atoms x {n_pool_atoms} "
        f"+ {n_test_atoms} test atoms; {info['blocks_computed']} of {info['blocks']} blocks computed, the rest "
        f"from the block cache), summed over {len(pool_x)} pool and {len(test_x)} test molecules"
        + "".join(f"; {k} pool kernel made PSD (min eigenvalue {c:.1e} of the mean diagonal)" for k, c in clipped.items() if c < 0))
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
    p = GDPredictor(k_pool[np.ix_(idx, idx)], None, y_pool[idx], diag_reg=diag_reg)
    return p.mean(k_test[:, idx], times=list(times))


def metrics(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Test accuracy (argmax) and test MSE (squared error summed over outputs, mean over inputs)."""
    acc = float(np.mean(np.argmax(pred, axis=-1) == np.argmax(y, axis=-1)))
    mse = float(np.mean(np.sum((pred - y) ** 2, axis=-1)))
    return acc, mse


def regression_metrics(pred: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Mean absolute error and root mean squared error over test inputs (and outputs), in the
    targets' units (eV for energies)."""
    err = np.asarray(pred, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    return float(np.mean(np.abs(err))), float(np.sqrt(np.mean(err**2)))


def fit_baseline(f_pool: np.ndarray, y_pool: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Least-squares coefficients ``[f, n_out]`` of targets on features, fitted on the training
    subset ``idx`` only (minimum norm when the subset does not determine them, e.g. an element
    that none of its molecules contains gets 0)."""
    coef, *_ = np.linalg.lstsq(f_pool[idx], y_pool[idx], rcond=None)
    return coef


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
    task: str = "classification",
    baseline: Optional[tuple[np.ndarray, np.ndarray]] = None,
) -> pd.DataFrame:
    """One row per (model, kernel, time, size, draw).

    ``task="classification"``: ``test_accuracy`` (argmax) and ``test_mse``.
    ``task="regression"``: ``test_mae`` and ``test_rmse``; with ``baseline = (F_pool [P, f],
    F_test [T, f])`` a linear fit of the targets on these features is made on each draw's
    training subset (:func:`fit_baseline`), the kernel regresses the residuals and the
    prediction is baseline + kernel; ``baseline_mae``/``baseline_rmse`` score the baseline alone.
    A size equal to the pool gets a single draw (every draw would be the same set)."""
    if task not in ("classification", "regression"):
        raise ValueError(f"task: unknown {task!r}; use classification or regression")
    if baseline is not None and task != "regression":
        raise ValueError("baseline: only for task='regression'")
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
                    scores = {}
                    if baseline is not None:
                        coef = fit_baseline(baseline[0], y_pool, idx)
                        base_pool, base_test = baseline[0] @ coef, baseline[1] @ coef
                        scores["baseline_mae"], scores["baseline_rmse"] = regression_metrics(base_test, y_test)
                    else:
                        base_pool, base_test = 0.0, 0.0
                    preds = predict_curve(kp, kt, y_pool - base_pool, idx, times, diag_reg)
                    for t, pred in zip(times, preds):
                        if task == "regression":
                            mae, rmse = regression_metrics(pred + base_test, y_test)
                            metric = dict(test_mae=mae, test_rmse=rmse, **scores)
                        else:
                            acc, mse = metrics(pred, y_test)
                            metric = dict(test_accuracy=acc, test_mse=mse)
                        rows.append(dict(
                            model=name, arch=spec.arch, group=spec.group, basis=spec.basis, support=spec.support,
                            augmentation=spec.augmentation, kernel=kname, time=float(t), diag_reg=float(diag_reg),
                            size=int(size), draw=int(d), **metric,
                        ))
    return pd.DataFrame(rows)


def ci95(values) -> tuple[float, float, float]:
    """Mean and Student-t 95% interval over draws (``nan`` bounds with one draw)."""
    v = np.asarray(values, dtype=np.float64)
    m = float(v.mean())
    if len(v) < 2:
        return m, math.nan, math.nan
    half = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - half, m + half


METRICS = ("test_accuracy", "test_mse")
REGRESSION_METRICS = ("test_mae", "test_rmse")
ALL_METRICS = METRICS + REGRESSION_METRICS + ("baseline_mae", "baseline_rmse")
# Lower is better for every metric but accuracy.
HIGHER_IS_BETTER = {"test_accuracy"}


def table_metrics(table: pd.DataFrame) -> list[str]:
    """The metric columns a learning-curve table holds, in a fixed order."""
    return [m for m in ALL_METRICS if m in table.columns]


def is_regression_table(table: pd.DataFrame) -> bool:
    return "test_mae" in table.columns


def summarize(table: pd.DataFrame) -> pd.DataFrame:
    """Mean and 95% CI over draws per (model, kernel, time, size), for every metric present."""
    rows = []
    for (model, kernel, t, size), g in table.groupby(["model", "kernel", "time", "size"], sort=False):
        row = dict(model=model, kernel=kernel, time=t, size=size, draws=len(g))
        for m in table_metrics(table):
            row[m], row[f"{m}_lo"], row[f"{m}_hi"] = ci95(g[m])
        rows.append(row)
    return pd.DataFrame(rows)


def paired_differences(table: pd.DataFrame) -> pd.DataFrame:
    """``a - b`` on the same draws: every pair of models under one kernel, and ``ntk - nngp``
    for every model. Mean and 95% CI over draws; ``significant`` when the CI excludes 0."""
    rows = []
    paired = [m for m in table_metrics(table) if not m.startswith("baseline_")]
    key = ["time", "size", "draw"]
    models = list(dict.fromkeys(table["model"]))
    kernels = list(dict.fromkeys(table["kernel"]))
    pairs = [((a, k), (b, k)) for k in kernels for a, b in combinations(models, 2)]
    if "ntk" in kernels and "nngp" in kernels:
        # a descriptor kernel (analysis.coulomb) is filed under both names: its ntk - nngp is 0 by construction
        single = set(table.loc[table.arch.isin(DESCRIPTOR_ARCHS), "model"]) if "arch" in table.columns else set()
        pairs += [((m, "ntk"), (m, "nngp")) for m in models if m not in single]
    for (am, ak), (bm, bk) in pairs:
        a = table[(table.model == am) & (table.kernel == ak)].set_index(key)
        b = table[(table.model == bm) & (table.kernel == bk)].set_index(key)
        both = a.join(b, lsuffix="_a", rsuffix="_b", how="inner")
        for (t, size), g in both.groupby(level=["time", "size"], sort=True):
            for m in paired:
                mean, lo, hi = ci95(g[f"{m}_a"] - g[f"{m}_b"])
                rows.append(dict(a_model=am, a_kernel=ak, b_model=bm, b_kernel=bk, time=t, size=size,
                                 metric=m, mean_diff=mean, ci_lo=lo, ci_hi=hi, draws=len(g),
                                 significant=bool(lo > 0 or hi < 0)))
    return pd.DataFrame(rows)
