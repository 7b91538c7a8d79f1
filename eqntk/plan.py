"""``eqntk plan STUDY``: a study's predicted wall time, memory and result size, before any work.

The per-unit and per-model costs come from ``eqntk.cost`` (calibrated on this machine); this
module turns them into wall time for the resources given, the way the runner uses them:

- training: Ray runs one unit per free slot (``cpus / resources.num_cpus`` slots, or one per
  GPU), in the order the units are listed, each slot's first unit after its worker started;
  the wall time is the list schedule of the predicted unit times over the slots;
- analysis (ensemble studies): the analytic prediction of each (model, lr) in a process pool
  of one worker per CPU of the driver's node (``analysis.theory.study_theory``, slowest
  first), then the comparison tables and the report;
- regression studies: each model's kernel blocks spread over the slots, model after model
  (``analysis.regression.cached_kernels``), then the learning curves and the report.

Like ``eqntk validate`` it reads and checks the study first (bad input: exit 2, one line), and
everything it prices is counted, never run at the study's size, so it answers in seconds for
any study file.
"""

from __future__ import annotations

import heapq
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from study.config import StudyError, load_study

from . import cost
from .prepare import Prepared, PreparedRegression

# Fixed costs of a run measured on this machine (2 CPUs, load average 1-5): starting and
# stopping local Ray (ray.init + shutdown, 7-9 s), the driver's own work per unit (scheduling,
# committing the part; benchmarks/scale.py measures it), the comparison tables (1.7 s for the
# built-in study's 42 units) and the report's plots and page.
RAY_START_SECONDS = 8.5
DRIVER_SECONDS_PER_UNIT = 0.02
COMPARE_SECONDS_PER_ROW = 2e-6
REPORT_SECONDS = 10.0
READ_SECONDS_PER_ROW = 2e-7


@dataclass
class Resources:
    cpus: int
    gpus: int = 0
    nodes: int = 1
    load: float = 0.0  # other jobs' load on each node (runnable processes), 0: the machines to ourselves

    def crowding(self, processes: int) -> float:
        """How much longer ``processes`` CPU-bound processes of ours take on a node whose CPUs
        other jobs also use (``load`` runnable processes): each gets ``cpus / (load +
        processes)`` of a CPU when that is below one."""
        node = max(1, self.cpus // max(self.nodes, 1))
        return max(1.0, (self.load + processes) / node)

    def describe(self) -> str:
        words = [f"{self.cpus} CPU{'s' if self.cpus != 1 else ''}"]
        if self.gpus:
            words.append(f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}")
        return (", ".join(words) + f" on {self.nodes} node{'s' if self.nodes != 1 else ''}"
                + (f", other jobs' load {self.load:g}" if self.load else ""))


@dataclass
class Plan:
    study: str
    kind: str
    resources: Resources
    units: list = field(default_factory=list)  # cost.UnitCost
    slots: int = 1
    slot_kind: str = "CPU"
    phases: dict = field(default_factory=dict)  # name -> wall seconds
    models: list = field(default_factory=list)  # per-model rows (dicts)
    notes: list = field(default_factory=list)
    result_bytes: float = 0.0
    memory_bytes: float = 0.0  # the largest unit (or kernel block)
    calibration: Optional[cost.Calibration] = None

    @property
    def total_seconds(self) -> float:
        return sum(self.phases.values())


def list_schedule(durations: list[float], slots: int, start: float = 0.0) -> float:
    """Wall time of running ``durations`` in order, each on the first slot to come free, every
    slot paying ``start`` before its first task."""
    if not durations:
        return 0.0
    free = [0.0] * max(1, slots)
    heapq.heapify(free)
    used = 0
    end = 0.0
    for d in durations:
        t = heapq.heappop(free)
        if used < slots:
            t += start
            used += 1
        t += d
        end = max(end, t)
        heapq.heappush(free, t)
    return end


def plan_study(path: Path, resources: Resources, log=None) -> Plan:
    """The plan of the study file ``path`` on ``resources`` (bad input raises StudyError)."""
    path = Path(path)
    kind = load_study(path).kind
    calibration = lambda: cost.load_calibration(log=log)  # noqa: E731 - after the study is known to be good
    if kind == "kernel_regression":
        return _plan_regression(path, resources, calibration)
    return _plan_ensemble(path, resources, calibration)


def _slots(resources: Resources, num_cpus: float, num_gpus: float) -> tuple[int, str]:
    if resources.gpus:
        return max(1, int(resources.gpus // max(num_gpus, 1))), "GPU"
    return max(1, int(resources.cpus // max(num_cpus, 1e-9))), "CPU"


def _plan_ensemble(path: Path, resources: Resources, calibration) -> Plan:
    t0 = time.perf_counter()
    p = Prepared(path)
    prepare = time.perf_counter() - t0
    cal = calibration()
    cfg, data = p.cfg, p.data
    plan = Plan(study=cfg.name, kind="ensemble", resources=resources, calibration=cal)
    res = cfg.resources
    plan.slots, plan.slot_kind = _slots(resources, res.num_cpus, res.num_gpus)
    gpu = plan.slot_kind == "GPU"
    if gpu and res.num_gpus == 0:
        plan.notes.append("the study asks for no GPU (resources.num_gpus: 0): priced as if each unit had one "
                          "(set resources: {num_gpus: 1})")
    threads = max(1, int(res.num_cpus))
    if threads > 1:
        plan.notes.append(f"units use {threads} threads each: priced as one thread (no speed-up assumed)")
    shape, n_out, n_train = tuple(data.input_shape), data.n_out, len(data.train_x)
    eval_sizes = [len(v) for v in data.eval_sets.values()]
    # Units of one model, width and member count cost the same (a study has at most a few
    # hundred such kinds, and up to 100,000 units): each kind is priced once, and every unit
    # of it shares that one UnitCost.
    priced: dict = {}
    for u in p.units:
        key = (u.model.name, u.width, u.members, u.steps, len(u.log_steps), u.dtype, u.store_members)
        c = priced.get(key)
        if c is None:
            c = priced[key] = cost.unit_cost(u, shape, n_out, n_train, eval_sizes, cal, gpu=gpu,
                                             batch_s=cost.batch_seconds(u.model, data.train_x, data.train_y,
                                                                        u.members, cfg.dtype))
        plan.units.append(c)
    # units running side by side on a node's CPUs share its cores, caches and memory bandwidth
    concurrent = min(plan.slots, max(1, resources.cpus // max(resources.nodes, 1)))
    share = cal.parallel_slowdown if (not gpu and concurrent > 1) else 1.0
    if share > 1:
        plan.notes.append(f"{concurrent} units at once on a node run {share:.2f}x slower each than one alone "
                          f"(measured by the calibration)")
    crowd = 1.0 if gpu else resources.crowding(concurrent)
    wall = {id(c): c.seconds * share * crowd + DRIVER_SECONDS_PER_UNIT for c in priced.values()}
    durations = [wall[id(u)] for u in plan.units]
    plan.phases["start (data, Ray)"] = prepare + RAY_START_SECONDS
    plan.phases["training"] = list_schedule(durations, plan.slots, cal.worker_seconds)
    # analysis runs on the driver's node
    node_cpus = max(1, resources.cpus // max(resources.nodes, 1))
    set_sizes = [n_train] + eval_sizes
    jobs = []
    theory = {}
    for spec in cfg.model_specs:
        if not spec.analytic:
            continue
        s = cost.theory_seconds(spec, data.train_x, n_out, set_sizes, cal, gpu=False)
        theory[spec.name] = s
        jobs += [(spec, s)] * len(cfg.lrs_of(spec.name))
    jobs.sort(key=lambda j: -_cost_guess(j[0]))  # the order analysis.theory starts them in
    workers = min(node_cpus, len(jobs))
    analysis_crowd = resources.crowding(max(workers, 1))
    rows = sum(u.rows for u in plan.units)
    plan.phases["analysis"] = (rows * READ_SECONDS_PER_ROW
                               + (list_schedule([s * analysis_crowd for _, s in jobs], workers, cal.worker_seconds)
                                  if jobs else 0.0)
                               + rows * COMPARE_SECONDS_PER_ROW)
    plan.phases["report"] = REPORT_SECONDS
    plan.result_bytes = sum(u.result_bytes for u in plan.units)
    plan.memory_bytes = max(u.memory_bytes for u in plan.units)
    for spec in cfg.model_specs:
        mine = [u for u in plan.units if u.model == spec.name]
        plan.models.append(dict(
            model=spec.name, arch=spec.arch, units=len(mine), widths=cfg.widths_of(spec.name),
            members=cfg.ensemble_size_of(spec.name), unit_seconds=max(u.seconds for u in mine),
            core_seconds=sum(u.seconds for u in mine), memory_bytes=max(u.memory_bytes for u in mine),
            result_bytes=sum(u.result_bytes for u in mine), theory_seconds=theory.get(spec.name)))
    return plan


def _cost_guess(spec) -> float:
    # analysis.theory starts the slowest-looking jobs first by this guess; the plan follows it
    return (100.0 if spec.spatial else 1.0) * (spec.group_obj.order ** 2 if spec.augmentation != "none" else 1.0)


def _plan_regression(path: Path, resources: Resources, calibration) -> Plan:
    t0 = time.perf_counter()
    p = PreparedRegression(path)
    prepare = time.perf_counter() - t0
    cal = calibration()
    cfg, data, r = p.cfg, p.data, p.cfg.regression
    plan = Plan(study=cfg.name, kind="kernel_regression", resources=resources, calibration=cal)
    plan.slots, plan.slot_kind = resources.cpus, "CPU"
    if resources.gpus:
        plan.notes.append("kernel blocks run on CPUs (the kernel engine's Ray tasks ask for none); GPUs unused")
    if data.molecular:
        plan.notes.append("molecules: a molecule pair sums its atom pairs; priced at the mean atom count per molecule")
    pool, test = len(data.pool_x), len(data.test_x)
    atoms = 1.0
    if data.molecular:
        atoms = float((data.pool_z > 0).sum()) / max(pool, 1)
    kernels = 0.0
    for spec in cfg.model_specs:
        x = data.pool_x.reshape(-1, *data.input_shape)[: cost.PAIR_PROBE]
        core, blocks = cost.regression_seconds(spec, x, data.n_out, pool, test, r.block_size, cal)
        core *= atoms * atoms
        block = core / max(blocks, 1)
        wall = list_schedule([block * resources.crowding(min(plan.slots, blocks))] * blocks, plan.slots,
                             cal.worker_seconds)
        kernels += wall
        plan.models.append(dict(model=spec.name, arch=spec.arch, units=blocks, widths=["inf"], members=0,
                                unit_seconds=block, core_seconds=core, memory_bytes=0.0,
                                result_bytes=8.0 * 2 * (pool * pool + test * pool), theory_seconds=None))
    plan.phases["start (data, Ray)"] = prepare + RAY_START_SECONDS
    plan.phases["kernels"] = kernels
    solves = len(r.resolved_sizes) * r.draws * len(r.kernels) * len(cfg.model_specs)
    plan.phases["learning curves and report"] = solves * 0.01 + REPORT_SECONDS / 2
    plan.result_bytes = sum(m["result_bytes"] for m in plan.models)
    plan.memory_bytes = cost.WORKER_BYTES + 8.0 * 4 * r.block_size ** 2
    return plan


def current_load(samples: int = 20, every: float = 0.1) -> float:
    """Other processes' load now: the runnable processes /proc/loadavg counts (less this one),
    averaged over ``samples`` readings ``every`` seconds apart. Unlike the 1-minute load
    average it does not still hold a job that ended a minute ago. 0 where there is no /proc."""
    counts = []
    for i in range(samples):
        try:
            running = int(Path("/proc/loadavg").read_text().split()[3].split("/")[0])
        except (OSError, ValueError, IndexError):
            return 0.0
        counts.append(max(0, running - 1))
        if i + 1 < samples:
            time.sleep(every)
    return sum(counts) / len(counts)


# ----- printing ---------------------------------------------------------------------------------
def duration(s: float) -> str:
    if s < 60:
        return f"{s:.1f} s" if s < 10 else f"{s:.0f} s"
    if s < 3600:
        m, r = divmod(round(s), 60)
        return f"{m} min {r} s"
    if s < 48 * 3600:
        h, r = divmod(round(s / 60), 60)
        return f"{h} h {r} min"
    return f"{s / 86400:.1f} days"


def size(b: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


def lines(plan: Plan, top: int = 5) -> list[str]:
    cal = plan.calibration
    out = [f"study {plan.study}: {plan.kind}, predicted on {plan.resources.describe()} "
           f"({plan.slots} {plan.slot_kind} slot{'s' if plan.slots != 1 else ''})"]
    out.append(f"  calibration: {cal.machine['cpu']} ({cal.machine['host']}), one thread: matrix products "
               f"{cal.mm_flops / 1e9:.0f} GFLOP/s, convolutions {cal.conv_flops / 1e9:.0f} GFLOP/s, "
               f"{cal.op_seconds * 1e6:.1f} us per operation (measured at load average {cal.load_average:.1f})")
    if plan.kind == "ensemble":
        out.append(f"  {'model':18} {'arch':9} {'units':>5} {'widths':>12} {'members':>7} {'longest unit':>13} "
                   f"{'core time':>10} {'memory/unit':>11} {'result':>9} {'theory':>8}")
        for m in plan.models:
            w = m["widths"]
            widths = f"{w[0]}..{w[-1]}" if len(w) > 1 else str(w[0])
            out.append(f"  {m['model']:18} {m['arch']:9} {m['units']:5d} {widths:>12} {m['members']:7d} "
                       f"{duration(m['unit_seconds']):>13} {duration(m['core_seconds']):>10} "
                       f"{size(m['memory_bytes']):>11} {size(m['result_bytes']):>9} "
                       f"{duration(m['theory_seconds']) if m['theory_seconds'] is not None else 'n/a':>8}")
    else:
        out.append(f"  {'model':18} {'arch':9} {'blocks':>6} {'per block':>10} {'core time':>10}")
        for m in plan.models:
            out.append(f"  {m['model']:18} {m['arch']:9} {m['units']:6d} {duration(m['unit_seconds']):>10} "
                       f"{duration(m['core_seconds']):>10}")
    out.append("  wall time: " + ", ".join(f"{k} {duration(v)}" for k, v in plan.phases.items())
               + f"; total {duration(plan.total_seconds)}")
    out.append(f"  memory: {size(plan.memory_bytes)} for the largest unit; results on disk: at most "
               f"{size(plan.result_bytes)} (priced from random predictions, which compress worst)")
    if plan.units:
        core = sum(u.seconds for u in plan.units)
        groups: dict = {}
        for u in plan.units:  # units of one (model, width) cost the same
            groups.setdefault((u.model, u.width), []).append(u)
        biggest = sorted(groups.values(), key=lambda g: -sum(u.seconds for u in g))[:top]
        out.append(f"  dominant units ({len(plan.units)} in all, {duration(core)} of unit time):")
        for g in biggest:
            u, total = g[0], sum(x.seconds for x in g)
            out.append(f"    {u.model} width {u.width}: {len(g)} unit{'s' if len(g) > 1 else ''} of {u.members} members, "
                       f"{duration(u.seconds)} each (training {duration(u.train_seconds)}, logging "
                       f"{duration(u.log_seconds)}), {100 * total / core:.0f}% of the unit time")
    for n in plan.notes:
        out.append(f"  note: {n}")
    return out


def default_resources(cpus: Optional[int], gpus: Optional[int], nodes: Optional[int],
                      load: Optional[float] = None) -> Resources:
    for name, v in (("--cpus", cpus), ("--gpus", gpus), ("--nodes", nodes), ("--load", load)):
        if v is not None and v < (0 if name in ("--gpus", "--load") else 1):
            raise StudyError(f"{name}: must be {'0 or more' if name in ('--gpus', '--load') else 'at least 1'}, got {v}")
    nodes = nodes or 1
    return Resources(cpus=cpus or (os.cpu_count() or 1) * nodes, gpus=gpus or 0, nodes=nodes, load=load or 0.0)
