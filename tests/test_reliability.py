"""Nothing lost, nothing duplicated: a killed worker, a killed driver, a directory in use,
a diverging unit, and a real two-node Ray cluster on this machine."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest

from eqntk.cli import main

EQNTK = str(Path(sys.executable).with_name("eqntk"))
RAY = str(Path(sys.executable).with_name("ray"))

# Units long enough (a few seconds each) to be killed in the middle.
STUDY = """
name: faults
seed: 11
data:
  train: {source: digits, n: 32}
  eval:
    - {name: noise, data: {source: gaussian, n: 8}}
group: C4
models:
  - {name: mlp, arch: mlp, depth: 2}
widths: [64, 128]
ensemble_size: 8
members_per_unit: 4
lr: 0.5
steps: STEPS
log_steps: {count: 6}
"""


def write_study(d: Path, steps: int, **replace) -> Path:
    text = textwrap.dedent(STUDY).replace("STEPS", str(steps))
    for old, new in replace.items():
        text = text.replace(old, new)
    p = d / "study.yaml"
    p.write_text(text)
    return p


def dataset(out: Path) -> pd.DataFrame:
    df = pd.read_parquet(out / "predictions")
    df["model"] = df["model"].astype(str)
    keys = ["model", "width", "member_start", "step", "eval_set", "sample", "group_element", "output"]
    assert not df.duplicated(keys).any(), "duplicate rows"
    return df.sort_values(keys).reset_index(drop=True)


def parts(out: Path) -> list[Path]:
    return sorted((out / "predictions").rglob("part-*.parquet"))


def no_temp_files(out: Path) -> bool:
    return not [p for p in out.rglob(".*") if p.name != ".lock"]


def spawn_run(study: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [EQNTK, "run", str(study), "--out", str(out), "--no-progress", "--no-analysis", *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the driver and the Ray it started
    )


def wait_for(cond, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        v = cond()
        if v:
            return v
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def unit_workers(driver: int) -> list[int]:
    """Ray workers running a unit for this driver (local Ray's processes descend from it),
    never another run's on this machine."""
    import psutil

    found = []
    for p in psutil.Process(driver).children(recursive=True):
        try:
            if "ray::execute_unit" in " ".join(p.cmdline()):
                found.append(p.pid)
        except psutil.Error:
            pass
    return found


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    study = write_study(d, steps=800)
    out = d / "out"
    assert main(["run", str(study), "--out", str(out), "--no-progress", "--no-analysis"]) == 0
    return study.read_text(), dataset(out)


def test_killed_worker_is_retried(tmp_path, reference):
    text, ref = reference
    study = tmp_path / "study.yaml"
    study.write_text(text)
    out = tmp_path / "out"
    proc = spawn_run(study, out)
    pid = wait_for(lambda: (unit_workers(proc.pid) or [None])[0], 120, "a worker running a unit")
    time.sleep(0.5)  # well inside the unit (each takes seconds)
    os.kill(pid, signal.SIGKILL)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log
    assert len(parts(out)) == 4 and no_temp_files(out)
    pd.testing.assert_frame_equal(dataset(out), ref)


def test_killed_driver_resumes(tmp_path, reference, capsys):
    text, ref = reference
    study = tmp_path / "study.yaml"
    study.write_text(text)
    out = tmp_path / "out"
    proc = spawn_run(study, out)
    wait_for(lambda: len(parts(out)) >= 1, 180, "a first finished unit")
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and its local Ray, mid-study
    proc.wait(timeout=30)
    n_done = len(parts(out))
    assert 1 <= n_done < 4, "the driver must die mid-study for this test to mean anything"

    assert main(["status", str(out)]) == 0
    status = capsys.readouterr().out
    assert f"{n_done} done" in status and f"{4 - n_done} pending" in status

    # The same command again: only the missing units run.
    assert main(["run", str(study), "--out", str(out), "--no-progress", "--no-analysis"]) == 0
    said = capsys.readouterr().out
    assert f"4 units: {n_done} already done, {4 - n_done} finished now" in said
    assert main(["status", str(out)]) == 0
    assert "4 done, 0 diverged, 0 failed, 0 pending" in capsys.readouterr().out
    assert no_temp_files(out)
    pd.testing.assert_frame_equal(dataset(out), ref)


def test_directory_in_use_refused(tmp_path, reference):
    text, _ = reference
    study = tmp_path / "study.yaml"
    study.write_text(text)
    out = tmp_path / "out"
    proc = spawn_run(study, out)
    try:
        wait_for(lambda: (out / "study.json").exists(), 120, "the first run to start")
        r = subprocess.run([EQNTK, "run", str(study), "--out", str(out), "--no-progress"], capture_output=True, text=True)
        assert r.returncode == 2
        assert "in use by another eqntk run" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


def test_diverging_unit_recorded(tmp_path, capsys):
    # lr far above 2N / lambda_max of the NTK: gradient descent blows up within a few steps.
    study = write_study(tmp_path, steps=100, **{"lr: 0.5": "lr: [0.5, 5000.0]", "widths: [64, 128]": "widths: [64]"})
    out = tmp_path / "out"
    assert main(["run", str(study), "--out", str(out), "--no-progress", "--no-analysis"]) == 0
    said = capsys.readouterr().out
    assert "2 diverged" in said
    recs = [json.loads(p.read_text()) for p in (out / "units").glob("*.json")]
    div = [r for r in recs if r["status"] == "diverged"]
    assert len(div) == 2 and all(r["lr"] == 5000.0 and 0 <= r["steps_reached"] < 100 for r in div)
    assert sum(r["status"] == "done" for r in recs) == 2  # the study went on
    assert main(["status", str(out)]) == 0
    assert "diverged" in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_node_cluster(tmp_path):
    import ray

    # A Ray left running in this process would be killed with the nodes below and take
    # pytest down with it; this test needs none.
    ray.shutdown()
    port = _free_port()
    # Ray >= 2.59 enables token authentication for clusters: every node and the driver
    # share one token, as on a real cluster.
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=os.urandom(16).hex())
    # Our own temp dir (short: Ray's socket paths must fit 107 bytes) marks this cluster's
    # processes, so the test stops only them, never another Ray on the machine.
    temp = Path(f"/tmp/eqntk-2node-{os.getpid()}")
    common = ["--num-cpus=1", "--disable-usage-stats", f"--temp-dir={temp}"]
    head = [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false", *common]
    worker = [RAY, "start", f"--address=127.0.0.1:{port}", *common]
    try:
        subprocess.run(head, check=True, capture_output=True, env=env, timeout=120)
        subprocess.run(worker, check=True, capture_output=True, env=env, timeout=120)
        study = write_study(tmp_path, steps=300)
        out = tmp_path / "out"
        r = subprocess.run(
            [EQNTK, "run", str(study), "--out", str(out), "--no-progress", "--no-analysis", "--address", f"127.0.0.1:{port}"],
            capture_output=True, text=True, timeout=600, env=env,
        )
        assert r.returncode == 0, r.stdout + r.stderr
        nodes = {json.loads(p.read_text())["node_id"] for p in (out / "units").glob("*.json")}
        assert len(nodes) == 2, f"units ran on {nodes}"
        assert len(parts(out)) == 4
    finally:
        _stop_cluster(str(temp))


def _stop_cluster(marker: str) -> None:
    """Stop the processes whose command line names ``marker`` (this test's raylets, GCS,
    monitors); their workers exit with their raylet."""
    for sig in ("TERM", "KILL"):
        subprocess.run(["pkill", f"-{sig}", "-f", marker], capture_output=True)
        time.sleep(2)
    subprocess.run(["rm", "-rf", marker], capture_output=True)
