"""The ``eqntk`` command line.

    eqntk validate STUDY            check a study file and print its plan of work
    eqntk plan STUDY [--cpus N] [--gpus N] [--nodes N] [--load L]   predicted time, memory, result size
    eqntk run [STUDY] [--out DIR]   run it (the built-in study without STUDY), then analyse
    eqntk status DIR                how far the work has got
    eqntk analyze DIR               the tables
    eqntk report DIR                the tables, plots and DIR/report/index.html
    eqntk compact DIR               merge the result store's part files into few (eqntk.compact)

``validate`` and ``plan`` check a study before any work (``eqntk.prepare``, ``eqntk.plan``);
every other command goes to the kind of its study (``eqntk.kinds``): the ``kind`` of the study
file, or the one a results directory's study.json records. Bad input exits with code 2 and
one line naming the field and the fix; nothing is written.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from study.config import StudyError, builtin_study_path

from . import compact, plan, prepare


def kinds():
    """``eqntk.kinds``, for the commands that do a study's work (run, status, analyze, report)."""
    # deferred: the kinds import Ray, the analysis and its plots (0.7 s here, twice that under
    # load), which validate and plan never use and cannot afford: issue #16 bounds them to 5 s
    # for any study file on a shared 2-core machine. No cycle is dodged: nothing imports eqntk.cli.
    return importlib.import_module("eqntk.kinds")


def cmd_validate(args) -> int:
    print("\n".join(prepare.prepare(Path(args.study)).lines()))
    return 0


def cmd_plan(args) -> int:
    resources = plan.default_resources(args.cpus, args.gpus, args.nodes, args.load)
    p = plan.plan_study(Path(args.study), resources, log=lambda m: print(m, file=sys.stderr))
    for line in plan.lines(p):
        print(line)
    return 0


def cmd_run(args) -> int:
    study = Path(args.study) if args.study else builtin_study_path(quick=args.quick)
    options = kinds().RunOptions(out=Path(args.out) if args.out else None, address=args.address,
                                 resume=args.resume, analysis=not args.no_analysis, progress=not args.no_progress,
                                 compact=not args.no_compact)
    return kinds().kind_of_study(study).run(study, options)


def cmd_status(args) -> int:
    if not (Path(args.dir) / "study.json").is_file():
        raise StudyError(f"DIR: {args.dir} is not an eqntk results directory (no study.json)")
    return kinds().kind_of_dir(Path(args.dir)).status(args.dir, verbose=args.verbose)


def cmd_analyze(args) -> int:
    _require_results(args.dir)
    kinds().kind_of_dir(Path(args.dir)).analyze(Path(args.dir))
    return 0


def cmd_report(args) -> int:
    _require_results(args.dir)
    kinds().kind_of_dir(Path(args.dir)).report(Path(args.dir))
    return 0


def cmd_compact(args) -> int:
    compact.compact_dir(Path(args.dir))
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
    pl = sub.add_parser("plan", help="predicted wall time, memory per unit and result size (calibrated on this machine)")
    pl.add_argument("study")
    pl.add_argument("--cpus", type=int, help="CPUs in all (default: this machine's, times --nodes)")
    pl.add_argument("--gpus", type=int, help="GPUs in all (units then train one per GPU)")
    pl.add_argument("--nodes", type=int, help="machines the CPUs and GPUs are spread over (default 1)")
    pl.add_argument("--load", type=float, help="other jobs' load on each node, in busy CPUs (default 0: the machines to "
                    "ourselves; a shared machine's load average)")
    pl.set_defaults(fn=cmd_plan)
    r = sub.add_parser("run", help="run a study (the built-in one without STUDY)")
    r.add_argument("study", nargs="?")
    r.add_argument("--out", help="results directory (default results/<study name>)")
    r.add_argument("--address", help="Ray cluster address ('auto' for this machine's cluster); local Ray if omitted")
    r.add_argument("--resume", action="store_true", help="reuse a results directory that already holds this study")
    r.add_argument("--quick", action="store_true", help="the small built-in study (smoke test, about 2 minutes)")
    r.add_argument("--no-analysis", action="store_true", help="only train; skip analysis and report")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.add_argument("--no-compact", action="store_true", help="leave one Parquet part per unit (no compaction at the end)")
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
    c = sub.add_parser("compact", help="merge the part files of a results directory into few larger ones")
    c.add_argument("dir")
    c.set_defaults(fn=cmd_compact)
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
