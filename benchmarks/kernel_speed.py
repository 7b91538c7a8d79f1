"""Speed of the analytic kernels (analysis.kernels), measured in one run.

1. The headline: NTK of a C4 GCNN (3x3 circular lifting, ReLU, full-support 3x3 group conv,
   ReLU, group pooling, global average pooling, dense) on 16x16 single-channel images,
   32 inputs, float64. Goal: under 5 s on 2 cores (a published implementation needs over
   5 minutes for this).
2. The built-in study's escnn model: C4 GCNN with escnn's basis, depth 2, 3x3, 8x8 images,
   100 training and 300 evaluation inputs (K(train, train), K(eval, train), diag K(eval)).
3. The escnn covariance route with and without right-invariant storage (same kernel).

Wall times depend on what else runs on the machine: the load average is printed, and so
is the process CPU time (all threads).

    python benchmarks/kernel_speed.py [--repeats 3] [--skip-study]
"""

from __future__ import annotations

import argparse
import os
import time
import warnings

import numpy as np
import torch

warnings.filterwarnings("ignore", message=".*py3nj.*")

from analysis.kernels import kernel_fn  # noqa: E402
from study.spec import ModelSpec  # noqa: E402


def timed(fn, repeats: int):
    walls, cpus, out = [], [], None
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.process_time() - c)
    return out, min(walls), float(np.median(walls)), min(cpus)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-study", action="store_true", help="skip the study-size escnn timing")
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f}")
    rng = np.random.default_rng(0)

    # 1. headline
    spec = ModelSpec(name="c4", arch="gcnn", group="C4", depth=2, kernel_size=3, padding="circular",
                     support="full", readout="gap", nonlinearity="relu")
    x = rng.normal(size=(32, 1, 16, 16))
    kf = kernel_fn(spec, (1, 16, 16))
    out, best, med, cpu = timed(lambda: kf(x, get=("ntk",)), args.repeats)
    print(f"\n[1] C4 GCNN NTK, 16x16, 32 inputs (float64): best {best:.2f} s, median {med:.2f} s "
          f"(CPU {cpu:.2f} s); goal < 5 s -> {'met' if best < 5 else 'NOT met'}")
    print(f"    Theta[0, :3] = {np.array2string(out['ntk'][0, :3], precision=6)}")

    # 2. the study's escnn model
    if not args.skip_study:
        esc = ModelSpec(name="esc", arch="gcnn", group="C4", basis="escnn", depth=2, kernel_size=3)
        xtr, xte = rng.normal(size=(100, 1, 8, 8)), rng.normal(size=(300, 1, 8, 8))
        t = time.perf_counter()
        kfe = kernel_fn(esc, (1, 8, 8))
        build = time.perf_counter() - t

        def study():
            kfe(xtr)
            kfe(xte, xtr)
            return kfe(xte, diag=True)

        _, best, med, cpu = timed(study, 1)
        print(f"\n[2] escnn C4 GCNN, 8x8, 100 train + 300 eval (NNGP and NTK): {best:.1f} s "
              f"(CPU {cpu:.1f} s), engine built in {build:.1f} s")

    # 3. right-invariant storage against the full covariance route
    esc = ModelSpec(name="esc", arch="gcnn", group="C4", basis="escnn", depth=2, kernel_size=3)
    x8 = rng.normal(size=(16, 1, 8, 8))
    fast = kernel_fn(esc, (1, 8, 8))
    full = kernel_fn(esc, (1, 8, 8), route="basis_full")
    a, t_fast, _, _ = timed(lambda: fast(x8), args.repeats)
    b, t_full, _, _ = timed(lambda: full(x8), 1)
    diff = np.abs(a["ntk"] - b["ntk"]).max() / np.abs(b["ntk"]).max()
    print(f"\n[3] escnn C4, 8x8, 16 inputs: right-invariant {t_fast:.2f} s, full covariance {t_full:.2f} s "
          f"(x{t_full / t_fast:.1f}); same kernel to {diff:.1e}")


if __name__ == "__main__":
    main()
