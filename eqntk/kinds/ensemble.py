"""``kind: ensemble`` (the default): finite ensembles trained as Ray units against the analytic NTK.

    validate   the data and the grid of work units (model, width, lr, member range)
    run        train every unit not yet in DIR (``eqntk.runner``, ``eqntk.store``); a rerun
               of the same command resumes, skipping finished units
    status     units done, diverged, failed, pending
    analyze    ensemble statistics, analytic predictions, comparisons (``eqntk.pipeline``)
    report     plots and DIR/report/index.html

A directory holds one study: a different study (or other data) is refused, and a finished
one is reused only with ``--resume``. eqntk/store.py describes the directory.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Union

from study.config import EnsembleStudy, StudyError, load_study, study_from_dict
from study.data import build_data
from study.grid import expand
from workers.footprint import machine_bytes, members_fitting, unit_bytes

from .. import pipeline
from ..compact import auto_compact
from ..runner import run_units
from ..store import ResultStore
from .base import RunOptions, StudyKind


class Prepared:
    """A validated study with its arrays and units: everything decided before any work."""

    def __init__(self, path: Path):
        self.path = path
        self.text = path.read_text() if path.is_file() else ""
        self.cfg: EnsembleStudy = load_study(path)
        self.data = build_data(self.cfg.data, self.cfg.seed, base=path.parent, group=self.cfg.group)
        self.cfg.check_inputs(self.data.input_shape, str(path), n_train=len(self.data.train_x))
        check_unit_memory(self.cfg, self.data.input_shape, self.data.n_out, str(path))
        self.digest = self.data.digest()
        self.units = expand(self.cfg, self.digest)

    @property
    def resolved(self) -> dict:
        return resolved_study(self.cfg, self.digest)


def check_unit_memory(cfg: EnsembleStudy, input_shape: tuple, n_out: int, origin: str) -> None:
    """Refuse, before any work, a unit whose predicted memory (``workers.footprint``) exceeds
    this machine's: its largest width and largest member range are checked for every model."""
    ram = machine_bytes()
    gb = lambda b: f"{b / 2**30:.3g}"
    for i, spec in enumerate(cfg.model_specs):
        width = max(cfg.widths_of(spec.name))
        members = min(cfg.unit_size, cfg.ensemble_size_of(spec.name))
        need = unit_bytes(spec, width, members, input_shape, n_out, cfg.dtype)
        if need <= ram:
            continue
        fit = members_fitting(spec, width, input_shape, n_out, cfg.dtype, ram)
        if fit < 1:
            one = unit_bytes(spec, width, 1, input_shape, n_out, cfg.dtype)
            raise StudyError(
                f"{origin}: widths: one member of {spec.name} (models.{i}) at width {width} needs about {gb(one)} GB, "
                f"more than this machine's {gb(ram)} GB; use smaller widths"
            )
        fit -= fit % 2 if spec.pairing == "antithetic" else 0
        raise StudyError(
            f"{origin}: members_per_unit: a unit of {members} members of {spec.name} (models.{i}) at width {width} "
            f"needs about {gb(need)} GB, more than this machine's {gb(ram)} GB; set members_per_unit: {max(fit, 1)} or less"
        )


def resolved_study(cfg: EnsembleStudy, digest: str) -> dict:
    """What study.json records: the study with every default filled in, and its data's digest."""
    return {
        "config": cfg.model_dump(mode="json"),
        "models": [m.model_dump(mode="json") for m in cfg.model_specs],
        "log_steps": cfg.resolved_log_steps,
        "data_digest": digest,
    }


def units_of(store: ResultStore) -> list:
    """The units of the study stored in a results directory."""
    resolved = store.resolved_study()
    return expand(study_from_dict(resolved["config"]), resolved["data_digest"])


def same_study(stored: dict, resolved: dict) -> bool:
    """Whether a directory's study.json records the study ``resolved``. Its config is read
    back through the schema first: a study.json written before each kind had its own schema
    also lists the other kind's fields, as null."""
    try:
        config = study_from_dict(stored["config"]).model_dump(mode="json")
    except (KeyError, TypeError, ValueError):
        return False
    return {**stored, "config": config} == resolved


class EnsembleKind(StudyKind):
    name = "ensemble"

    def validate(self, study: Path) -> int:
        p = Prepared(study)
        cfg = p.cfg
        print(f"study {cfg.name}: valid")
        print(f"  data: {len(p.data.train_x)} training inputs of shape {p.data.input_shape}, {p.data.n_out} outputs; "
              + ", ".join(f"{k} ({len(v)})" for k, v in p.data.eval_sets.items()))
        print(f"  log steps ({len(cfg.resolved_log_steps)}): {cfg.resolved_log_steps}")
        print(f"  {len(p.units)} units:")
        print(f"  {'unit id':16}  {'model':18} {'arch':9} {'group':5} {'width':>6} {'lr':>8} members")
        for u in p.units:
            print(f"  {u.unit_id:16}  {u.model.name:18} {u.model.arch:9} {u.model.group:5} {u.width:6d} {u.lr:8.3g} "
                  f"{u.member_start}..{u.member_stop - 1}")
        return 0

    def run(self, study: Path, options: RunOptions) -> int:
        p = Prepared(study)
        out = self.out_dir(options, p.cfg.name)
        store = ResultStore(out)
        if store.exists():
            if not same_study(store.resolved_study(), p.resolved):
                raise StudyError(
                    f"--out: {out} holds results of a different study (or other data); choose a new --out or delete it"
                )
            states = store.unit_states(p.units)
            if all(s in ("done", "diverged") for s in states.values()) and not options.resume:
                raise StudyError(
                    f"--out: {out} already holds this finished study; pass --resume to reuse it or choose a new --out"
                )
        self.refuse_other_directory(out)
        store.lock()
        try:
            if not store.exists():
                store.initialise(p.text, p.resolved, p.data)
            else:
                store.clean_temp_files()
                before = Counter(store.unit_states(p.units).values())
                print(f"resuming {out}: " + ", ".join(f"{v} {k}" for k, v in sorted(before.items())))
            res = p.cfg.resources
            summary = run_units(
                p.units,
                store,
                p.data,
                address=options.address,
                num_cpus=res.num_cpus,
                num_gpus=res.num_gpus,
                max_retries=p.cfg.max_retries,
                progress=options.progress,
            )
            for line in summary.lines():
                print(line)
            if options.compact:  # under the lock: no other run commits parts meanwhile
                auto_compact(store)
            print(f"results: {out}")
        finally:
            store.unlock()
        if options.analysis:
            self.report(out)
        return 1 if summary.failed else 0

    def status(self, out: Union[str, Path], verbose: bool = False) -> int:
        store = ResultStore(out)
        units = units_of(store)
        states = store.unit_states(units)
        counts = Counter(states.values())
        print(f"{out}: {len(units)} units: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("done", "diverged", "failed", "pending")))
        for u in units:
            s = states[u.unit_id]
            if s != "done" or verbose:
                rec = store.record(u.unit_id) or {}
                extra = f" at step {rec.get('steps_reached')}" if s == "diverged" else (f": {rec.get('error')}" if s == "failed" else "")
                print(f"  {s:8} {u.unit_id} {u.model.name} width={u.width} lr={u.lr:g} members {u.member_start}..{u.member_stop - 1}{extra}")
        return 0

    def analyze(self, out: Path) -> None:
        pipeline.analyze(out)

    def report(self, out: Path) -> None:
        pipeline.analyze(out)
        pipeline.report(out)
