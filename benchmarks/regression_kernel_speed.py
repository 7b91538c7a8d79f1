"""How long the C4 GCNN kernel takes for 1,000 images of 28x28x3 against 1,000 others
(the PathMNIST regression study's test-by-pool block), locally and per block, so that the
time on a cluster of N nodes can be estimated.

The full 1000 x 1000 matrix takes far too long on 2 cores, so this times a representative
sample of blocks (``--blocks`` blocks of ``--block`` x ``--block`` distinct image pairs,
random PathMNIST-shaped inputs: the kernel's cost does not depend on the values) and
extrapolates, and says so:

1. per block, one task in one process pinned to one thread (what one Ray task on one CPU does);
2. the same blocks as Ray tasks on all local cores (``analysis.blocks.blocked_kernel``),
   which gives the local throughput including Ray's overhead.

Estimate for a cluster: blocks x (seconds per block on one CPU) / (N nodes x CPUs per node),
plus a few seconds of scheduling; the estimate assumes the blocks outnumber the CPUs.

    python benchmarks/regression_kernel_speed.py [--block 20] [--blocks 4] [--depth 1]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1000, help="images on each side (default 1000)")
    ap.add_argument("--block", type=int, default=20, help="block edge (rows = columns per task)")
    ap.add_argument("--blocks", type=int, default=4, help="blocks to time (a representative sample)")
    ap.add_argument("--depth", type=int, default=1, help="hidden layers of the GCNN (the study uses 1)")
    ap.add_argument("--size", type=int, default=28, help="image edge (PathMNIST: 28)")
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray measurement")
    args = ap.parse_args()

    import torch

    from analysis.blocks import blocked_kernel, compute_block, ensure_ray
    from analysis.regression import mean_engine
    from study.spec import ModelSpec

    spec = ModelSpec(name="gcnn", arch="gcnn", group="C4", depth=args.depth, support="identity")
    shape = (3, args.size, args.size)
    rng = np.random.default_rng(0)
    b = args.block
    cpus = os.cpu_count() or 1
    blocks_total = math.ceil(args.n / b) ** 2
    print(f"C4 GCNN kernel (depth {args.depth}, identity support, NNGP and NTK), images {shape}, "
          f"{args.n} x {args.n} = {args.n ** 2:,} pairs in {blocks_total} blocks of {b} x {b}; {cpus} local CPUs")

    # 1. One block at a time on one thread.
    torch.set_num_threads(1)
    xa = rng.standard_normal((b, *shape))
    compute_block(mean_engine, spec, shape, 9, xa[:2], xa[:2] + 1, ("nngp", "ntk"))  # build the engine, warm up
    times = []
    for i in range(args.blocks):
        x1 = rng.standard_normal((b, *shape))
        x2 = rng.standard_normal((b, *shape))
        t0 = time.perf_counter()
        compute_block(mean_engine, spec, shape, 9, x1, x2, ("nngp", "ntk"))
        times.append(time.perf_counter() - t0)
    per_block = float(np.median(times))
    per_pair = per_block / b**2
    print(f"per block ({b} x {b}, one CPU): median {per_block:.2f} s over {len(times)} blocks "
          f"(min {min(times):.2f}, max {max(times):.2f}); {1e3 * per_pair:.2f} ms per pair")
    serial = blocks_total * per_block
    print(f"EXTRAPOLATED full {args.n} x {args.n} on one CPU: {serial / 3600:.2f} h; "
          f"on this machine's {cpus} CPUs: {serial / cpus / 3600:.2f} h (ideal split)")

    # 2. The same work as Ray tasks on all local cores.
    if not args.no_ray:
        torch.set_num_threads(max(1, cpus))
        ensure_ray(num_cpus=cpus)
        k = cpus * math.ceil(args.blocks / cpus)  # a multiple of the CPUs, so no CPU idles in the last round
        x1 = rng.standard_normal((k * b, *shape))
        x2 = rng.standard_normal((b, *shape))
        blocked_kernel(spec, shape, 9, x1[:cpus * 2], x2[:2], block_size=2, engine=mean_engine)  # start workers
        t0 = time.perf_counter()
        blocked_kernel(spec, shape, 9, x1, x2, block_size=b, engine=mean_engine)
        wall = time.perf_counter() - t0
        per_block_ray = wall * cpus / k
        print(f"Ray, {k} blocks on {cpus} CPUs: {wall:.2f} s wall = {per_block_ray:.2f} CPU-s per block "
              f"(one-CPU figure {per_block:.2f} s; the difference is Ray overhead and CPU sharing)")
        print(f"EXTRAPOLATED full {args.n} x {args.n} locally with Ray: {blocks_total * wall / k / 3600:.2f} h")
        per_block = max(per_block, per_block_ray)
    print("cluster estimate (blocks x CPU-seconds per block / total CPUs):")
    for nodes, cpn in ((1, 16), (4, 16), (16, 16), (64, 16)):
        t = blocks_total * per_block / (nodes * cpn)
        print(f"  {nodes:3d} nodes x {cpn} CPUs: {t / 60:8.1f} min")


if __name__ == "__main__":
    main()
