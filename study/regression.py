"""``kind: kernel_regression`` studies: the ``eqntk`` commands for them.

    eqntk validate STUDY     data shapes, pool and test sizes, sizes, draws, models
    eqntk run STUDY --out DIR
    eqntk status DIR         which kernels are cached, whether the table exists
    eqntk analyze DIR        recompute the learning-curve tables from the cached kernels
    eqntk report DIR         tables, plot and DIR/report/index.html

Results directory (``DIR``)::

    study.yaml, study.json, versions.json   as for ensemble studies
    inputs.npz          train_x, train_y (the pool of training candidates), eval__test, test_y;
                        for molecules also train_z, test_z (atomic numbers, 0 = padding atom)
    kernels/<key>.npz   nngp_pool, ntk_pool [P, P]; nngp_test, ntk_test [T, P] (one model)
    kernels/<key>.json  the spec, data digest, shapes and the seconds the kernels took
    regression.parquet  one row per (model, kernel, time, size, draw); also regression.csv
    regression_summary.csv, regression_pairs.csv    means, CIs and paired differences
    report/index.html, report/learning_curves.png

A rerun into the same ``DIR`` (say with more sizes or draws) reuses every cached kernel whose
spec and inputs are unchanged, and rewrites the tables.

Molecules (``source: molecules``, docs/study.md): the inputs are padded per-atom environments
``[N, A, C, 2L, 2L]``; each model's molecule kernel is its atom kernel summed over both
molecules' atoms (``analysis.regression.cached_molecule_kernels``), the targets are energies
(eV) less a baseline fitted per draw, and the tables hold MAE and RMSE.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from dataclasses import replace

import numpy as np

from .atomic import atomic_path, atomic_savez, atomic_write
from .config import StudyConfig, StudyError, load_study
from .data import StudyData, _labelled, _normalize


class RegressionData:
    """The pool of training candidates and the test set. For molecules (``pool_z`` given) the
    inputs are padded per-atom signals ``[N, A, C, 2L, 2L]`` with atomic numbers ``z [N, A]``
    (0 = no atom) and the targets energies ``[N, 1]`` (eV)."""

    def __init__(self, pool_x, pool_y, test_x, test_y, pool_z=None, test_z=None):
        self.pool_x, self.pool_y, self.test_x, self.test_y = pool_x, pool_y, test_x, test_y
        self.pool_z, self.test_z = pool_z, test_z

    @property
    def molecular(self) -> bool:
        return self.pool_z is not None

    @property
    def input_shape(self):
        """The shape of one model input: one atom's signal for molecules."""
        return tuple(self.pool_x.shape[2 if self.molecular else 1:])

    @property
    def n_out(self):
        return int(self.pool_y.shape[1])

    def digest(self) -> str:
        extra = {"pool_z": self.pool_z, "test_z": self.test_z} if self.molecular else {}
        return StudyData(self.pool_x, self.pool_y, {"test": self.test_x, "test_y": self.test_y, **extra}).digest()

    def kernel_key(self, spec) -> str:
        """The cache key of one model's kernels on these inputs (``analysis.regression``)."""
        from analysis.regression import inputs_digest, kernel_key

        if self.molecular:
            digest = inputs_digest(self.pool_x, self.test_x, self.pool_z > 0, self.test_z > 0)
            return kernel_key(spec, self.n_out, digest, engine="molecule_sum")
        return kernel_key(spec, self.n_out, inputs_digest(self.pool_x, self.test_x))

    def baseline_features(self, kind: str):
        """``(F_pool, F_test)`` of a regression baseline: element counts (``per_element``), a
        constant (``mean``), or ``None`` (``none``)."""
        if kind == "none":
            return None
        if kind == "mean":
            return np.ones((len(self.pool_y), 1)), np.ones((len(self.test_y), 1))
        from .molecules import ELEMENTS

        counts = lambda z: np.stack([(z == e).sum(axis=1) for e in ELEMENTS], axis=1).astype(np.float64)
        return counts(self.pool_z), counts(self.test_z)

    def save(self, path: Path) -> None:
        arrays = dict(train_x=self.pool_x, train_y=self.pool_y, eval__test=self.test_x, test_y=self.test_y)
        if self.molecular:
            arrays.update(train_z=self.pool_z, test_z=self.test_z)
        atomic_savez(path, arrays)

    @classmethod
    def load(cls, path: Path) -> "RegressionData":
        with np.load(path) as z:
            mol = "train_z" in z.files
            return cls(z["train_x"], z["train_y"], z["eval__test"], z["test_y"],
                       z["train_z"] if mol else None, z["test_z"] if mol else None)


def build_regression_data(cfg: StudyConfig, base: Path) -> RegressionData:
    d, r = cfg.data, cfg.regression
    if d.train.source == "molecules":
        return build_molecule_data(cfg, base)
    x, lab, c1 = _labelled(d.train, cfg.seed, base, cfg.group)
    xt, labt, c2 = _labelled(r.test, cfg.seed, base, cfg.group)
    if len(x) == 0:
        raise StudyError("data.train: the pool of training candidates is empty; give n > 0 or a file with images")
    if len(xt) == 0:
        raise StudyError("regression.test: the test set is empty; give n > 0 or a file with images")
    if xt.shape[1:] != x.shape[1:]:
        raise StudyError(
            f"regression.test: inputs have shape {xt.shape[1:]} but the training inputs {x.shape[1:]}; "
            "use the same image size (resize) and channels"
        )
    classes = max(c1, c2)
    y, yt = np.eye(classes)[lab], np.eye(classes)[labt]
    if d.targets == "one_hot_centred":
        y, yt = y - 1.0 / classes, yt - 1.0 / classes
    if d.normalize == "per_image":
        x, xt = _normalize(x), _normalize(xt)
    sizes = r.resolved_sizes
    if sizes[-1] > len(x):
        raise StudyError(
            f"regression.sizes: the largest size {sizes[-1]} exceeds the {len(x)} training candidates "
            "(data.train); lower it or give data.train more inputs"
        )
    return RegressionData(x, y, xt, yt)


# ----- molecules (source: molecules) -------------------------------------------------------
def _molecule_set(src, base: Path):
    """The whole set a ``molecules`` source draws from, before the seeded order and ``start``/``n``."""
    from . import molecules as M

    if src.set == "builtin":
        return M.generate_conformers(n_conformers=src.n_conformers, method=src.method)
    path = Path(src.path)
    if not path.is_absolute():
        path = base / path
    if src.set == "qm9":
        if not path.exists():
            raise StudyError(f"data.path: {path} not found; download dsgdb9nsd.xyz.tar.bz2 (QM9, figshare) there or fix the path")
        return M.load_qm9(path, limit=src.limit)
    return M.MoleculeSet.load(path)


def load_molecules(src, seed: int, base: Path):
    """The molecules of one source: the set in a fixed seeded order (the same for every source
    of that set, so ``start``/``n`` ranges of train and test are disjoint when they do not
    overlap), ``start`` skipped, ``n`` kept (default: the rest), with atom environments on
    the DH grid of bandwidth ``L``. Returns ``(MoleculeSet, order indices)``.

    With ``oversample > 1`` each environment is sampled on the finer DH grid of bandwidth
    ``oversample * L``, projected onto the harmonics of degree ``< L`` there (DH quadrature)
    and synthesised on the ``L`` grid: a band-limited signal, so a rotation of the molecule
    rotates it exactly and the SO(3) kernels see exactly rotated inputs. Sampled directly on
    the ``L`` grid (``oversample: 1``) the sharp ``r^-p`` peaks alias into the low degrees, and a
    rotated molecule's environments are not the rotated environments (measured: the
    SO(3) GCNN molecule kernel then changes by ~1e-2 of its largest entry under rotation,
    against ~1e-4, the relative-mode quadrature error, for ``oversample: 4``)."""
    from .seeds import derive_seed
    from .sphere import dh_grid, isht, sht

    mols = _molecule_set(src, base)
    order = np.random.default_rng(derive_seed("molecules-order", seed)).permutation(len(mols))
    stop = len(mols) if src.n is None else src.start + src.n
    if stop > len(mols) or src.start >= len(mols):
        raise StudyError(
            f"data: molecules start {src.start} + n {src.n} exceeds the {len(mols)} molecules of set {src.set}; "
            "lower n or start" + (" or raise n_conformers" if src.set == "builtin" else "")
        )
    idx = order[src.start : stop]
    sub = mols.subset(idx)
    if src.oversample == 1:
        return sub.with_environments(dh_grid(src.L), radius=src.radius), idx
    fine, coarse = dh_grid(src.oversample * src.L), dh_grid(src.L)
    env, settings = None, None
    for k in range(0, len(sub), 32):  # in chunks: the fine samples are oversample^2 times larger
        part = sub.subset(np.arange(k, min(k + 32, len(sub)))).with_environments(fine, radius=src.radius)
        if env is None:
            env = np.zeros((*sub.z.shape, part.env.shape[2], 2 * src.L, 2 * src.L))
        env[k : k + len(part)] = isht(sht(part.env, fine, src.L - 1), coarse) * part.mask[..., None, None, None]
        settings = part.env_settings
    settings = {**(settings or {}), "grid_shape": [2 * src.L, 2 * src.L], "grid_L": src.L,
                "oversample": src.oversample, "band_limit": src.L - 1}
    return replace(sub, env=env, env_settings=settings), idx


def standardize_channels(pool_env: np.ndarray, pool_mask: np.ndarray, *others, weights: np.ndarray):
    """Per channel: subtract the mean and divide by the standard deviation over the pool's real
    atoms and the sphere (DH quadrature weights), padding atoms left at 0. A constant shift and
    a scale per channel commute with rotations, so every model keeps its symmetry.
    Returns the standardised pool and ``others`` (each ``(env, mask)``) and ``(mean, std)``."""
    atoms = pool_env[pool_mask]  # [n, C, 2L, 2L]
    n = max(len(atoms), 1)
    mean = np.einsum("ncjk,jk->c", atoms, weights) / n
    var = np.einsum("ncjk,jk->c", (atoms - mean[:, None, None]) ** 2, weights) / n
    std = np.where(var > 0, np.sqrt(var), 1.0)

    def apply(env, mask):
        out = (env - mean[:, None, None]) / std[:, None, None]
        return np.where(mask[(...,) + (None,) * (env.ndim - 2)], out, 0.0)

    return (apply(pool_env, pool_mask), *[apply(e, m) for e, m in others]), (mean, std)


def _pad_atoms(a: np.ndarray, atoms: int) -> np.ndarray:
    if a.shape[1] == atoms:
        return a
    pad = np.zeros((a.shape[0], atoms - a.shape[1], *a.shape[2:]), dtype=a.dtype)
    return np.concatenate([a, pad], axis=1)


def build_molecule_data(cfg: StudyConfig, base: Path) -> RegressionData:
    """Pool and test molecules: per-atom environments standardised by the pool's atoms, padded
    to one atom count, energies ``[N, 1]`` in eV."""
    from .sphere import dh_grid

    d, r = cfg.data, cfg.regression
    if r.test.source != "molecules":
        raise StudyError(f"regression.test: source {r.test.source} does not match data.train (molecules); use source: molecules")
    train, test = d.train, r.test
    pool, pidx = load_molecules(train, cfg.seed, base)
    tst, tidx = load_molecules(test, cfg.seed, base)
    if (train.L, train.radius, train.oversample) != (test.L, test.radius, test.oversample):
        raise StudyError(
            f"regression.test: L {test.L}, radius {test.radius} and oversample {test.oversample} must match "
            f"data.train's L {train.L}, radius {train.radius} and oversample {train.oversample}"
        )
    same = (train.set, train.path, train.n_conformers, train.method, train.limit) == (test.set, test.path, test.n_conformers, test.method, test.limit)
    if same and len(np.intersect1d(pidx, tidx)):
        raise StudyError(
            f"regression.test: molecules {test.start}..{test.start + len(tidx) - 1} overlap the pool "
            f"{train.start}..{train.start + len(pidx) - 1} of the same set; give the test set a start past the pool"
        )
    sizes = r.resolved_sizes
    if sizes[-1] > len(pool):
        raise StudyError(
            f"regression.sizes: the largest size {sizes[-1]} exceeds the {len(pool)} training candidates "
            "(data.train); lower it or give data.train more molecules"
        )
    atoms = max(pool.z.shape[1], tst.z.shape[1])
    penv, tenv = _pad_atoms(pool.env, atoms), _pad_atoms(tst.env, atoms)
    pz, tz = _pad_atoms(pool.z, atoms), _pad_atoms(tst.z, atoms)
    (penv, tenv), _ = standardize_channels(penv, pz > 0, (tenv, tz > 0), weights=dh_grid(train.L).weights)
    return RegressionData(penv, pool.energy[:, None], tenv, tst.energy[:, None], pz, tz)


class PreparedRegression:
    def __init__(self, path: Path):
        self.path = path
        self.text = path.read_text() if path.is_file() else ""
        self.cfg = load_study(path)
        self.data = build_regression_data(self.cfg, path.parent)
        self.cfg.check_inputs(self.data.input_shape, str(path))
        self.digest = self.data.digest()

    @property
    def resolved(self) -> dict:
        r = self.cfg.regression
        return {
            "config": self.cfg.model_dump(mode="json"),
            "models": [m.model_dump(mode="json") for m in self.cfg.model_specs],
            "sizes": r.resolved_sizes,
            "times": [str(t) for t in r.resolved_times],
            "data_digest": self.digest,
        }


def is_regression_study(path: Path) -> bool:
    return load_study(path).kind == "kernel_regression"


def is_regression_dir(d: Path) -> bool:
    try:
        return json.loads((Path(d) / "study.json").read_text())["config"].get("kind") == "kernel_regression"
    except (OSError, ValueError, KeyError):
        return False


def cmd_validate(path: Path) -> int:
    p = PreparedRegression(path)
    cfg, r = p.cfg, p.cfg.regression
    print(f"study {cfg.name}: valid (kernel regression)")
    if p.data.molecular:
        print(f"  data: pool of {len(p.data.pool_x)} molecules ({int((p.data.pool_z > 0).sum())} atoms), test set "
              f"{len(p.data.test_x)} molecules ({int((p.data.test_z > 0).sum())} atoms); atom signals of shape "
              f"{p.data.input_shape}; energies in eV, baseline {r.resolved_baseline(True)}")
    else:
        print(f"  data: pool of {len(p.data.pool_x)} training candidates of shape {p.data.input_shape}, "
              f"{p.data.n_out} outputs; test set {len(p.data.test_x)}")
    print(f"  sizes: {r.resolved_sizes}; {r.draws} draws each; kernels {r.kernels}; times {r.times}; diag_reg {r.diag_reg:g}")
    print("  models: " + ", ".join(f"{m.name} ({m.arch}, {m.group}, {m.basis}, {m.augmentation})" for m in cfg.model_specs))
    return 0


def cmd_run(path: Path, out: Optional[Path], address: Optional[str], analysis: bool = True) -> int:
    from .store import ResultStore

    p = PreparedRegression(path)
    out = Path(out) if out else Path("results") / p.cfg.name
    store = ResultStore(out)
    if store.exists() and not is_regression_dir(out):
        raise StudyError(f"--out: {out} holds an ensemble study; choose a new --out for a kernel-regression study")
    if not store.exists() and out.exists() and any(q for q in out.iterdir() if q.name != ".lock"):
        raise StudyError(f"--out: {out} exists and is not an eqntk results directory; choose another --out")
    store.lock()
    try:
        out.mkdir(parents=True, exist_ok=True)
        from .store import versions

        p.data.save(out / "inputs.npz")
        atomic_write(out / "study.yaml", p.text.encode())
        atomic_write(out / "versions.json", json.dumps(versions(), indent=2).encode())
        atomic_write(out / "study.json", json.dumps(p.resolved, indent=2, sort_keys=True).encode())
        t0 = time.perf_counter()
        print(f"kernels: {len(p.cfg.model_specs)} models, pool {len(p.data.pool_x)}, test {len(p.data.test_x)}")
        compute_kernels(out, p, address)
        print(f"kernels ready in {time.perf_counter() - t0:.1f} s")
    finally:
        store.unlock()
    analyze(out)
    if analysis:
        report(out)
    print(f"results: {out}")
    return 0


def compute_kernels(out: Path, p: PreparedRegression, address: Optional[str], use_ray: bool = True) -> dict:
    from analysis.regression import cached_kernels, cached_molecule_kernels

    d = p.data
    if d.molecular:
        return {
            spec.name: cached_molecule_kernels(out / "kernels", spec, d.pool_x, d.pool_z > 0, d.test_x, d.test_z > 0,
                                               d.n_out, block_size=p.cfg.regression.block_size, use_ray=use_ray,
                                               address=address)
            for spec in p.cfg.model_specs
        }
    return {
        spec.name: cached_kernels(out / "kernels", spec, p.data.pool_x, p.data.test_x, p.data.n_out,
                                  block_size=p.cfg.regression.block_size, use_ray=use_ray, address=address)
        for spec in p.cfg.model_specs
    }


def _load(out: Path):
    from analysis.regression import _from_cache

    resolved = json.loads((out / "study.json").read_text())
    cfg = StudyConfig(**resolved["config"])
    data = RegressionData.load(out / "inputs.npz")
    specs = {s.name: s for s in cfg.model_specs}

    kernels = {}
    for s in specs.values():
        if not _cached(out, s, data):
            raise StudyError(f"DIR: {out} lacks the cached kernels of model {s.name}; rerun `eqntk run STUDY --out {out}`")
        kernels[s.name] = _from_cache(out / "kernels", data.kernel_key(s), len(data.pool_x), len(data.test_x),
                                      s.name, log=lambda *_: None)
        if kernels[s.name] is None:
            raise StudyError(f"DIR: the cached kernels of model {s.name} in {out} do not fit its inputs; "
                             f"rerun `eqntk run STUDY --out {out}`")
    return cfg, data, specs, kernels


def _cached(out: Path, spec, data: RegressionData) -> bool:
    return (out / "kernels" / f"{data.kernel_key(spec)}.npz").is_file()


def analyze(out: Path) -> None:
    """Learning curves from the cached kernels: the Parquet/CSV tables."""
    from analysis.regression import learning_curves, paired_differences, summarize


    out = Path(out)
    cfg, data, specs, kernels = _load(out)
    r = cfg.regression
    t0 = time.perf_counter()
    extra = {}
    if data.molecular:
        extra = dict(task="regression", baseline=data.baseline_features(r.resolved_baseline(True)))
    table = learning_curves(kernels, specs, data.pool_y, data.test_y, sizes=r.resolved_sizes, draws=r.draws,
                            kernel_names=r.kernels, times=r.resolved_times, diag_reg=r.diag_reg, seed=cfg.seed,
                            **extra)
    outputs = {"regression.parquet": lambda p: table.to_parquet(p, index=False),
               "regression.csv": lambda p: table.to_csv(p, index=False),
               "regression_summary.csv": lambda p: summarize(table).to_csv(p, index=False),
               "regression_pairs.csv": lambda p: paired_differences(table).to_csv(p, index=False)}
    for name, write in outputs.items():
        with atomic_path(out / name) as tmp:
            write(tmp)
    print(f"learning curves: {len(table)} rows in {time.perf_counter() - t0:.1f} s -> {out / 'regression.parquet'}")


def report(out: Path) -> Path:
    from analysis.regression_report import write_regression_report

    page = write_regression_report(Path(out))
    print(f"report: {page}")
    return page


def cmd_status(out: Path) -> int:
    resolved = json.loads((out / "study.json").read_text())
    cfg = StudyConfig(**resolved["config"])
    data = RegressionData.load(out / "inputs.npz")
    done = [s.name for s in cfg.model_specs if _cached(out, s, data)]
    todo = [s.name for s in cfg.model_specs if s.name not in done]
    print(f"{out}: kernel regression, {len(done)} of {len(done) + len(todo)} models' kernels cached"
          + (f"; missing: {', '.join(todo)}" if todo else "")
          + ("; table present" if (out / "regression.parquet").is_file() else "; no table yet"))
    return 0
