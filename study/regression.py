"""``kind: kernel_regression`` studies: the ``eqntk`` commands for them.

    eqntk validate STUDY     data shapes, pool and test sizes, sizes, draws, models
    eqntk run STUDY --out DIR
    eqntk status DIR         which kernels are cached, whether the table exists
    eqntk analyze DIR        recompute the learning-curve tables from the cached kernels
    eqntk report DIR         tables, plot and DIR/report/index.html

Results directory (``DIR``)::

    study.yaml, study.json, versions.json   as for ensemble studies
    inputs.npz          train_x, train_y (the pool of training candidates), eval__test, test_y
    kernels/<key>.npz   nngp_pool, ntk_pool [P, P]; nngp_test, ntk_test [T, P] (one model)
    kernels/<key>.json  the spec, data digest, shapes and the seconds the kernels took
    regression.parquet  one row per (model, kernel, time, size, draw); also regression.csv
    regression_summary.csv, regression_pairs.csv    means, CIs and paired differences
    report/index.html, report/learning_curves.png

A rerun into the same ``DIR`` (say with more sizes or draws) reuses every cached kernel whose
spec and inputs are unchanged, and rewrites the tables.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from .config import StudyConfig, StudyError, load_study
from .data import StudyData, _labelled, _normalize


class RegressionData:
    def __init__(self, pool_x, pool_y, test_x, test_y):
        self.pool_x, self.pool_y, self.test_x, self.test_y = pool_x, pool_y, test_x, test_y

    @property
    def input_shape(self):
        return tuple(self.pool_x.shape[1:])

    @property
    def n_out(self):
        return int(self.pool_y.shape[1])

    def digest(self) -> str:
        return StudyData(self.pool_x, self.pool_y, {"test": self.test_x, "test_y": self.test_y}).digest()

    def save(self, path: Path) -> None:
        tmp = path.with_name("." + path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, train_x=self.pool_x, train_y=self.pool_y, eval__test=self.test_x, test_y=self.test_y)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "RegressionData":
        with np.load(path) as z:
            return cls(z["train_x"], z["train_y"], z["eval__test"], z["test_y"])


def build_regression_data(cfg: StudyConfig, base: Path) -> RegressionData:
    d, r = cfg.data, cfg.regression
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
    print(f"  data: pool of {len(p.data.pool_x)} training candidates of shape {p.data.input_shape}, "
          f"{p.data.n_out} outputs; test set {len(p.data.test_x)}")
    print(f"  sizes: {r.resolved_sizes}; {r.draws} draws each; kernels {r.kernels}; times {r.times}; diag_reg {r.diag_reg:g}")
    print(f"  models: " + ", ".join(f"{m.name} ({m.arch}, {m.group}, {m.basis}, {m.augmentation})" for m in cfg.model_specs))
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
        from .store import _atomic_write, versions

        p.data.save(out / "inputs.npz")
        _atomic_write(out / "study.yaml", p.text.encode())
        _atomic_write(out / "versions.json", json.dumps(versions(), indent=2).encode())
        _atomic_write(out / "study.json", json.dumps(p.resolved, indent=2, sort_keys=True).encode())
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
    from analysis.regression import cached_kernels

    return {
        spec.name: cached_kernels(out / "kernels", spec, p.data.pool_x, p.data.test_x, p.data.n_out,
                                  block_size=p.cfg.regression.block_size, use_ray=use_ray, address=address)
        for spec in p.cfg.model_specs
    }


def _load(out: Path):
    from analysis.regression import cached_kernels

    resolved = json.loads((out / "study.json").read_text())
    cfg = StudyConfig(**resolved["config"])
    data = RegressionData.load(out / "inputs.npz")
    specs = {s.name: s for s in cfg.model_specs}

    kernels = {}
    for s in specs.values():
        if not _cached(out, s, data):
            raise StudyError(f"DIR: {out} lacks the cached kernels of model {s.name}; rerun `eqntk run STUDY --out {out}`")
        kernels[s.name] = cached_kernels(out / "kernels", s, data.pool_x, data.test_x, data.n_out, log=lambda *_: None)
    return cfg, data, specs, kernels


def _cached(out: Path, spec, data: RegressionData) -> bool:
    from analysis.regression import inputs_digest, kernel_key

    key = kernel_key(spec, data.n_out, inputs_digest(data.pool_x, data.test_x))
    return (out / "kernels" / f"{key}.npz").is_file()


def analyze(out: Path) -> None:
    """Learning curves from the cached kernels: the Parquet/CSV tables."""
    from analysis.regression import learning_curves, paired_differences, summarize

    out = Path(out)
    cfg, data, specs, kernels = _load(out)
    r = cfg.regression
    t0 = time.perf_counter()
    table = learning_curves(kernels, specs, data.pool_y, data.test_y, sizes=r.resolved_sizes, draws=r.draws,
                            kernel_names=r.kernels, times=r.resolved_times, diag_reg=r.diag_reg, seed=cfg.seed)
    table.to_parquet(out / "regression.parquet", index=False)
    table.to_csv(out / "regression.csv", index=False)
    summarize(table).to_csv(out / "regression_summary.csv", index=False)
    paired_differences(table).to_csv(out / "regression_pairs.csv", index=False)
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
