"""Speed of the vectorised ensemble against a per-member Python loop, in one run.

For each model (2-hidden-layer MLPs of width 512 and 64, 2-layer C4 GCNNs of width 64 and 4,
1x8x8 inputs, full batch 256, 10 outputs) it times full-batch gradient-descent steps of
- the ensemble as ``train_gd`` runs it (``Ensemble.gd_step``: vmap + vjp, all members in
  one block on a GPU; on a CPU, members too big to gain from vmap run one at a time),
- the whole ensemble as one vmap block, and
- a plain loop over the same members (one ``nn.Module`` each, autograd, in-place update),
and prints member-steps per second, their ratio, and the achieved FLOP/s (forward +
backward FLOPs counted analytically) as a fraction of a large float32 matmul measured on the
same machine in the same run. It then measures what logging costs: one log (every member
on the orbits of a 256-input training set and a 256-input eval set) in units of training
steps, and the share of a whole ``train_gd`` run spent logging.

    python benchmarks/ensemble_speed.py                 # 64 members, CPU or the visible GPU
    python benchmarks/ensemble_speed.py --members 8 --steps 2 --models mlp
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch

from study.spec import ModelSpec
from workers import ensemble as ensemble_module
from workers.augment import make_augmentation
from workers.ensemble import Ensemble, member_seeds
from workers.models import build_model, init_parameters
from workers.train import orbit_inputs, train_gd

SHAPE, N_OUT, BATCH = (1, 8, 8), 10, 256
MODELS = {
    "mlp": (ModelSpec(name="bench_mlp", arch="mlp", depth=2, group="C4"), 512),
    "mlp64": (ModelSpec(name="bench_mlp", arch="mlp", depth=2, group="C4"), 64),
    "gcnn": (ModelSpec(name="bench_gcnn", arch="gcnn", depth=2, group="C4", support="full"), 64),
    "gcnn4": (ModelSpec(name="bench_gcnn", arch="gcnn", depth=2, group="C4", support="full"), 4),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats: int) -> float:
    """Seconds per call: the fastest of ``repeats`` calls after a warm-up call (the cores may be shared)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best


def matmul_flops(device, n: int) -> float:
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    return 2 * n**3 / timed(lambda: a @ b, device, 5)


def step_flops(spec: ModelSpec, width: int) -> float:
    """Forward + backward FLOPs of one member's full-batch step (multiply-add = 2 FLOPs).

    Backward = weight gradients (as many FLOPs as the forward) + input gradients of every
    layer but the first. Convolutions are counted as executed: a dense torch filter
    ``[out |G|, in, k, k]`` at every pixel (the GCNN builds its filter, then calls conv2d).
    """
    c, h, w = SHAPE
    if spec.arch == "mlp":
        layers = [c * h * w * width, width * width, width * N_OUT]  # multiply-adds per sample
    else:
        g, k, p = 4, 3, h * w
        layers = [width * g * c * k * k * p, width * g * width * g * k * k * p, width * N_OUT]
    forward = 2 * BATCH * sum(layers)
    backward = 2 * BATCH * (sum(layers) + sum(layers[1:]))
    return float(forward + backward)


def bench_model(name: str, members: int, loop_members: int, steps: int, device, peak: float) -> None:
    spec, width = MODELS[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, *SHAPE, generator=gen).to(device)
    y = torch.randn(BATCH, N_OUT, generator=gen).to(device)
    seeds = member_seeds(0, spec.name, width, 0, members)
    module = build_model(spec, width, SHAPE, N_OUT)
    ens = Ensemble.from_seeds(module, seeds, init_parameters, device, torch.float32)

    def vectorised():
        ens.gd_step(x, y, 0.01)

    singles = [ens.member(j) for j in range(min(loop_members, members))]

    def loop():
        for m in singles:
            m.zero_grad(set_to_none=True)
            loss = 0.5 * (m(x) - y).square().sum() / BATCH
            loss.backward()
            with torch.no_grad():
                for p in m.parameters():
                    p.sub_(p.grad, alpha=0.01)

    block, chunk, vectorise = ens._plan(x, False, backward=True)
    plan = f"vmap blocks of {block}" if vectorise else "one member at a time"
    t_vec = timed(vectorised, device, steps)
    with one_vmap_block():
        t_one = timed(vectorised, device, steps) if block < members or not vectorise else t_vec
    t_loop = timed(loop, device, steps) * members / len(singles)  # the loop is linear in members
    flops = step_flops(spec, width) * members
    print(f"{name} (width {width}, {members} members, batch {BATCH}, float32, {device}):")
    for label, t in [(f"ensemble ({plan}, chunks of {chunk})", t_vec), ("one vmap block", t_one)]:
        print(f"  {label:34s} {members / t:9.1f} member-steps/s  {flops / t / 1e9:8.1f} GFLOP/s "
              f"({flops / t / peak:.0%} of the matmul rate)")
    print(f"  {'loop over members':34s} {members / t_loop:9.1f} member-steps/s  {flops / t_loop / 1e9:8.1f} GFLOP/s "
          f"({flops / t_loop / peak:.0%} of the matmul rate)")
    print(f"  speed-up over the loop: ensemble {t_loop / t_vec:.1f}x, one vmap block {t_loop / t_one:.1f}x")
    if name == "mlp":
        bench_logging(ens, x, y, spec, t_vec)


@contextlib.contextmanager
def one_vmap_block():
    """Every member in one vmap block, whatever the CPU rule (``Ensemble._plan``) says."""
    saved = ensemble_module.CPU_BLOCK_BYTES, ensemble_module.CPU_VMAP_MEMBER_BYTES
    ensemble_module.CPU_BLOCK_BYTES = ensemble_module.CPU_VMAP_MEMBER_BYTES = 2**62
    try:
        yield
    finally:
        ensemble_module.CPU_BLOCK_BYTES, ensemble_module.CPU_VMAP_MEMBER_BYTES = saved


def bench_logging(ens: Ensemble, x, y, spec: ModelSpec, t_step: float) -> None:
    group = spec.group_obj
    test = torch.randn_like(x)
    evals = {"train": orbit_inputs(group, x), "test": orbit_inputs(group, test)}

    class NullWriter:
        def log(self, step, eval_set, preds):
            pass

    def one_log():
        for inputs in evals.values():
            ens.predict(inputs.x).cpu().numpy()

    t_log = timed(one_log, ens.device, 2)
    print(f"  one log ({sum(e.n for e in evals.values())} inputs x |G| = {group.order}): {t_log:.3f} s "
          f"= {t_log / t_step:.1f} training steps")
    for logs, steps in [(20, 1000), (5, 50)]:
        print(f"    {logs} logs in {steps} steps: logging is {logs * t_log / (logs * t_log + steps * t_step):.0%} of the run")
    steps = 40
    log_steps = sorted({0, 1, 2, 5, 10, 20, 40})
    aug = make_augmentation("none", group, x, y)
    start = time.perf_counter()
    train_gd(ens, aug, 0.01, steps, log_steps, evals, NullWriter())
    total = time.perf_counter() - start
    print(f"  train_gd, {steps} steps, {len(log_steps)} logs: {total:.2f} s, of which logging "
          f"~{len(log_steps) * t_log / total:.0%}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--members", type=int, default=64)
    ap.add_argument("--loop-members", type=int, default=64, help="members the loop is timed on (it scales linearly)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per measurement")
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    torch.backends.cuda.matmul.allow_tf32 = False  # compare true float32 with true float32
    torch.backends.cudnn.allow_tf32 = False
    peak = matmul_flops(device, 8192 if device.type == "cuda" else 4096)
    print(f"float32 matmul on {device} ({torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")
    for name in args.models:
        bench_model(name, args.members, args.loop_members, args.steps, device, peak)


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
