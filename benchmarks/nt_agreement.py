"""Our MLP and CNN kernels against neural-tangents, and the time ratio, measured in one run.

neural-tangents is never a dependency of eqntk: run this with the Python of a separate venv
that has both (``NTVENV/bin/python benchmarks/nt_agreement.py``; benchmarks/README.md says how to
make it once, at any path).

neural-tangents is set to our parameterisation: ``parameterization="ntk"``,
``W_std = sigma_w``, ``b_std = sigma_b`` (its Conv uses the same fan-in, channels x taps),
float64 (``jax_enable_x64``), images transposed to its NHWC layout, padding names
``CIRCULAR`` / ``SAME`` / ``VALID``. Agreement is required to 1e-8 relative.

Timing: a 2-layer ReLU CNN (3x3, circular) with global average pooling on 8x8 and 16x16
single-channel images, 32 inputs, NNGP and NTK. neural-tangents' kernel function is jitted
and timed after its compilation (compile time printed separately); ours is timed as called.
"""

from __future__ import annotations

import os
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
warnings.filterwarnings("ignore")

import jax  # noqa: E402

jax.config.update("jax_enable_x64", True)

import numpy as np  # noqa: E402
from neural_tangents import stax  # noqa: E402

from analysis.kernels import kernel_fn, orbit_averaged  # noqa: E402
from study.spec import ModelSpec  # noqa: E402

NT_PADDING = {"circular": "CIRCULAR", "zero": "SAME", "valid": "VALID"}
NT_PHI = {"relu": stax.Relu, "erf": stax.Erf, "identity": stax.Identity}
RTOL = 1e-8


def nt_kernel_fn(spec: ModelSpec, width: int = 512):
    """The neural-tangents network of an ``mlp`` or ``cnn`` spec (docs/models.md)."""
    b_std = spec.sigma_b if spec.bias else None
    aff = dict(W_std=spec.sigma_w, b_std=b_std, parameterization="ntk")
    phi = NT_PHI[spec.nonlinearity]
    layers = []
    if spec.arch == "mlp":
        layers.append(stax.Flatten())
        for _ in range(spec.depth):
            layers += [stax.Dense(width, **aff), phi()]
    else:
        k = spec.kernel_size
        for _ in range(spec.depth):
            layers += [stax.Conv(width, (k, k), padding=NT_PADDING[spec.padding], **aff), phi()]
        layers.append(stax.GlobalAvgPool() if spec.readout == "gap" else stax.Flatten())
    layers.append(stax.Dense(1, **aff))
    return stax.serial(*layers)[2]


def to_nhwc(x):
    return np.transpose(x, (0, 2, 3, 1)) if x.ndim == 4 else np.transpose(x, (0, 2, 1))


def rel(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max())


def agreement() -> bool:
    rng = np.random.default_rng(0)
    cases = [
        ("mlp", dict(depth=2), (2, 6, 6)),
        ("mlp", dict(depth=3, nonlinearity="erf", sigma_w=1.4, sigma_b=0.3), (3, 10)),
        ("mlp", dict(depth=1, bias=False), (1, 5, 5)),
        ("cnn", dict(padding="circular", readout="gap"), (2, 6, 6)),
        ("cnn", dict(padding="zero", readout="flatten", sigma_b=0.4), (1, 7, 7)),
        ("cnn", dict(padding="valid", readout="gap", depth=3, nonlinearity="erf"), (2, 8, 8)),
        ("cnn", dict(padding="circular", readout="flatten", kernel_size=5, sigma_w=0.8), (1, 6, 6)),
        ("cnn", dict(padding="zero", readout="gap", depth=3, bias=False), (3, 5, 5)),
    ]
    ok = True
    print(f"{'model':58s} {'nngp rel':>10s} {'ntk rel':>10s}")
    for arch, kw, shape in cases:
        spec = ModelSpec(name="m", arch=arch, **kw)
        x1, x2 = rng.normal(size=(5, *shape)), rng.normal(size=(4, *shape))
        ours = kernel_fn(spec, shape)(x1, x2)
        theirs = nt_kernel_fn(spec)(to_nhwc(x1), to_nhwc(x2), ("nngp", "ntk"))
        r = [rel(ours[g], np.asarray(getattr(theirs, g))) for g in ("nngp", "ntk")]
        ok &= max(r) < RTOL
        print(f"{arch + ' ' + str(kw) + ' ' + str(shape):58s} {r[0]:10.1e} {r[1]:10.1e}")
    # docs/theory.md §3: the identity-support GCNN is the orbit average of nt's CNN kernel
    for group in ("C4", "D4"):
        common = dict(group=group, padding="circular", readout="gap", sigma_b=0.2)
        shape = (1, 5, 5)
        x = rng.normal(size=(4, *shape))
        cnn = ModelSpec(name="c", arch="cnn", **common)
        nt_cnn = nt_kernel_fn(cnn)
        G = cnn.group_obj
        orbit = G.orbit_image(x).reshape(-1, *shape)
        nt_avg = {g: np.asarray(getattr(nt_cnn(to_nhwc(x), to_nhwc(orbit), ("nngp", "ntk")), g))
                  .reshape(len(x), len(x), G.order).mean(-1) for g in ("nngp", "ntk")}
        gcnn = kernel_fn(ModelSpec(name="g", arch="gcnn", support="identity", **common), shape)(x)
        r = [rel(gcnn[g], nt_avg[g]) for g in ("nngp", "ntk")]
        ok &= max(r) < RTOL
        print(f"{'gcnn identity ' + group + ' vs nt CNN orbit average':58s} {r[0]:10.1e} {r[1]:10.1e}")
    print(f"agreement to {RTOL:g}: {'yes' if ok else 'NO'}")
    return ok


def timing(repeats: int = 3) -> None:
    print(f"\n2-layer ReLU CNN, 3x3 circular, GAP, 32 inputs, NNGP + NTK, float64 "
          f"(load average {os.getloadavg()[0]:.2f}):")
    rng = np.random.default_rng(1)
    for side in (8, 16):
        spec = ModelSpec(name="c", arch="cnn", depth=2, padding="circular", readout="gap")
        shape = (1, side, side)
        x = rng.normal(size=(32, *shape))
        ours = kernel_fn(spec, shape)
        nt_fn = jax.jit(nt_kernel_fn(spec), static_argnames="get")
        xn = to_nhwc(x)
        t = time.perf_counter()
        jax.block_until_ready(nt_fn(xn, None, get=("nngp", "ntk")))
        compile_s = time.perf_counter() - t
        nt_t, our_t = [], []
        for _ in range(repeats):
            t = time.perf_counter()
            theirs = jax.block_until_ready(nt_fn(xn, None, get=("nngp", "ntk")))
            nt_t.append(time.perf_counter() - t)
            t = time.perf_counter()
            mine = ours(x)
            our_t.append(time.perf_counter() - t)
        r = rel(mine["ntk"], np.asarray(theirs.ntk))
        print(f"  {side}x{side}: ours {min(our_t):.3f} s, neural-tangents {min(nt_t):.3f} s "
              f"(+{compile_s:.1f} s compile): nt / ours = {min(nt_t) / min(our_t):.2f}  (ntk rel diff {r:.1e})")


if __name__ == "__main__":
    agreement()
    timing()
