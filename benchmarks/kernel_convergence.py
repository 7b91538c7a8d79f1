"""Finite-width kernels converging to the analytic ones: full curves and fitted slopes.

For each model family of tests/test_kernels_vs_finite.py (by default), finite networks at
widths 16 ... 1024 (group models up to ``--max-channels`` channels, i.e. width x |G|) and
``--seeds`` initialisations give the empirical NTK and the NNGP estimate
(``workers.empirical_ntk``). With ``Theta`` the analytic kernel, per width:

- ``r``: rms over initialisations of ``||Theta_s - Theta|| / ||Theta||`` (one network);
  docs/theory.md §2: ``r^2 = O(1/width)``, so the fitted slope of ``log r`` against ``log width`` is -1/2;
- ``e``: ``||mean_s Theta_s - Theta|| / ||Theta||`` (the ensemble mean); ``e^2 ~ (b/w)^2 + r^2/n``:
  slope -1 while the O(1/width) bias dominates, -1/2 once the mean is within its noise;
- ``q = e / (r / sqrt(n))``: the mean's deviation in units of its own noise; about 1 when no
  bias is resolved, growing like ``sqrt(n / w)`` where an O(1/width) bias dominates.

    python benchmarks/kernel_convergence.py [--seeds 16] [--max-width 1024] [--max-channels 2048] [--only mlp,cnn]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

warnings.filterwarnings("ignore", message=".*py3nj.*")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from workers.empirical_ntk import single_init  # noqa: E402
from analysis.kernels import kernel_fn  # noqa: E402
from study.spec import ModelSpec  # noqa: E402
from test_kernels_vs_finite import FAMILIES  # noqa: E402
from workers.models import build_model, init_parameters  # noqa: E402


def slope(w, y):
    ok = np.asarray(y) > 0
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(np.asarray(w)[ok]), np.log(np.asarray(y)[ok]), 1)[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=16)
    ap.add_argument("--max-width", type=int, default=1024)
    ap.add_argument("--max-channels", type=int, default=2048, help="cap on width x |G| for group models")
    ap.add_argument("--only", default="", help="comma-separated archs to run (mlp, cnn, gcnn, group_mlp)")
    args = ap.parse_args()
    only = set(filter(None, args.only.split(",")))
    worst_q = 0.0
    for fi, (arch, kw, shape, _) in enumerate(FAMILIES):
        if only and arch not in only:
            continue
        spec = ModelSpec(name="m", arch=arch, **{"sigma_b": 0.2, **kw})
        G = spec.group_obj.order if spec.equivariant else 1
        widths = [w for w in (16, 32, 64, 128, 256, 512, 1024, 2048)
                  if w <= args.max_width and w * G <= args.max_channels]
        x = np.random.default_rng(fi).normal(size=(3, *shape))
        analytic = kernel_fn(spec, shape)(x)
        xt = torch.from_numpy(x)
        print(f"\n{arch} {kw} {shape}, {args.seeds} seeds")
        print(f"  {'width':>6s} | {'nngp r':>8s} {'e':>8s} {'q':>6s} | {'ntk r':>8s} {'e':>8s} {'q':>6s} | {'s':>6s}")
        rows = {"nngp": [], "ntk": []}
        for w in widths:
            t = time.perf_counter()
            model = build_model(spec, w, shape, 1).double()
            draws = []
            for s in range(args.seeds):
                init_parameters(model, 10_000 * fi + 100 * w + s)
                draws.append(single_init(model, xt))
            line = f"  {w:6d} |"
            for i, name in enumerate(("nngp", "ntk")):
                d = np.stack([o[i] for o in draws])
                theta, norm = analytic[name], np.linalg.norm(analytic[name])
                r = np.sqrt(np.mean([np.linalg.norm(m - theta) ** 2 for m in d])) / norm
                e = np.linalg.norm(d.mean(0) - theta) / norm
                q = e / (r / np.sqrt(args.seeds))
                worst_q = max(worst_q, q)
                rows[name].append((r, e, q))
                line += f" {r:8.4f} {e:8.4f} {q:6.2f} |"
            print(line + f" {time.perf_counter() - t:6.1f}", flush=True)
        for name in ("nngp", "ntk"):
            r, e, _ = zip(*rows[name])
            print(f"  {name}: slope of log r {slope(widths, r):+.2f} (theory -0.50), "
                  f"slope of log e {slope(widths, e):+.2f} (between -1 and -0.5)")
    print(f"\nlargest q = e / (r / sqrt(n)) over all families and widths: {worst_q:.2f}")


if __name__ == "__main__":
    main()
