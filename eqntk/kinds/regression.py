"""``kind: kernel_regression``: NTK and NNGP regression learning curves, no network trained.

    validate   data shapes, pool and test sizes, sizes, draws, models
    run        every model's kernels (cached), then the tables and the report
    status     which kernels are cached, whether the table exists
    analyze    recompute the learning-curve tables from the cached kernels
    report     tables, plot and DIR/report/index.html

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
from typing import Optional, Union

from analysis.coulomb import DescriptorModel, cached_descriptor_kernels
from analysis.regression import (
    cached_kernels,
    cached_molecule_kernels,
    inputs_digest,
    kernel_key,
    learning_curves,
    load_cached_kernels,
    paired_differences,
    summarize,
)
from analysis.regression_report import write_regression_report
from study.atomic import atomic_path, atomic_write
from study.config import RegressionStudy, StudyError, study_from_dict
from study.regression_data import RegressionData

from ..prepare import PreparedRegression
from ..store import ResultStore, versions
from .base import RunOptions, StudyKind, kind_name_of_dir


def data_kernel_key(data: RegressionData, spec) -> str:
    """The cache key of one model's kernels on these inputs."""
    if data.molecular:
        digest = inputs_digest(data.pool_x, data.test_x, data.pool_z > 0, data.test_z > 0)
        return kernel_key(spec, data.n_out, digest, engine="molecule_sum")
    return kernel_key(spec, data.n_out, inputs_digest(data.pool_x, data.test_x))


def compute_kernels(out: Path, p: PreparedRegression, address: Optional[str], use_ray: bool = True) -> dict:
    d = p.data
    if d.molecular:
        return {
            spec.name: cached_molecule_kernels(out / "kernels", spec, d.pool_x, d.pool_z > 0, d.test_x, d.test_z > 0,
                                               d.n_out, block_size=p.cfg.regression.block_size, use_ray=use_ray,
                                               address=address, num_gpus=p.cfg.resources.num_gpus if use_ray else 0)
            for spec in p.cfg.model_specs
        } | descriptor_kernels(out, p.cfg, d)
    return {
        spec.name: cached_kernels(out / "kernels", spec, p.data.pool_x, p.data.test_x, p.data.n_out,
                                  block_size=p.cfg.regression.block_size, use_ray=use_ray, address=address,
                                  num_gpus=p.cfg.resources.num_gpus if use_ray else 0)
        for spec in p.cfg.model_specs
    }


def descriptor_kernels(out: Path, cfg: RegressionStudy, d: RegressionData, log=print) -> dict:
    """The study's descriptor kernels (``regression.descriptors``, analysis.coulomb), cached beside the models'."""
    if cfg.regression.descriptors and d.pool_pos is None:
        raise StudyError(f"DIR: {out} holds no atom positions (inputs.npz from an older run); rerun `eqntk run STUDY --out {out}`")
    return {desc.name: cached_descriptor_kernels(out / "kernels", desc, d.pool_z, d.pool_pos, d.test_z, d.test_pos, log=log)
            for desc in cfg.regression.descriptors}


def _study(out: Path) -> RegressionStudy:
    return study_from_dict(json.loads((out / "study.json").read_text())["config"])


def _load(out: Path):
    cfg = _study(out)
    data = RegressionData.load(out / "inputs.npz")
    specs = {s.name: s for s in cfg.model_specs}

    kernels = {}
    for s in specs.values():
        if not _cached(out, s, data):
            raise StudyError(f"DIR: {out} lacks the cached kernels of model {s.name}; rerun `eqntk run STUDY --out {out}`")
        kernels[s.name] = load_cached_kernels(out / "kernels", data_kernel_key(data, s), len(data.pool_x), len(data.test_x),
                                      s.name, log=lambda *_: None)
        if kernels[s.name] is None:
            raise StudyError(f"DIR: the cached kernels of model {s.name} in {out} do not fit its inputs; "
                             f"rerun `eqntk run STUDY --out {out}`")
    if data.molecular:
        kernels |= descriptor_kernels(out, cfg, data, log=lambda *_: None)
        specs |= {desc.name: DescriptorModel(desc.name, arch=desc.kind) for desc in cfg.regression.descriptors}
    return cfg, data, specs, kernels


def _cached(out: Path, spec, data: RegressionData) -> bool:
    return (out / "kernels" / f"{data_kernel_key(data, spec)}.npz").is_file()


def analyze(out: Path) -> None:
    """Learning curves from the cached kernels: the Parquet/CSV tables."""
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
    page = write_regression_report(Path(out))
    print(f"report: {page}")
    return page


class RegressionKind(StudyKind):
    name = "kernel_regression"

    def validate(self, study: Path) -> int:
        print("\n".join(PreparedRegression(study).lines()))
        return 0

    def run(self, study: Path, options: RunOptions) -> int:
        """Any study of this kind may run into the directory: the tables are rewritten and
        every kernel whose spec and inputs are unchanged is reused. ``--resume`` and
        ``--no-progress`` change nothing; without the analysis the tables are still written."""
        p = PreparedRegression(study)
        out = self.out_dir(options, p.cfg.name)
        if (out / "study.json").is_file() and kind_name_of_dir(out) != self.name:
            raise StudyError(f"--out: {out} holds an ensemble study; choose a new --out for a kernel-regression study")
        self.refuse_other_directory(out)
        store = ResultStore(out)
        store.lock()
        try:
            out.mkdir(parents=True, exist_ok=True)
            p.data.save(out / "inputs.npz")
            atomic_write(out / "study.yaml", p.text.encode())
            atomic_write(out / "versions.json", json.dumps(versions(), indent=2).encode())
            atomic_write(out / "study.json", json.dumps(p.resolved, indent=2, sort_keys=True).encode())
            t0 = time.perf_counter()
            print(f"kernels: {len(p.cfg.model_specs)} models, pool {len(p.data.pool_x)}, test {len(p.data.test_x)}")
            compute_kernels(out, p, options.address)
            print(f"kernels ready in {time.perf_counter() - t0:.1f} s")
        finally:
            store.unlock()
        analyze(out)
        if options.analysis:
            report(out)
        print(f"results: {out}")
        return 0

    def status(self, out: Union[str, Path], verbose: bool = False) -> int:
        out = Path(out)
        cfg = _study(out)
        data = RegressionData.load(out / "inputs.npz")
        done = [s.name for s in cfg.model_specs if _cached(out, s, data)]
        todo = [s.name for s in cfg.model_specs if s.name not in done]
        print(f"{out}: kernel regression, {len(done)} of {len(done) + len(todo)} models' kernels cached"
              + (f"; missing: {', '.join(todo)}" if todo else "")
              + ("; table present" if (out / "regression.parquet").is_file() else "; no table yet"))
        return 0

    def analyze(self, out: Path) -> None:
        analyze(out)

    def report(self, out: Path) -> None:
        analyze(out)
        report(out)
