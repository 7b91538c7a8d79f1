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

from study.config import StudyError, study_from_dict
from study.grid import expand

from .. import pipeline
from ..compact import auto_compact
from ..prepare import Prepared, resolved_study  # noqa: F401 (resolved_study: callers import it from here)
from ..runner import check_local_resources, run_units
from ..store import ResultStore
from .base import RunOptions, StudyKind


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
        print("\n".join(Prepared(study).lines()))
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
        check_local_resources(p.cfg.resources.num_cpus, p.cfg.resources.num_gpus, options.address)
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
