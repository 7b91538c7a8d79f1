"""Runs a study's units as Ray tasks and commits their parts into the store.

Local mode (no address) starts Ray in-process on this machine; ``address`` joins a
cluster (``auto`` for the one this machine belongs to). Each unit is one task with the
resources the study asks for; Ray retries a task whose worker died (``max_retries``), and
the driver writes a part only when a task returns, so nothing is half-written or
duplicated. A driver killed mid-study loses only the units in flight: the rerun skips every
unit whose part exists.
"""

from __future__ import annotations

import os
import platform
import time
import traceback
from dataclasses import dataclass, field

import ray
import torch
from tqdm import tqdm

from study.config import StudyError
from study.grid import UnitSpec
from workers.unit import run_unit

from .store import PartWriter, ResultStore


@dataclass
class RunSummary:
    total: int
    skipped: int
    done: int = 0
    diverged: list = field(default_factory=list)
    failed: list = field(default_factory=list)
    seconds: float = 0.0
    nodes: set = field(default_factory=set)

    def lines(self) -> list[str]:
        out = [
            f"{self.total} units: {self.skipped} already done, {self.done} finished now, "
            f"{len(self.diverged)} diverged, {len(self.failed)} failed, in {self.seconds:.1f} s"
            + (f" on {len(self.nodes)} node(s)" if self.nodes else "")
        ]
        for uid, name, steps in self.diverged:
            out.append(f"  diverged: {name} ({uid}) at step {steps}")
        for uid, name, err in self.failed:
            out.append(f"  failed: {name} ({uid}): {err}")
        return out


def execute_unit(unit: UnitSpec, data, num_threads: int = 1) -> dict:
    """Train one unit and return its part bytes and record (runs inside a Ray task)."""
    torch.set_num_threads(max(1, num_threads))
    writer = PartWriter(unit)
    try:
        outcome = run_unit(unit, data, writer)
    except BaseException:
        writer.discard()
        raise
    node = _node_id()
    record = {
        "unit_id": unit.unit_id,
        "model": unit.model.name,
        "width": unit.width,
        "lr": unit.lr,
        "members": [unit.member_start, unit.member_stop],
        "status": outcome.status,
        "steps_reached": outcome.steps_reached,
        "seconds": outcome.seconds,
        "device": outcome.device,
        "node_id": node,
        "hostname": platform.node(),
        "pid": os.getpid(),
    }
    part = writer.finish(record)
    return {"part": part, "record": record}


def _node_id() -> str:
    try:

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except Exception:
        pass
    return "local"


def check_local_resources(num_cpus: float, num_gpus: float, address: str | None) -> None:
    """Refuse a study whose units ask for more than this machine has when Ray runs locally:
    Ray would hold such a unit back forever. A cluster (``address``) may add nodes on demand
    (an autoscaler), so there Ray is left to place the units."""
    if address:
        return
    cpus, gpus = os.cpu_count() or 1, torch.cuda.device_count()
    if num_gpus > gpus:
        raise StudyError(f"resources.num_gpus: each unit asks for {num_gpus:g} GPU but this machine has {gpus}; "
                         "set resources: {num_gpus: 0}, or run on a cluster with GPUs (--address)")
    if num_cpus > cpus:
        raise StudyError(f"resources.num_cpus: each unit asks for {num_cpus:g} CPUs but this machine has {cpus}; "
                         f"set resources: {{num_cpus: {cpus}}} or fewer, or run on a cluster (--address)")


def _init_ray(address: str | None):

    if ray.is_initialized():
        return False
    kwargs = dict(include_dashboard=False, logging_level="WARNING", log_to_driver=True)
    if address:
        ray.init(address=address, **kwargs)
    else:
        ray.init(num_cpus=os.cpu_count(), **kwargs)
    return True


def run_units(
    units: list[UnitSpec],
    store: ResultStore,
    data,
    *,
    address: str | None = None,
    num_cpus: float = 1,
    num_gpus: float = 0,
    max_retries: int = 3,
    progress: bool = True,
) -> RunSummary:
    """Run every unit of ``units`` whose part is missing; return a summary."""

    start = time.time()
    done = store.finished_ids()  # one scan of the store, parts and compacted files
    pending = [u for u in units if u.unit_id not in done]
    summary = RunSummary(total=len(units), skipped=len(units) - len(pending))
    if not pending:
        return summary
    started_here = _init_ray(address)
    try:
        task = ray.remote(execute_unit).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries, retry_exceptions=False
        )
        data_ref = ray.put(data)
        threads = max(1, int(num_cpus))
        refs = {task.remote(u, data_ref, threads): u for u in pending}
        bar = tqdm(total=len(units), initial=summary.skipped, unit="unit", disable=not progress, smoothing=0.1)
        while refs:
            ready, _ = ray.wait(list(refs), num_returns=1)
            for ref in ready:
                unit = refs.pop(ref)
                try:
                    result = ray.get(ref)
                except Exception as e:  # the task failed for good (after its retries)
                    err = _short_error(e)
                    store.record_failure(
                        unit, {"unit_id": unit.unit_id, "model": unit.model.name, "width": unit.width, "status": "failed", "error": err}
                    )
                    summary.failed.append((unit.unit_id, unit.model.name, err))
                else:
                    rec = result["record"]
                    store.commit(unit, result["part"], rec)
                    summary.nodes.add(rec["node_id"])
                    if rec["status"] == "diverged":
                        summary.diverged.append((unit.unit_id, unit.model.name, rec["steps_reached"]))
                    else:
                        summary.done += 1
                bar.update(1)
        bar.close()
    finally:
        if started_here:
            ray.shutdown()
    summary.seconds = time.time() - start
    return summary


def _short_error(e: BaseException) -> str:
    cause = getattr(e, "cause", None) or e
    lines = "".join(traceback.format_exception_only(type(cause), cause)).strip().splitlines()
    return lines[-1] if lines else type(e).__name__
