"""Bounded validation (issue #16): every bad or absurd study file is refused or planned within
5 s by ``eqntk validate`` and ``eqntk plan``, each run as a user runs it (a fresh process,
imports included).

    python benchmarks/bounded.py [--out benchmarks/bounded.json]

The study files: every refused case of tests/test_config.py (``CASES``), the absurd but
valid sizes of tests/test_plan.py (``ABSURD_VALID``), and large grids (``LARGE``: 50,000 and
100,000 units, the most a study may expand to, and 200,000, refused). Each command's wall
time and CPU time (user + system of the child) are recorded with the load average: on this
shared 2-core machine the wall time includes other jobs' share of the cores, the CPU time
does not. ``scripts/readme.py`` renders the record as README's table of refused inputs.

The model operation counts ``eqntk plan`` prices with are cached per machine
(``eqntk.cost.model_profile``); one plan of the tiny study before the timings fills that
cache for its two models, as a user's first plan of a study would.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

from test_config import CASES, GOOD, replace  # noqa: E402  (the refused cases are the tests')

ABSURD_VALID = [
    ("a billion steps", replace(GOOD, "steps: 20", "steps: 1000000000")),
    ("a thousand logs of a billion steps", replace(GOOD, "steps: 20\nlog_steps: [0, 5, 20]",
                                                   "steps: 1000000000\nlog_steps: {count: 1000}")),
    ("a million members in units of 1000", replace(GOOD, "ensemble_size: 4", "ensemble_size: 1000000\nmembers_per_unit: 1000")),
    ("a width of 30,000", replace(GOOD, "widths: [8, 16]", "widths: [30000]")),
]


def large(units_per_ensemble: int) -> str:
    """Two models at five widths, ``units_per_ensemble`` units of 1,000 members each."""
    return replace(replace(GOOD, "widths: [8, 16]", "widths: [8, 16, 32, 64, 128]"), "ensemble_size: 4",
                   f"ensemble_size: {units_per_ensemble * 1000}\nmembers_per_unit: 1000")


LARGE = [("50,000 units", large(5000)), ("100,000 units (the most a study may have)", large(10000)),
         ("200,000 units", large(20000))]


def eqntk() -> str:
    return str(Path(sys.executable).with_name("eqntk"))


def timed(command: list[str]) -> dict:
    """Exit code, wall and CPU seconds and the answer's last line of one command."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    r = subprocess.run(command, capture_output=True, text=True, timeout=600)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    err = r.stderr.strip().splitlines()
    out = r.stdout.strip().splitlines()
    answer = err[-1] if r.returncode else next((l.strip() for l in out if "wall time:" in l or " units:" in l), "")
    return dict(exit=r.returncode, wall_seconds=round(wall, 2), cpu_seconds=round(cpu, 2), answer=answer,
                error_lines=len(err))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "bounded.json"))
    args = ap.parse_args(argv)
    cases = ([(name, text, files, "refused") for name, text, files, _ in CASES]
             + [(name, text, {}, "valid") for name, text in ABSURD_VALID]
             + [(name, text, {}, "valid" if "200,000" not in name else "refused") for name, text in LARGE])
    rows = []
    load_before = [round(x, 2) for x in os.getloadavg()]
    with tempfile.TemporaryDirectory() as d:
        warm = Path(d) / "warm.yaml"
        warm.write_text(GOOD)
        subprocess.run([eqntk(), "plan", str(warm)], capture_output=True, check=True)
        for i, (name, text, files, expected) in enumerate(cases):
            case_dir = Path(d) / f"case{i}"
            case_dir.mkdir()
            path = case_dir / "study.yaml"
            path.write_text(text)
            for fname, data in files.items():
                (case_dir / fname).write_bytes(data)
            row = dict(case=name, expected=expected, load=round(os.getloadavg()[0], 2),
                       validate=timed([eqntk(), "validate", str(path)]), plan=timed([eqntk(), "plan", str(path)]))
            for cmd in ("validate", "plan"):  # the answer names the files by their temporary paths
                row[cmd]["answer"] = row[cmd]["answer"].replace(str(path), "STUDY").replace(f"{case_dir}/", "")
            rows.append(row)
            print(f"{name}: validate exit {row['validate']['exit']} in {row['validate']['wall_seconds']} s, "
                  f"plan exit {row['plan']['exit']} in {row['plan']['wall_seconds']} s", flush=True)
    rec = dict(command="python benchmarks/bounded.py", machine=dict(cpus=os.cpu_count(), host=platform.node()),
               load_average_before=load_before, load_average_after=[round(x, 2) for x in os.getloadavg()], rows=rows)
    Path(args.out).write_text(json.dumps(rec, indent=1) + "\n")
    print(f"record: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
