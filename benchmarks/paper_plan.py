"""The paper-scale study's predicted cost, and its slice run here against its prediction.

    python benchmarks/paper_plan.py [--run] [--out FILE]

Records in FILE (default benchmarks/paper_plan.json), which scripts/readme.py renders into
README.md:

- ``eqntk plan study/builtin/paper.yaml`` on this machine, and with ``--gpus 16 --nodes 2
  --cpus 64`` (a 16-GPU Ray cluster of two nodes with 8 GPUs and 32 CPUs each);
- the plan of study/builtin/paper_slice.yaml (its smallest widths) on this machine and, with
  ``--run``, that slice run here (``eqntk run``, wall time end to end, the load average
  before and after, and the plan at other jobs' load just before, ``eqntk.plan.current_load``). Wrap ``--run`` in the CPU lock: it keeps both cores busy for minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from eqntk import plan

ROOT = Path(__file__).resolve().parent.parent
PAPER = ROOT / "study" / "builtin" / "paper.yaml"
SLICE = ROOT / "study" / "builtin" / "paper_slice.yaml"
EQNTK = str(Path(sys.executable).with_name("eqntk"))


def planned(study: Path, resources: plan.Resources) -> dict:
    p = plan.plan_study(study, resources)
    return dict(study=str(study.relative_to(ROOT)), resources=resources.describe(), total_seconds=round(p.total_seconds, 1),
                phases={k: round(v, 1) for k, v in p.phases.items()}, units=len(p.units),
                text="\n".join(plan.lines(p)))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", action="store_true", help="run the slice here and record its wall time")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "paper_plan.json")
    a = ap.parse_args(argv)
    cpus = os.cpu_count() or 1
    record = json.loads(a.out.read_text()) if a.out.is_file() else {}
    record["paper_here"] = planned(PAPER, plan.Resources(cpus=cpus))
    record["paper_cluster"] = planned(PAPER, plan.Resources(cpus=64, gpus=16, nodes=2))
    record["slice_plan"] = planned(SLICE, plan.Resources(cpus=cpus))
    print(record["paper_here"]["text"], record["paper_cluster"]["text"], record["slice_plan"]["text"], sep="\n")
    if a.run:
        with tempfile.TemporaryDirectory(prefix="paper-slice-") as d:
            load, now = [round(x, 2) for x in os.getloadavg()], plan.current_load()
            at_load = planned(SLICE, plan.Resources(cpus=cpus, load=now))["total_seconds"]
            t0 = time.perf_counter()
            r = subprocess.run([EQNTK, "run", str(SLICE), "--out", str(Path(d) / "out"), "--no-progress"],
                               capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
            wall = time.perf_counter() - t0
            print(r.stdout[-3000:], r.stderr[-2000:])
            if r.returncode != 0:
                raise SystemExit(f"the slice run failed ({r.returncode})")
            units = [json.loads(p.read_text()) for p in (Path(d) / "out" / "units").glob("*.json")]
            # the predictions on disk: parts, or the files `eqntk run` compacted them into at its end
            parts = [p for p in (Path(d) / "out" / "predictions").rglob("*.parquet") if not p.name.startswith(".")]
            record["slice_run"] = dict(wall_seconds=round(wall, 1), load_average_before=load,
                                       load_average_after=[round(x, 2) for x in os.getloadavg()],
                                       unit_seconds=round(sum(u["seconds"] for u in units), 1), units=len(units),
                                       part_bytes=sum(p.stat().st_size for p in parts),
                                       predicted_seconds=record["slice_plan"]["total_seconds"],
                                       predicted_at_load_seconds=at_load, load_now=now)
            print(json.dumps(record["slice_run"]))
    a.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
