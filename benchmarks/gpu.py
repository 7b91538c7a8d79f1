"""What a GPU buys: one line per figure, in under 5 minutes on a machine with a GPU.

    python benchmarks/gpu.py            # the visible GPU against this machine's CPU
    python benchmarks/gpu.py --quick    # smaller sizes (a smoke test; tests/test_plan.py runs it)

Figures (each the best of a few timed calls after a warm-up, one CPU thread for the CPU side):

1. ensemble speed-up over the per-member loop on the device: ``Ensemble.gd_step`` (vmap +
   vjp, every member in one block on a GPU) against a plain loop of ``nn.Module`` s with
   autograd, for an MLP (width 512) and a C4 GCNN (16 regular fields), 64 members, batch 128;
2. the device's ensemble training rate over one CPU thread's, for the same two models: the
   figure ``eqntk.cost.GPU_THROUGHPUT_FACTOR`` stands for (it assumes 30);
3. float64 on the device over one CPU thread for what the analytic kernels are made of: a
   matrix product and the arc-cosine / erf kernel recursions (elementwise over input pairs);
   ``eqntk.cost.GPU_KERNEL_FACTOR`` assumes 20;
4. the analytic kernel engine (``analysis.kernels``) itself, float64, on the device against
   one CPU thread: the NTK and NNGP of the built-in study's GCNN (full support), of its
   augmented CNN (orbit-averaged) and of the QM9 study's SO(3) GCNN (relative mode, bands
   [3, 3], B = 3), on the same inputs, with the largest relative difference between the two
   devices' kernels (round-off: the same sums in another order).

Without a GPU every figure is measured on the CPU (device = cpu) and a line says so, so the
script runs anywhere.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from analysis.kernels import mean_kernel_fn
from study.spec import ModelSpec
from workers.ensemble import Ensemble
from workers.models import build_model, init_parameters

SHAPE, N_OUT = (1, 8, 8), 10


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def best(fn, device: torch.device, repeats: int = 3) -> float:
    fn()
    sync(device)
    t = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        t = min(t, time.perf_counter() - t0)
    return t


def ensemble_and_loop(spec: ModelSpec, width: int, members: int, batch: int, device: torch.device,
                      loop_members: int) -> tuple[float, float]:
    """Seconds per member-step of the vectorised ensemble and of the per-member loop."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *SHAPE, generator=g).to(device)
    y = torch.randn(batch, N_OUT, generator=g).to(device)
    ens = Ensemble.from_seeds(build_model(spec, width, SHAPE, N_OUT), list(range(members)), init_parameters, device)
    singles = [ens.member(j) for j in range(min(loop_members, members))]

    def loop():
        for m in singles:
            m.zero_grad(set_to_none=True)
            (0.5 * (m(x) - y).square().sum() / batch).backward()
            with torch.no_grad():
                for p in m.parameters():
                    p.sub_(p.grad, alpha=1e-6)
    t_ens = best(lambda: ens.gd_step(x, y, 1e-6), device) / members
    t_loop = best(loop, device) / len(singles)
    return t_ens, t_loop


def kernel_primitives(device: torch.device, n: int) -> float:
    """Seconds of a float64 product of two n x n matrices and the ReLU (arc-cosine) and erf
    kernel recursions over its n^2 entries: the analytic kernels' own operations."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g, dtype=torch.float64).to(device)
    b = torch.randn(n, n, generator=g, dtype=torch.float64).to(device)
    d = torch.rand(n, generator=g, dtype=torch.float64).to(device) + 1

    def recursion():
        k = a @ b / n
        norm = torch.sqrt(d[:, None] * d[None, :])
        rho = (k / norm).clamp(-1, 1)
        theta = torch.acos(rho)
        relu = norm / (2 * math.pi) * (torch.sin(theta) + (math.pi - theta) * rho)
        erf = 2 / math.pi * torch.asin(2 * k / torch.sqrt((1 + 2 * d[:, None]) * (1 + 2 * d[None, :])))
        return relu + erf
    return best(recursion, device)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes: a smoke test of the script")
    a = ap.parse_args(argv)
    t_start = time.perf_counter()
    torch.set_num_threads(1)
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    cpu = torch.device("cpu")
    print(f"device: {torch.cuda.get_device_name(0) if gpu else 'no GPU visible: every figure is measured on the CPU'}; "
          f"torch {torch.__version__}; load average {os.getloadavg()[0]:.2f}")
    members, batch, loop_members = (8, 32, 4) if a.quick else (64, 128, 8)
    models = [("MLP width {}", ModelSpec(name="mlp", arch="mlp", depth=2), 512 if not a.quick else 64),
              ("C4 GCNN {} fields", ModelSpec(name="gcnn", arch="gcnn", depth=2), 16 if not a.quick else 2)]
    for label, spec, width in models:
        label = label.format(width)
        t_ens, t_loop = ensemble_and_loop(spec, width, members, batch, device, loop_members)
        print(f"ensemble speed-up over the per-member loop, {label}, {members} members, batch {batch}, {device}: "
              f"{t_loop / t_ens:.1f}x ({1 / t_ens:.0f} against {1 / t_loop:.0f} member-steps/s)")
        if gpu:
            t_cpu, _ = ensemble_and_loop(spec, width, max(4, members // 8), batch, cpu, 1)
            print(f"ensemble training rate, {label}, {device} over one CPU thread: {t_cpu / t_ens:.0f}x "
                  f"(eqntk.cost.GPU_THROUGHPUT_FACTOR assumes 30)")
        else:
            print(f"ensemble training rate, {label}, GPU over one CPU thread: not measured (no GPU; "
                  f"eqntk.cost.GPU_THROUGHPUT_FACTOR assumes 30)")
    n = 256 if a.quick else 2048
    t_cpu = kernel_primitives(cpu, n)
    if gpu:
        t_dev = kernel_primitives(device, n)
        print(f"float64 kernel primitives ({n} x {n} pairs), {device} over one CPU thread: {t_cpu / t_dev:.0f}x "
              f"({t_dev * 1e3:.2f} ms against {t_cpu * 1e3:.1f} ms; eqntk.cost.GPU_KERNEL_FACTOR assumes 20)")
    else:
        print(f"float64 kernel primitives ({n} x {n} pairs) on one CPU thread: {t_cpu * 1e3:.1f} ms "
              f"(GPU: not measured, no GPU)")
    engines = [("GCNN (full support)", ModelSpec(name="gcnn_full", arch="gcnn", depth=2, support="full",
                                                 nonlinearity="erf", sigma_w=3.0), 8 if a.quick else 128),
               ("augmented CNN (orbit-averaged)", ModelSpec(name="cnn_aug", arch="cnn", depth=2, nonlinearity="erf",
                                                            sigma_w=3.0, augmentation="full_orbit"), 8 if a.quick else 128),
               ("SO(3) GCNN (relative mode)", ModelSpec(name="so3", arch="so3_gcnn", group="SO3", depth=2, bands=[3, 3],
                                                        so3_grid=3, kernel_mode="relative"), 8 if a.quick else 1024)]
    for label, spec, inputs in engines:
        x = np.random.default_rng(0).normal(size=(inputs, *SHAPE))  # SO(3): one channel on an 8 x 8 sphere grid
        kf = mean_kernel_fn(spec, SHAPE, N_OUT)
        t_cpu = best(lambda: kf(x, device=cpu), cpu, repeats=1)
        if not gpu:
            print(f"analytic kernel engine, {label}, {inputs} x {inputs} inputs, float64: {t_cpu:.2f} s on one CPU "
                  f"thread (GPU: not measured, no GPU)")
            continue
        t_dev = best(lambda: kf(x, device=device), device, repeats=2)
        on_cpu, on_dev = kf(x, device=cpu), kf(x, device=device)
        diff = max(float(np.abs(on_dev[k] - on_cpu[k]).max() / np.abs(on_cpu[k]).max()) for k in on_cpu)
        print(f"analytic kernel engine, {label}, {inputs} x {inputs} inputs, float64, {device} over one CPU thread: "
              f"{t_cpu / t_dev:.0f}x ({t_dev:.3f} s against {t_cpu:.2f} s; largest relative difference {diff:.1e}; "
              f"eqntk.cost.GPU_KERNEL_FACTOR assumes 20)")
    print(f"benchmark time: {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
