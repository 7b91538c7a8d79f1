"""The ``eqntk`` command line.

    eqntk validate STUDY            check a study file and print its grid of units
    eqntk run [STUDY] [--out DIR]   run it (the built-in study without STUDY), then analyse
    eqntk status DIR                units done, diverged, failed, pending
    eqntk analyze DIR               analytic predictions and comparisons (tables)
    eqntk report DIR                plots and DIR/report/index.html

Bad input exits with code 2 and one line naming the field and the fix; nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

from study.config import StudyConfig, StudyError, builtin_study_path, load_study
from study.data import build_data
from study.grid import expand

from . import pipeline, regression
from .runner import run_units
from .store import ResultStore


class Prepared:
    """A validated study with its arrays and units: everything decided before any work."""

    def __init__(self, path: Path):
        self.path = path
        self.text = path.read_text() if path.is_file() else ""
        self.cfg: StudyConfig = load_study(path)
        self.data = build_data(self.cfg.data, self.cfg.seed, base=path.parent, group=self.cfg.group)
        self.cfg.check_inputs(self.data.input_shape, str(path), n_train=len(self.data.train_x))
        self.digest = self.data.digest()
        self.units = expand(self.cfg, self.digest)

    @property
    def resolved(self) -> dict:
        return resolved_study(self.cfg, self.digest)


def resolved_study(cfg: StudyConfig, digest: str) -> dict:
    return {
        "config": cfg.model_dump(mode="json"),
        "models": [m.model_dump(mode="json") for m in cfg.model_specs],
        "log_steps": cfg.resolved_log_steps,
        "data_digest": digest,
    }


def units_of(store) -> list:
    """The units of the study stored in a results directory."""
    resolved = store.resolved_study()
    return expand(StudyConfig(**resolved["config"]), resolved["data_digest"])


# ----- commands ------------------------------------------------------------------------
def cmd_validate(args) -> int:
    if regression.is_regression_study(Path(args.study)):
        return regression.cmd_validate(Path(args.study))
    p = Prepared(Path(args.study))
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


def cmd_run(args) -> int:
    study_path = Path(args.study) if args.study else builtin_study_path(quick=args.quick)
    if regression.is_regression_study(study_path):
        return regression.cmd_run(study_path, Path(args.out) if args.out else None, args.address,
                                  analysis=not args.no_analysis)
    p = Prepared(study_path)
    out = Path(args.out) if args.out else Path("results") / p.cfg.name
    store = ResultStore(out)
    if store.exists():
        if store.resolved_study() != p.resolved:
            raise StudyError(
                f"--out: {out} holds results of a different study (or other data); choose a new --out or delete it"
            )
        states = store.unit_states(p.units)
        if all(s in ("done", "diverged") for s in states.values()) and not args.resume:
            raise StudyError(
                f"--out: {out} already holds this finished study; pass --resume to reuse it or choose a new --out"
            )
    elif (out.exists() and any(p_ for p_ in out.iterdir() if p_.name != ".lock")):
        raise StudyError(f"--out: {out} exists and is not an eqntk results directory; choose another --out")
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
            address=args.address,
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus,
            max_retries=p.cfg.max_retries,
            progress=not args.no_progress,
        )
        for line in summary.lines():
            print(line)
        print(f"results: {out}")
    finally:
        store.unlock()
    if not args.no_analysis:
        _analyze(out, report=True)
    return 1 if summary.failed else 0


def cmd_status(args) -> int:
    store = ResultStore(args.dir)
    if not store.exists():
        raise StudyError(f"DIR: {args.dir} is not an eqntk results directory (no study.json)")
    if regression.is_regression_dir(Path(args.dir)):
        return regression.cmd_status(Path(args.dir))
    units = units_of(store)
    states = store.unit_states(units)
    counts = Counter(states.values())
    print(f"{args.dir}: {len(units)} units: " + ", ".join(f"{counts.get(k, 0)} {k}" for k in ("done", "diverged", "failed", "pending")))
    for u in units:
        s = states[u.unit_id]
        if s != "done" or args.verbose:
            rec = store.record(u.unit_id) or {}
            extra = f" at step {rec.get('steps_reached')}" if s == "diverged" else (f": {rec.get('error')}" if s == "failed" else "")
            print(f"  {s:8} {u.unit_id} {u.model.name} width={u.width} lr={u.lr:g} members {u.member_start}..{u.member_stop - 1}{extra}")
    return 0


def _analyze(out: Path, report: bool) -> None:
    if regression.is_regression_dir(out):
        regression.analyze(out)
        if report:
            regression.report(out)
        return
    pipeline.analyze(out)
    if report:
        pipeline.report(out)


def cmd_analyze(args) -> int:
    _require_results(args.dir)
    _analyze(Path(args.dir), report=False)
    return 0


def cmd_report(args) -> int:
    _require_results(args.dir)
    _analyze(Path(args.dir), report=True)
    return 0


def _require_results(d: str) -> None:
    if not (Path(d) / "study.json").is_file():
        raise StudyError(f"DIR: {d} is not an eqntk results directory (no study.json); run `eqntk run --out {d}` first")


# ----- entry point ----------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="eqntk", description="Equivariant NTK study: finite ensembles against theory.")
    sub = ap.add_subparsers(dest="command", required=True)
    v = sub.add_parser("validate", help="check a study file and print its units")
    v.add_argument("study")
    v.set_defaults(fn=cmd_validate)
    r = sub.add_parser("run", help="run a study (the built-in one without STUDY)")
    r.add_argument("study", nargs="?")
    r.add_argument("--out", help="results directory (default results/<study name>)")
    r.add_argument("--address", help="Ray cluster address ('auto' for this machine's cluster); local Ray if omitted")
    r.add_argument("--resume", action="store_true", help="reuse a results directory that already holds this study")
    r.add_argument("--quick", action="store_true", help="the small built-in study (smoke test, about 2 minutes)")
    r.add_argument("--no-analysis", action="store_true", help="only train; skip analysis and report")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(fn=cmd_run)
    s = sub.add_parser("status", help="units done, diverged, failed and pending")
    s.add_argument("dir")
    s.add_argument("-v", "--verbose", action="store_true")
    s.set_defaults(fn=cmd_status)
    a = sub.add_parser("analyze", help="analytic predictions and comparison tables")
    a.add_argument("dir")
    a.set_defaults(fn=cmd_analyze)
    p = sub.add_parser("report", help="plots and an HTML report")
    p.add_argument("dir")
    p.set_defaults(fn=cmd_report)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except StudyError as e:
        print(f"eqntk: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("eqntk: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
