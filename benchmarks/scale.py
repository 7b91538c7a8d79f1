"""The runner and the store at thousands of units: a synthetic study of tiny units.

Each unit is 2 members of a width-2 MLP trained 1 step on 4 digits and logged twice, so
almost all of its time is the tool's own: Ray scheduling the task, the worker building the
unit and its Parquet part, the driver committing it. For each size (default 200 and 2,000
units) and each cluster (local Ray; a two-node Ray cluster on this machine, ``ray start
--head`` and ``ray start --address``, one CPU each) it runs ``eqntk run --no-analysis
--no-compact`` as a subprocess and records:

- the training phase's wall time (the runner's own figure) and the overhead per unit in ms:
  wall x slots / units, less the mean time a unit spent training (its record's ``seconds``);
- the driver's peak memory (RSS of the ``eqntk`` process, sampled every 50 ms; the Ray
  processes it starts are not counted);
- the number and total size of the Parquet part files;
- ``eqntk analyze``'s time to read them (its manifest's ``read`` seconds) and in all;
- then ``eqntk compact``: its own time (the seconds it prints) and its command's wall time,
  the number and size of the files after it, and ``eqntk analyze`` again (its theory cache
  removed first, so both analyses compute the same things), with whether every table came
  out bit for bit the same (``tables_identical``; the theory table's timing columns aside).

    python benchmarks/scale.py [--units 200 2000] [--clusters local two-node] [--out FILE] [--keep DIR]

Writes FILE (default benchmarks/scale.json), which scripts/readme.py renders into README.md.
Wrap it in the CPU lock (``flock /tmp/eqntk-heavy.lock ...``): it keeps both cores busy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import psutil

ROOT = Path(__file__).resolve().parent.parent
EQNTK = str(Path(sys.executable).with_name("eqntk"))
RAY = str(Path(sys.executable).with_name("ray"))

STUDY = """
name: scale-{units}
seed: 0
data:
  train: {{source: digits, n: 4}}
  eval:
    - {{name: noise, data: {{source: gaussian, n: 2}}}}
group: C4
models:
  - {{name: tiny, arch: mlp, depth: 1}}
widths: [2]
ensemble_size: {members}
members_per_unit: 2
lr: 0.1
steps: 1
log_steps: [0, 1]
"""


def write_study(d: Path, units: int) -> Path:
    p = d / f"scale-{units}.yaml"
    p.write_text(textwrap.dedent(STUDY.format(units=units, members=2 * units)))
    return p


class PeakRSS:
    """The largest resident set of process ``pid`` while it runs (sampled)."""

    def __init__(self, pid: int, every: float = 0.05):
        self.peak = 0
        self._stop = threading.Event()
        self._proc = psutil.Process(pid)
        self._thread = threading.Thread(target=self._sample, args=(every,), daemon=True)
        self._thread.start()

    def _sample(self, every: float):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self._proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(every)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def run(cmd: list[str], env: dict) -> tuple[str, float, int]:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    rss = PeakRSS(proc.pid)
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    peak = rss.stop()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out}")
    return out, wall, peak


def measure(units: int, work: Path, address: str | None, slots: int, env: dict, keep: Path | None = None) -> dict:
    study = write_study(work, units)
    out = work / f"out-{units}-{'cluster' if address else 'local'}"
    cmd = [EQNTK, "run", str(study), "--out", str(out), "--no-progress", "--no-analysis", "--no-compact"]
    if address:
        cmd += ["--address", address]
    load = os.getloadavg()[0]
    log, wall, peak = run(cmd, env)
    training = float(next(line for line in log.splitlines() if " units: " in line).rsplit(" in ", 1)[1].split()[0])
    records = [json.loads(p.read_text()) for p in (out / "units").glob("*.json")]
    assert len(records) == units and all(r["status"] == "done" for r in records), log
    unit_mean = sum(r["seconds"] for r in records) / units
    parts = list((out / "predictions").rglob("part-*.parquet"))
    part_bytes = sum(p.stat().st_size for p in parts)
    alog, awall, apeak = run([EQNTK, "analyze", str(out)], env)
    manifest = json.loads((out / "analysis" / "manifest.json").read_text())
    before = tables(out)
    shutil.rmtree(out / "analysis")  # the second analysis computes the analytic predictions again too
    clog, cwall, _ = run([EQNTK, "compact", str(out)], env)
    compact_seconds = float(clog.strip().splitlines()[-1].rsplit(" in ", 1)[1].split()[0])
    files = [p for p in (out / "predictions").rglob("*.parquet") if not p.name.startswith(".")]
    _, cawall, capeak = run([EQNTK, "analyze", str(out)], env)
    cmanifest = json.loads((out / "analysis" / "manifest.json").read_text())
    after = tables(out)
    row = dict(
        units=units, cluster="two-node" if address else "local", slots=slots, load_average=round(load, 2),
        run_wall_seconds=round(wall, 2), training_seconds=training,
        overhead_ms_per_unit=round(1000 * (training * slots / units - unit_mean), 1),
        unit_seconds_mean=round(unit_mean, 4), driver_peak_rss_bytes=peak,
        part_files=len(parts), part_bytes=part_bytes,
        nodes=len({r["node_id"] for r in records}),
        analyze_read_seconds=manifest["seconds"]["read"], analyze_seconds=manifest["seconds"]["total"],
        analyze_wall_seconds=round(awall, 2), analyze_peak_rss_bytes=apeak,
        compact_seconds=compact_seconds, compact_wall_seconds=round(cwall, 2),
        compacted_files=len(files), compacted_bytes=sum(p.stat().st_size for p in files),
        compacted_analyze_read_seconds=cmanifest["seconds"]["read"], compacted_analyze_seconds=cmanifest["seconds"]["total"],
        compacted_analyze_wall_seconds=round(cawall, 2), compacted_analyze_peak_rss_bytes=capeak,
        tables_identical=all(before[k].equals(after[k]) for k in before) and before.keys() == after.keys(),
        load_average_after=round(os.getloadavg()[0], 2),
    )
    print(json.dumps(row), flush=True)
    if keep:
        keep.mkdir(parents=True, exist_ok=True)
        shutil.move(str(out), str(keep / out.name))
    else:
        shutil.rmtree(out, ignore_errors=True)
    return row


def tables(out: Path) -> dict[str, pd.DataFrame]:
    """``eqntk analyze``'s tables, less the theory table's timing columns (seconds, cached)."""
    found = {p.stem: pd.read_parquet(p) for p in sorted((out / "analysis").glob("*.parquet"))}
    found["theory"] = found["theory"].drop(columns=["seconds", "cached"], errors="ignore")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TwoNodeCluster:
    """A head and a worker node on this machine, one CPU each, with a token as on a real cluster;
    its own temp dir marks its processes so that only they are stopped."""

    def __init__(self):
        self.port = free_port()
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())
        self.temp = f"/tmp/eqntk-scale-{os.getpid()}"

    def __enter__(self) -> "TwoNodeCluster":
        common = ["--num-cpus=1", "--disable-usage-stats", f"--temp-dir={self.temp}"]
        subprocess.run([RAY, "start", "--head", f"--port={self.port}", "--include-dashboard=false", *common],
                       check=True, capture_output=True, env=self.env, timeout=180)
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{self.port}", *common],
                       check=True, capture_output=True, env=self.env, timeout=180)
        return self

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __exit__(self, *exc):
        # the processes whose command line names our temp dir, and only those
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if self.temp in " ".join(p.info["cmdline"] or []):
                    p.terminate()
            except psutil.Error:
                pass
        time.sleep(2)
        for p in psutil.process_iter(["pid", "cmdline"]):
            try:
                if self.temp in " ".join(p.info["cmdline"] or []):
                    p.kill()
            except psutil.Error:
                pass
        shutil.rmtree(self.temp, ignore_errors=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, nargs="+", default=[200, 2000])
    ap.add_argument("--clusters", nargs="+", choices=["local", "two-node"], default=["local", "two-node"])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "scale.json")
    ap.add_argument("--keep", type=Path, help="move the results directories here (default: delete them)")
    a = ap.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="eqntk-scale-") as d:
        work = Path(d)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if "local" in a.clusters:
            for n in a.units:
                rows.append(measure(n, work, None, os.cpu_count() or 1, env, a.keep))
        if "two-node" in a.clusters:
            with TwoNodeCluster() as cluster:
                for n in a.units:
                    rows.append(measure(n, work, cluster.address, 2, dict(cluster.env, OMP_NUM_THREADS="1"), a.keep))
    record = dict(machine=dict(cpus=os.cpu_count(), memory_gib=round(psutil.virtual_memory().total / 2**30)),
                  command=f"python benchmarks/scale.py --units {' '.join(map(str, a.units))} --clusters {' '.join(a.clusters)}",
                  rows=rows)
    a.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
