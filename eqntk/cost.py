"""What a study's work costs before it is run: a calibrated model per work unit.

Three kinds of work, each priced from counts that follow from the study file and from rates
measured on the machine at hand (``Calibration``, a few seconds, cached per machine):

- training (``train_seconds``): a unit of ``M`` members runs ``steps`` forward-and-backward
  passes over its batch and, at each logged step, one forward pass over the orbits of the
  training and eval inputs. Each pass is priced by its operations, counted once per model
  by running it at widths 2, 3, 4 and batches 2, 3 (``ModelProfile``): matrix-product and
  convolution flops (divided by the measured throughput of each), elements written by every
  other operation (by the measured elementwise rate) and the number of operations (by the
  measured cost of dispatching one). Flops and elements are exact polynomials of degree 2 in
  the width and 1 in the batch, so a width of 1024 is priced without being built.
- analysis (``theory_seconds``): the analytic kernels of each model between the training
  inputs and every orbit point the workers log; the number of input pairs follows from the
  sets and the group, the cost of one pair is timed on a few pairs of that model's own
  kernel (cached with the calibration).
- regression (``regression_seconds``): the pool-by-pool and test-by-pool kernel blocks of
  each model, at the same per-pair cost.

docs/cost.md explains the model and how well it predicts; ``eqntk plan`` prints it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from scipy.optimize import nnls
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from analysis.kernels import kernel_fn, mean_kernel_fn
from study.atomic import atomic_write
from study.grid import UnitSpec
from study.spec import ModelSpec
from workers.augment import Minibatches, make_augmentation
from workers.ensemble import CPU_BLOCK_BYTES, CPU_MEMORY_BUDGET, CPU_VMAP_MEMBER_BYTES, Ensemble, _activation_elements
from workers.footprint import PARAMETER_COPIES, parameter_count
from workers.models import build_model, init_parameters
from workers.unit import reproducible

from .store import PartWriter

CALIBRATION_FORMAT = 17  # bump when the benchmark or what it measures changes


# ----- the machine's rates ----------------------------------------------------------------------
def machine_key() -> dict:
    """What the rates depend on: the host, its CPU model, torch and the threads a unit uses."""
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(host=platform.node(), cpu=cpu, cpus=os.cpu_count(), torch=torch.__version__, format=CALIBRATION_FORMAT)


def cache_dir() -> Path:
    return Path(os.environ.get("EQNTK_CACHE", Path.home() / ".cache" / "eqntk"))


@dataclass
class Calibration:
    """Rates of one thread of this machine (float32 unless named), measured by ``calibrate``."""

    machine: dict
    mm_flops: float  # matrix products, flops per second
    conv_flops: float  # convolutions (forward and backward), flops per second
    gconv_flops: float  # grouped convolutions (what vmap makes of a block of members' convolutions)
    memory: float  # elements read or written per second by the other operations (views are free)
    index: float  # elements written per second by gathers and scatters
    op_seconds: float  # fixed cost of dispatching one operation
    pass_seconds: float  # fixed cost of one pass of a block of members (torch.func's Python layers)
    worker_seconds: float  # a fresh worker process: imports, and a first training step's warm-up
    parallel_slowdown: float  # a unit's time when every CPU trains one, over its time alone
    part_bytes_per_row: float  # a Parquet part's size per row of predictions
    write_seconds_per_row: float  # building and writing a part, per row
    write_seconds_per_call: float  # and per logged (step, eval set)
    measured_at: float = 0.0  # time.time() of the benchmark
    load_average: float = 0.0  # this machine's 1-minute load average when it was measured
    seconds: float = 0.0  # how long the benchmark took
    references: list = field(default_factory=list)  # [pass, measured seconds, fitted seconds] per reference
    pair_seconds: dict = field(default_factory=dict)  # kernel key -> [setup seconds, seconds per input pair]

    def path(self) -> Path:
        return calibration_path(self.machine)

    def save(self) -> None:
        p = self.path()
        p.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(p, json.dumps(asdict(self), indent=1, sort_keys=True).encode())


def calibration_path(machine: dict) -> Path:
    digest = hashlib.sha256(json.dumps(machine, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"calibration-{machine['host']}-{digest}.json"


def load_calibration(refresh: bool = False, log=None) -> Calibration:
    """This machine's calibration: from the cache, or measured now (a few seconds) and cached."""
    key = machine_key()
    p = calibration_path(key)
    if not refresh and p.is_file():
        try:
            cal = Calibration(**json.loads(p.read_text()))
            if cal.machine == key:
                return cal
        except (OSError, ValueError, TypeError):
            pass  # unreadable or from another format: measure again
    if log:
        log(f"calibrating this machine (a few seconds; cached in {p})")
    cal = calibrate()
    cal.save()
    return cal


def _best_of(fn, repeats: int = 5, min_seconds: float = 0.02) -> float:
    """The smallest CPU time (this process, all its threads) of ``repeats`` timings of ``fn``,
    each repeated until it lasts ``min_seconds``. CPU time, not wall time: the machine is
    shared, and other jobs' load would otherwise enter the rates (measured here: wall-time
    calibrations at load average 1 and 7 differed 2-4x; CPU time is what the work itself needs)."""
    fn()  # warm up
    best = math.inf
    for _ in range(repeats):
        n, t0 = 0, time.process_time()
        while True:
            fn()
            n += 1
            t = time.process_time() - t0
            if t >= min_seconds:
                break
        best = min(best, t / n)
    return best


# Reference passes the rates are fitted to: (arch, extra spec fields, width, batch, train?,
# members). They span what the studies' units spend their time on: large dense products
# (MLPs at 512 and 1024), vectorised ensembles of small members as units hold them (32
# members of an MLP 64 or a GCNN 2), gathers and scatters (group MLP), convolutions forward
# and backward one member at a time (CNN 16, GCNN 8 and 16), dispatch (a tiny MLP) and the
# SO(3) networks' spectral layers on a degree-4 sphere grid (8 x 8).
REFERENCES = [
    ("mlp", {"depth": 1}, 1024, 128, True, 4),
    ("mlp", {"depth": 1}, 1024, 384, False, 4),
    ("mlp", {"depth": 1}, 64, 32, True, 32),
    ("mlp", {"depth": 2}, 512, 128, True, 4),
    ("group_mlp", {"depth": 1, "support": "identity"}, 256, 32, True, 8),
    ("cnn", {"depth": 2}, 16, 32, True, 4),
    ("cnn", {"depth": 2}, 16, 32, True, 32),
    ("gcnn", {"depth": 2}, 8, 32, True, 4),
    ("gcnn", {"depth": 2}, 16, 32, True, 2),
    ("gcnn", {"depth": 2}, 2, 32, True, 32),
    ("gcnn", {"depth": 2}, 8, 128, False, 4),
    ("mlp", {"depth": 2}, 2, 2, True, 4),
    ("so3_gcnn", {"depth": 2, "group": "SO3", "bands": (3, 2), "so3_grid": 3, "kernel_mode": "grid"}, 32, 24, True, 4),
    ("so3_gcnn", {"depth": 2, "group": "SO3", "bands": (3, 2), "so3_grid": 3, "kernel_mode": "grid",
                  "nonlinearity": "relu"}, 8, 24, True, 16),
    ("sphere_mlp", {"depth": 2, "group": "SO3", "nonlinearity": "relu"}, 128, 24, True, 16),
]
RATE_NAMES = ("mm_flops", "conv_flops", "gconv_flops", "memory", "index")


def calibrate() -> Calibration:
    """Measure one thread's rates (a few seconds): time each ``REFERENCES`` pass of a
    4-member ensemble, count its operations, and fit the seconds per flop, per element and
    per operation to the timings (non-negative least squares on relative error)."""
    t_start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows, times = [], []
        for reference in REFERENCES:
            counts, seconds = _reference(*reference)
            rows.append(counts)
            times.append(seconds)
        part_bytes, write_s, write_call = _part_rates()
    finally:
        torch.set_num_threads(threads)
    a, t = np.array(rows, dtype=float), np.array(times)
    scale = a.max(axis=0)
    scale[scale == 0] = 1
    coef, _ = nnls((a / scale) / t[:, None], np.ones(len(t)))
    per_unit = coef / scale  # seconds per flop, element, operation
    rates = {name: (1 / c if c > 0 else math.inf) for name, c in zip(RATE_NAMES, per_unit[:5])}
    fit = a @ per_unit
    worker = _worker_seconds()
    return Calibration(machine=machine_key(), **rates, op_seconds=float(per_unit[5]), pass_seconds=float(per_unit[6]),
                       worker_seconds=worker, parallel_slowdown=_parallel_slowdown(os.cpu_count() or 1, worker),
                       part_bytes_per_row=part_bytes, write_seconds_per_row=write_s,
                       write_seconds_per_call=write_call, measured_at=time.time(),
                       load_average=os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0,
                       seconds=time.perf_counter() - t_start,
                       references=[[f"{r[0]} {r[2]} batch {r[3]} {'train' if r[4] else 'forward'} x{r[5]}", float(m), float(f)]
                                   for r, m, f in zip(REFERENCES, t, fit)])


def _reference(arch: str, fields: dict, width: int, batch: int, train: bool, members: int) -> tuple[list[float], float]:
    """Counts (mm, conv, memory, index, operations, passes) and best seconds of one pass of an
    ensemble of ``members`` on 8x8 images, through ``Ensemble`` itself."""
    spec = ModelSpec(name="reference", arch=arch, **{"nonlinearity": "erf", **fields})
    module = build_model(spec, width, (1, 8, 8), 10)
    ens = Ensemble.from_seeds(module, list(range(members)), init_parameters, "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 1, 8, 8, generator=g), torch.randn(batch, 10, generator=g)

    def run():
        if train:
            ens.gd_step(x, y, 1e-9)  # a step too small to change what the next repeat computes
        else:
            ens.predict(x)
    counter = _Counter()
    forward = ens._forward
    passes = 0

    def counted(*args, **kwargs):  # one vectorised or plain pass of a block of members
        nonlocal passes
        passes += 1
        return forward(*args, **kwargs)
    ens._forward = counted
    with counter:
        run()
    ens._forward = forward
    with reproducible():  # as units train (deterministic algorithms, denormals flushed)
        seconds = _best_of(run, repeats=3, min_seconds=0.05)
    return [counter.mm, counter.conv, counter.gconv, counter.memory, counter.index, counter.ops, passes], seconds


def _part_rates() -> tuple[float, float, float]:
    """Bytes per row of a Parquet part, and seconds per row and per ``log`` call to build and
    write it: a real ``PartWriter`` on random predictions of 8 members, written once as 36
    logs of 960 rows and once as 4 logs of 8,640 rows (the two fix both costs)."""
    spec = ModelSpec(name="calibration", arch="mlp", pairing="antithetic")
    unit = UnitSpec(unit_id="0" * 16, study_seed=0, model=spec, width=1, member_start=0, member_stop=8, lr=1.0,
                    steps=1, log_steps=[0], dtype="float32", device="cpu", store_members=False)
    rng = np.random.default_rng(0)
    rows = 36 * 24 * 4 * 10
    timings = []
    with tempfile.TemporaryDirectory() as d:
        for calls in (36, 4):
            # float32 values, as the workers compute them (the part stores them as float64)
            preds = rng.normal(size=(calls, 8, rows // (calls * 40), 4, 10)).astype(np.float32)

            def write():
                w = PartWriter(unit, tmpdir=d)
                for k in range(calls):
                    w.log(k, "set", preds[k])
                return w.finish({})
            data = write()
            timings.append(_best_of(write, repeats=3, min_seconds=0.05))
    per_call = max(0.0, (timings[0] - timings[1]) / 32)
    return len(data) / rows, max(0.0, timings[1] - 4 * per_call) / rows, per_call


_WORKER = """
import sys, time, torch
t0 = time.perf_counter()
import workers.unit, eqntk.store
from study.spec import ModelSpec
from workers.ensemble import Ensemble
from workers.models import build_model, init_parameters
torch.set_num_threads(1)
module = build_model(ModelSpec(name="w", arch="gcnn", depth=2), 4, (1, 8, 8), 10)
ens = Ensemble.from_seeds(module, [0, 1, 2, 3], init_parameters)
x, y = torch.zeros(32, 1, 8, 8), torch.zeros(32, 10)
ens.gd_step(x, y, 0.0)
start = time.perf_counter() - t0
if len(sys.argv) > 1:  # wait for the others, then time steps for ~1 s
    while time.time() < float(sys.argv[1]):
        time.sleep(0.005)
    n, t1, c1 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - t1 < 1.0:
        ens.gd_step(x, y, 0.0)
        n += 1
    print(start, (time.process_time() - c1) / n)  # CPU time: what sharing caches and memory costs, not other jobs' load
else:
    print(start, 0.0)
"""


def _worker_seconds() -> float:
    """What a fresh worker process spends before its first unit runs at speed: the imports a
    unit needs and a first training step (torch's one-time set-up), timed in a subprocess."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", _WORKER], check=True, capture_output=True,
                   cwd=Path(__file__).resolve().parent.parent)
    return time.perf_counter() - t0


def _parallel_slowdown(processes: int, start_seconds: float) -> float:
    """How much more CPU time a training step takes when ``processes`` units train at once on
    this machine (shared caches and memory bandwidth) than when one does: the same GCNN step timed for 1 s in one process, then in ``processes`` at once
    (``start_seconds``: a worker's start, so that all of them are ready when timing begins)."""
    root = Path(__file__).resolve().parent.parent

    def steps(n: int) -> list[float]:
        start = time.time() + 0.5 + 1.5 * start_seconds  # after every process has imported torch
        procs = [subprocess.Popen([sys.executable, "-c", _WORKER, str(start)], stdout=subprocess.PIPE, text=True,
                                  cwd=root) for _ in range(n)]
        return [float(p.communicate()[0].split()[1]) for p in procs]
    if processes <= 1:
        return 1.0
    alone = steps(1)[0]
    together = float(np.mean(steps(processes)))
    return max(1.0, together / alone)


# ----- counting a model's operations -------------------------------------------------------------
_INDEX_OPS = {"index", "index_put", "_index_put_impl", "gather", "scatter", "scatter_add", "index_add",
              "index_select", "index_copy"}


class _Counter(TorchDispatchMode):
    """Counts the aten operations of what runs under it: matrix-product and convolution flops
    (torch's own flop formulas), elements read and written (views cost nothing), elements
    written by gathers and scatters (which run at their own, slower rate) and operations."""

    def __init__(self):
        super().__init__()
        self.mm = self.conv = self.gconv = self.memory = self.index = 0
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.ops += 1
        packet = func._overloadpacket
        returns = func._schema.returns
        if returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write:
            return out  # a view: no data moves
        if packet in flop_registry:
            flops = flop_registry[packet](*args, **kwargs, out_val=out)
            if packet.__name__ == "convolution_backward":
                flops = _conv_backward_flops(args, flops)
            if "conv" in packet.__name__:
                groups = _groups(packet.__name__, args)
                if groups > 1:
                    self.gconv += flops
                else:
                    self.conv += flops
            else:
                self.mm += flops
        outs = out if isinstance(out, (tuple, list)) else (out,)
        written = sum(t.numel() for t in outs if isinstance(t, torch.Tensor))
        if packet.__name__.rstrip("_") in _INDEX_OPS:
            self.index += written
            return out
        read = sum(t.numel() for t in _tensors((args, kwargs)))
        self.memory += read + written
        return out


def _conv_backward_flops(args, torch_flops: int) -> int:
    """Flops of aten.convolution_backward: each gradient asked for (input, weight) costs what
    the forward convolution does. torch's formula counts the weight gradient as an ungrouped
    convolution, ``groups`` times too many flops for a grouped one; vmap makes a block of ``m``
    members' convolutions one convolution of ``m`` groups, so its count grew as ``m^2`` and the
    vmap path's rate was fitted to flops that were never done (a 32-member CNN block was priced
    2.2x low). Transposed convolutions (none in our models) keep torch's count."""
    try:
        grad_out, x, w = args[0], args[1], args[2]
        transposed, mask = bool(args[7]), args[10]
    except (IndexError, TypeError):
        return torch_flops
    if transposed:
        return torch_flops
    forward = 2 * math.prod(grad_out.shape[2:]) * math.prod(w.shape[2:]) * x.shape[0] * w.shape[0] * w.shape[1]
    return forward * (int(bool(mask[0])) + int(bool(mask[1])))


def _groups(name: str, args) -> int:
    """The ``groups`` argument of aten.convolution / convolution_backward (1 when absent)."""
    index = {"convolution": 8, "convolution_backward": 9}.get(name)
    try:
        return int(args[index]) if index is not None else 1
    except (IndexError, TypeError, ValueError):
        return 1


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (tuple, list)):
        for t in tree:
            yield from _tensors(t)
    elif isinstance(tree, dict):
        for t in tree.values():
            yield from _tensors(t)


@dataclass(frozen=True)
class PassCost:
    """Counts of one pass over ``batch`` samples at one width: ``member`` (mm, conv, memory,
    index) grows with the members, ``block`` is paid once per block of members (what vmap
    does for the block as a whole), ``ops`` operations are dispatched once per block."""

    member: tuple
    block: tuple
    ops: float

    def seconds(self, cal: Calibration, members: int, blocks: int, slowdown: float = 1.0) -> float:
        """``members`` members' and ``blocks`` blocks' flops and elements (``slowdown`` for
        float64), and the operations and the pass's own fixed cost once per block."""
        def work(c):
            return (c[0] / cal.mm_flops + c[1] / cal.conv_flops + c[2] / cal.gconv_flops + c[3] / cal.memory
                    + c[4] / cal.index)
        return ((members * work(self.member) + blocks * work(self.block)) * slowdown
                + blocks * (self.ops * cal.op_seconds + cal.pass_seconds))


def _count(module, shape: tuple, batch: int, train: bool, vectorise: bool, members: int = 1) -> tuple:
    """Counts of one pass of an ``Ensemble`` of ``members`` copies of ``module`` over ``batch``
    samples in one block, through vmap (``vectorise``) or the plain forward."""
    ens = Ensemble.from_seeds(module, list(range(members)), init_parameters, "cpu", torch.float32)
    ens._plan = lambda x, per_member, backward: (members, batch, vectorise)  # the path to count, one chunk
    x = torch.zeros((batch, *shape))
    c = _Counter()
    with c:
        if train:
            ens.gd_step(x, _targets(module, x), 0.0)
        else:
            ens.predict(x)
    return c.mm, c.conv, c.gconv, c.memory, c.index, c.ops


def _targets(module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.zeros_like(module(x[:1])).expand(len(x), -1).contiguous()


@dataclass(frozen=True)
class ModelProfile:
    """Counts of a forward (``fwd``) and a training step (``train``) through vmap (``vec``) or
    the plain forward (``one``), as polynomials: ``coef[kind, path][part][count]`` is
    ``[[a0, a1, a2], [b0, b1, b2]]`` for ``(a0 + a1 w + a2 w^2) + batch (b0 + b1 w + b2 w^2)``,
    ``part`` ``member`` (per member) or ``block`` (per vmap block: counted with two and three
    members); operations are the largest count seen (they do not grow with width)."""

    coef: dict
    ops: dict
    activation: tuple  # elements autograd saves per sample: (c0, c1) for c0 + c1 w

    def to_json(self) -> dict:
        return dict(coef=[[*key, parts] for key, parts in self.coef.items()],
                    ops=[[*key, n] for key, n in self.ops.items()], activation=list(self.activation))

    @classmethod
    def from_json(cls, d: dict) -> "ModelProfile":
        return cls(coef={(kind, path): {part: {name: tuple(c) for name, c in counts.items()}
                                        for part, counts in parts.items()}
                         for kind, path, parts in d["coef"]},
                   ops={(kind, path): n for kind, path, n in d["ops"]}, activation=tuple(d["activation"]))

    def pass_cost(self, kind: str, width: int, batch: int, vectorise: bool) -> PassCost:
        key = (kind, "vec" if vectorise else "one")
        w = float(width)

        def ev(a, b):
            return max(0.0, a[0] + a[1] * w + a[2] * w * w) + batch * max(0.0, b[0] + b[1] * w + b[2] * w * w)
        parts = {part: tuple(ev(*self.coef[key][part][name]) for name in COUNTS) for part in ("member", "block")}
        return PassCost(parts["member"], parts["block"], self.ops[key])

    def activation_bytes(self, width: int, itemsize: int) -> float:
        return (self.activation[0] + self.activation[1] * width) * itemsize


def _quadratic(v1: float, v2: float, v3: float) -> list[float]:
    c2 = (v3 - 2 * v2 + v1) / 2
    b = v2 - v1 - 3 * c2
    return [v1 - b - c2, b, c2]


# The widths a model is counted at (and the batches, 2 and 3). Not from 1: at width 1 some
# channel axes have length 1 and torch moves nothing for them (expands and views instead of
# copies), so the counts there lie off the polynomial the larger widths follow (measured: a
# CNN's elements per member at widths 1..4 were 264k, 548k, 820k, 1093k; from widths 1-3 the
# fit gave 3.2M at width 16 against 4.4M counted there; from widths 2-4 it is exact). A batch
# of 1 does the same (a width-16 CNN block: 1.14M, 2.15M, 3.11M elements at batches 1, 2, 3).
COUNT_WIDTHS = (2, 3, 4)


def _quadratic_from_2(v2: float, v3: float, v4: float) -> list[float]:
    """``[a, b, c]`` with ``a + b w + c w^2`` through the values at widths 2, 3, 4."""
    a, b, c = _quadratic(v2, v3, v4)  # in x = w - 1
    return [a - b + c, b - 2 * c, c]


COUNTS = ("mm", "conv", "gconv", "memory", "index")


@lru_cache(maxsize=None)
def model_profile(spec: ModelSpec, input_shape: tuple, n_out: int) -> ModelProfile:
    """``spec``'s counts (``count_profile``), read from the cache when this machine has counted
    them before: counting takes 0.1-3 s per model (measured: an MLP 0.1 s, a CNN or GCNN on 8x8
    images 2-3 s) and the first training pass counted imports torch._dynamo (2 s), which a plan
    answering within seconds cannot pay for every model of a study each time."""
    path = cache_dir() / "profiles" / f"{_profile_key(spec, input_shape, n_out)}.json"
    try:
        return ModelProfile.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        pass  # not counted yet, or unreadable: count again
    profile = depth_profile(spec, input_shape, n_out)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(profile.to_json()).encode())
    return profile


# What the counts follow from besides the spec: the code that counts, builds and runs the models.
_PROFILE_SOURCES = ("eqntk/cost.py", "workers/*.py", "study/architecture.py", "study/bases.py", "study/escnn_types.py",
                    "study/sphere.py", "study/spec.py")


def _profile_key(spec: ModelSpec, input_shape: tuple, n_out: int) -> str:
    root = Path(__file__).resolve().parent.parent
    code = hashlib.sha256()
    for pattern in _PROFILE_SOURCES:
        for f in sorted(root.glob(pattern)):
            code.update(f.read_bytes())
    text = json.dumps(dict(spec=spec.model_dump(mode="json"), shape=[int(s) for s in input_shape], n_out=int(n_out),
                           torch=torch.__version__, format=CALIBRATION_FORMAT, code=code.hexdigest()), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def depth_profile(spec: ModelSpec, input_shape: tuple, n_out: int) -> ModelProfile:
    """``count_profile`` at any depth from counts at depths 2 and 3: hidden layers after the
    first are alike, so every count is linear in the depth from 2 on, and a deep model is
    priced without running it (counting runs each pass 36 times under the counter: a depth-100
    CNN took 3 min). SO(3) GCNNs give each layer its own band limit and are counted as they are."""
    if spec.depth <= 3 or spec.bands is not None:
        return count_profile(spec, input_shape, n_out)
    two, three = (count_profile(spec.model_copy(update={"depth": d}), input_shape, n_out) for d in (2, 3))
    return _along_depth(two, three, spec.depth - 2)


def _along_depth(two, three, k: int):
    """``two + k (three - two)``, through the nested counts of a ``ModelProfile``."""
    if isinstance(two, ModelProfile):
        return ModelProfile(coef=_along_depth(two.coef, three.coef, k), ops=_along_depth(two.ops, three.ops, k),
                            activation=_along_depth(two.activation, three.activation, k))
    if isinstance(two, dict):
        return {key: _along_depth(two[key], three[key], k) for key in two}
    if isinstance(two, (list, tuple)):
        return type(two)(_along_depth(a, b, k) for a, b in zip(two, three))
    return two + k * (three - two)


def count_profile(spec: ModelSpec, input_shape: tuple, n_out: int) -> ModelProfile:
    """Count ``spec``'s passes at widths 2, 3, 4 (``COUNT_WIDTHS``), batches 2, 3 and (vmap) 2, 3 members."""
    keys = [(kind, path) for kind in ("fwd", "train") for path in ("vec", "one")]
    coef, ops, act, counts = {}, {}, [], {}
    for w in COUNT_WIDTHS:
        module = build_model(spec, w, input_shape, n_out)
        for kind, path in keys:
            for batch in (2, 3):
                k = len(COUNTS)
                if path == "vec":  # c(m) = block + m member, from blocks of 2 and 3 members (vmap's
                    # convolutions are grouped from 2 members on, so 1 member would count another kind)
                    two = _count(module, input_shape, batch, kind == "train", True, 2)
                    three = _count(module, input_shape, batch, kind == "train", True, 3)
                    member = [three[i] - two[i] for i in range(k)]
                    block = [max(0, two[i] - 2 * member[i]) for i in range(k)]
                    ops_count = two[k]
                else:
                    one = _count(module, input_shape, batch, kind == "train", False)
                    member, block, ops_count = list(one[:k]), [0] * k, one[k]
                counts[kind, path, w, batch] = (member, block, ops_count)
        act.append(_activation_elements(module, input_shape, torch.float32, torch.device("cpu")))
    for key in keys:
        coef[key] = {}
        for p, part in enumerate(("member", "block")):
            coef[key][part] = {}
            for i, name in enumerate(COUNTS):
                per_batch = [counts[(*key, w, 3)][p][i] - counts[(*key, w, 2)][p][i] for w in COUNT_WIDTHS]
                fixed = [counts[(*key, w, 2)][p][i] - 2 * per_batch[j] for j, w in enumerate(COUNT_WIDTHS)]
                coef[key][part][name] = (_quadratic_from_2(*fixed), _quadratic_from_2(*per_batch))
        ops[key] = max(counts[(*key, w, b)][2] for w in COUNT_WIDTHS for b in (2, 3))
    slope = act[1] - act[0]
    return ModelProfile(coef=coef, ops=ops, activation=(act[0] - 2 * slope, slope))


def ensemble_blocks(profile: ModelProfile, width: int, members: int, batch: int, itemsize: int,
                    backward: bool, device: str = "cpu") -> int:
    """How many blocks a pass of ``members`` over ``batch`` samples runs in (``Ensemble._plan``):
    one per member when a member's activations exceed the vmap threshold, else blocks of at
    most ``CPU_BLOCK_BYTES``; one on a GPU."""
    if device != "cpu":
        return 1
    per_member = profile.activation_bytes(width, itemsize) * batch
    if per_member > CPU_VMAP_MEMBER_BYTES:
        return members
    block = min(members, max(1, int(CPU_BLOCK_BYTES // max(per_member, 1))))
    return -(-members // block)


# ----- training units ----------------------------------------------------------------------------
# What a GPU does to these rates. Not measured here (this machine has none; benchmarks/gpu.py
# measures it where there is one). Arithmetic and memory traffic: a data-centre GPU's float32
# peak (no TF32: units run under ``reproducible``) is 20-60 TFLOP/s and its memory 2-5 TB/s,
# 100-300x one CPU thread's measured rates; the members of a unit form one vmap block whose
# operations are small (batch 32-384, width <= 1024), which fill such a GPU only in part, so
# we take 30x. Per-operation and per-pass costs are the Python and launch overheads, which a
# GPU does not shorten (about 10 us per kernel launch, like a CPU dispatch): factor 1.
GPU_THROUGHPUT_FACTOR = 30.0
# Analytic kernels in float64: a data-centre GPU's float64 peak is 10-60 TFLOP/s against one
# CPU thread's ~50 GFLOP/s; the kernel recursions are elementwise over pixel pairs (memory
# bound), so we take 20x (a consumer GPU's float64 is 1/32-1/64 of its float32: no gain).
GPU_KERNEL_FACTOR = 20.0
WORKER_BYTES = 600 * 2**20  # an idle Ray worker with torch imported (RSS measured on this machine: 0.55-0.65 GB)


@dataclass
class UnitCost:
    """Predicted cost of a work unit (every unit of one model, width, lr and member count has the same)."""

    model: str
    width: int
    members: int
    train_seconds: float  # the training steps
    log_seconds: float  # forward passes on the orbits at the logged steps, and writing the part
    memory_bytes: float  # parameters, gradients, working memory and the worker itself
    result_bytes: float  # the unit's Parquet part
    rows: int  # rows of the part

    @property
    def seconds(self) -> float:
        return self.train_seconds + self.log_seconds


def training_batch(spec: ModelSpec, n_train: int) -> int:
    """Samples per member in one training step (``workers.augment``)."""
    if spec.optimizer == "sgd":
        return int(spec.batch_size)
    if spec.augmentation == "full_orbit":
        return n_train * spec.group_obj.order
    return n_train


def batch_seconds(spec: ModelSpec, train_x: np.ndarray, train_y: np.ndarray, members: int, dtype: str) -> float:
    """Seconds to draw one step's batch for ``members`` members (``workers.augment``): nothing
    for full-batch GD on fixed inputs, but random SO(3) rotations re-sample every member's
    inputs each step. Timed here on the study's own training inputs (a few calls)."""
    if spec.augmentation != "random" and spec.optimizer != "sgd":
        return 0.0
    return _batch_seconds(spec, train_x.tobytes(), train_x.shape, train_y.tobytes(), train_y.shape, int(members), dtype)


@lru_cache(maxsize=None)
def _batch_seconds(spec, x_bytes, x_shape, y_bytes, y_shape, members, dtype) -> float:
    t = torch.float64 if dtype == "float64" else torch.float32
    x = torch.from_numpy(np.frombuffer(x_bytes, dtype=np.float64 if len(x_bytes) == 8 * np.prod(x_shape) else np.float32)
                         .reshape(x_shape).copy()).to(t)
    y = torch.from_numpy(np.frombuffer(y_bytes, dtype=np.float64 if len(y_bytes) == 8 * np.prod(y_shape) else np.float32)
                         .reshape(y_shape).copy()).to(t)
    seeds = list(range(members))
    aug = make_augmentation(spec.augmentation, spec.group_obj, x, y, seeds)
    if spec.optimizer == "sgd":
        aug = Minibatches(aug, spec.batch_size, seeds)
    return _best_of(aug.next_batch, repeats=3, min_seconds=0.0)


def unit_cost(unit, input_shape: tuple, n_out: int, n_train: int, eval_sizes: list[int], cal: Calibration,
              gpu: bool = False, batch_s: float = 0.0) -> UnitCost:
    """Predicted seconds, memory and result size of ``unit`` (a ``study.grid.UnitSpec``) on one
    CPU thread of this machine, or on one GPU (``gpu``, with the factors above); ``batch_s``
    is what drawing one step's batch costs (``batch_seconds``)."""
    spec, width, members = unit.model, unit.width, unit.members
    itemsize = 8 if unit.dtype == "float64" else 4
    prof = model_profile(spec, tuple(input_shape), int(n_out))
    order = spec.group_obj.order
    batch = training_batch(spec, n_train)
    eval_rows = (n_train + sum(eval_sizes)) * order  # the training inputs are logged too
    device = "cuda" if gpu else "cpu"
    rates = cal if not gpu else _gpu_rates(cal)
    dtype_slowdown = 2.0 if itemsize == 8 else 1.0  # float64 halves the arithmetic and doubles the bytes
    train_blocks = ensemble_blocks(prof, width, members, batch, itemsize, True, device)
    step = prof.pass_cost("train", width, batch, _vectorised(train_blocks, members, device))
    train_s = unit.steps * (step.seconds(rates, members, train_blocks, dtype_slowdown) + batch_s)
    # A log is one forward pass per set (the training inputs and each eval set, over its
    # orbit), each with its own blocks and fixed costs (workers.train.train_gd); pricing the
    # sets as one pass over all their rows priced logs 1.3-2.2x low (benchmarks/unit_cost.py).
    log_pass = 0.0
    for n in [n_train, *eval_sizes]:
        blocks = ensemble_blocks(prof, width, members, n * order, itemsize, False, device)
        log_pass += prof.pass_cost("fwd", width, n * order, _vectorised(blocks, members, device)).seconds(
            rates, members, blocks, dtype_slowdown)
    logs = len(unit.log_steps)
    rows = logs * eval_rows * n_out * (members if unit.store_members else 1)
    log_s = (logs * log_pass
             + logs * (1 + len(eval_sizes)) * cal.write_seconds_per_call + rows * cal.write_seconds_per_row)
    params = parameter_count(spec, width, tuple(input_shape), int(n_out))
    activations = prof.activation_bytes(width, itemsize) * max(3 * batch, eval_rows) * (
        members / max(train_blocks, 1))
    # on a CPU the passes are chunked within CPU_MEMORY_BUDGET; on a GPU one block holds them all
    # (within half the device's memory, workers.ensemble), and the worker's own memory is the host's
    memory = (PARAMETER_COPIES * params * itemsize * members
              + (activations if gpu else min(activations, CPU_MEMORY_BUDGET) + WORKER_BYTES))
    return UnitCost(spec.name, width, members, train_s, log_s, memory, rows * cal.part_bytes_per_row, rows)


def _vectorised(blocks: int, members: int, device: str) -> bool:
    return device != "cpu" or blocks < members or members == 1


# The rates a GPU multiplies (every throughput; fixed costs per operation and pass stay).
GPU_SCALED_RATES = ("mm_flops", "conv_flops", "gconv_flops", "memory", "index")


def _gpu_rates(cal: Calibration) -> Calibration:
    f = GPU_THROUGHPUT_FACTOR
    return Calibration(**{**asdict(cal), **{name: getattr(cal, name) * f for name in GPU_SCALED_RATES}})


# ----- analytic kernels ----------------------------------------------------------------------------
# Pairs are timed as one K(x[:32], x[:32]): the kernel engine vectorises over pairs, and
# smaller calls overstate a pair (measured for the built-in GCNN: 2.6 ms per pair at 4 x 4,
# 0.7 at 32 x 32 and 32 x 64; for the regression study's models 32 x 32 is within 15% of
# 100 x 100, the block size they run in).
PAIR_PROBE = 32
DIAG_PROBE = 4


def pair_seconds(spec: ModelSpec, x: np.ndarray, n_out: int, mean: bool, cal: Calibration) -> tuple[float, float, float]:
    """``(setup, per pair, per diagonal point)`` seconds of ``spec``'s kernel (its own, or with ``mean`` the kernel of
    the analytic ensemble mean, ``analysis.kernels.mean_kernel_fn``) on inputs like ``x``: timed
    on 32 x 32 real pairs, once per machine (kept with the calibration)."""
    shape = tuple(int(s) for s in x.shape[1:])
    key = hashlib.sha256(json.dumps(dict(spec=spec.model_dump(mode="json"), shape=shape, n_out=int(n_out), mean=mean),
                                    sort_keys=True).encode()).hexdigest()[:16]
    if key in cal.pair_seconds and cal.pair_seconds[key][3:] == [DIAG_PROBE, 3]:
        return tuple(cal.pair_seconds[key][:3])
    n = PAIR_PROBE
    xs = np.asarray(x[:n], dtype=np.float64)
    if len(xs) < n:  # fewer inputs than the probe: repeat them (the cost does not depend on values)
        xs = np.concatenate([xs] * (-(-n // len(xs))))[:n]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as analysis.theory's workers run (and idle threads spinning would count as CPU)
    try:
        setup, per_pair, per_diag = _probe_kernel(spec, shape, n_out, mean, xs)
    finally:
        torch.set_num_threads(threads)
    cal.pair_seconds[key] = [setup, per_pair, per_diag, DIAG_PROBE, 3]  # 3: the probe's version
    cal.save()
    return setup, per_pair, per_diag


def _probe_kernel(spec: ModelSpec, shape: tuple, n_out: int, mean: bool, xs: np.ndarray) -> tuple[float, float, float]:
    """``pair_seconds``' timings, on one thread."""
    n = len(xs)
    t0 = time.perf_counter()
    kf = (mean_kernel_fn if mean else kernel_fn)(spec, shape, n_out)
    setup = time.perf_counter() - t0
    per_pair = _best_of(lambda: kf(xs, xs.copy(), get=("nngp", "ntk")), repeats=2, min_seconds=0) / (n * n)
    # the diagonal K(x_i, x_i) is its own call, vectorised for most kernels but one call per
    # point for some (the SO(3) GCNN's)
    kf(0.25 * xs[:1], get=("nngp", "ntk"), diag=True)  # a one-time set-up
    fresh = 0.5 * xs[:DIAG_PROBE]  # inputs no call above has seen (no cached per-input work)
    c0 = time.process_time()
    kf(fresh, get=("nngp", "ntk"), diag=True)
    per_diag = (time.process_time() - c0) / DIAG_PROBE
    return setup, per_pair, per_diag


def theory_pairs(spec: ModelSpec, n_train: int, set_sizes: list[int]) -> dict:
    """Input pairs of the analytic prediction of one (model, lr) (``analysis.theory``): the
    training kernel, the test rows (every orbit point, or one per orbit for an invariant
    model, rows that are training inputs copied) and the test diagonal."""
    order = spec.group_obj.order
    continuous = getattr(spec.group_obj, "continuous", False)
    augmented = spec.augmentation == "full_orbit" or (spec.augmentation == "random" and not continuous)
    train = n_train * order if augmented and not spec.equivariant else n_train
    if spec.equivariant and order > 1 and not continuous:
        test = sum(set_sizes) + len(set_sizes) * order  # one point per orbit, and the probes
    elif spec.equivariant and order > 1:
        # an SO(3) model's kernel on a grid is invariant only up to aliasing, so the check on
        # the probes fails and every orbit point is computed after them (measured: 87 s of the
        # SO(3) study's analysis, against 4 s for one point per orbit)
        test = sum(set_sizes) * order + sum(set_sizes) + len(set_sizes) * order
    else:
        test = sum(set_sizes) * order
    new = max(test - train, 0)
    # K(X, X) is symmetric: the engine computes about half of it (measured: 0.6 of the full
    # matrix's time for 32 inputs); the test diagonal is a call of its own
    # random augmentation has no closed-form variance, hence no diagonal (analysis.predict)
    diag = 0 if spec.augmentation == "random" and not spec.equivariant else test
    return dict(train=train, test=test, pairs=train * (train + 1) // 2 + new * train, diag=diag)


def theory_seconds(spec: ModelSpec, x: np.ndarray, n_out: int, set_sizes: list[int], cal: Calibration,
                   gpu: bool = False) -> float:
    """Predicted seconds of one model's analytic prediction (kernels; the solve is negligible
    at these sizes) on one CPU thread, or on a GPU."""
    mean = spec.augmentation == "random"  # SO(3) augmentation: the orbit-averaged kernel itself
    setup, per_pair, per_diag = pair_seconds(spec, x, n_out, mean, cal)
    n = theory_pairs(spec, len(x), set_sizes)
    return setup + (n["pairs"] * per_pair + n["diag"] * per_diag) / (GPU_KERNEL_FACTOR if gpu else 1.0)


def regression_seconds(spec: ModelSpec, x: np.ndarray, n_out: int, pool: int, test: int, block_size: int,
                       cal: Calibration) -> tuple[float, int]:
    """Core-seconds of one model's regression kernels (``analysis.regression.cached_kernels``):
    the upper blocks of pool x pool and the test x pool blocks, and how many blocks."""
    setup, per_pair, _ = pair_seconds(spec, x, n_out, True, cal)
    nb_pool, nb_test = -(-pool // block_size), -(-test // block_size)
    blocks = nb_pool * (nb_pool + 1) // 2 + nb_test * nb_pool
    pairs = pool * (pool + block_size) / 2 + test * pool  # upper blocks, the diagonal blocks whole
    return blocks * setup / max(blocks, 1) + pairs * per_pair, blocks
