"""Analytic kernels against closed forms and against a brute-force evaluation of docs/theory.md's formulas.

The brute force below applies docs/theory.md §2-§3 and docs/models.md literally, on the full
feature index (input, group element, position) of a tiny joint input set: no right
invariance, no separable shifts, no patches, no FFT. Tolerances are float64 round-off of
sums of at most a few thousand terms (<= 1e-12 relative).
"""

import math

import numpy as np
import pytest
from scipy.special import erf

from analysis.kernels import kernel_fn
from study.groups import Group
from study.spec import ModelSpec

RTOL = 1e-12  # float64 round-off of both evaluations, with margin


def _close(a, b, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(np.abs(b).max(), 1e-300)
    assert np.abs(a - b).max() <= rtol * scale, f"max diff {np.abs(a - b).max():.3e}, scale {scale:.3e}"


# ----- closed forms ---------------------------------------------------------------------------
def _relu_expectations(k12, k11, k22):
    cos = np.clip(k12 / np.sqrt(k11 * k22), -1, 1)
    t = np.arccos(cos)
    psi = np.sqrt(k11 * k22) * (np.sin(t) + (np.pi - t) * cos) / (2 * np.pi)
    return psi, (np.pi - t) / (2 * np.pi)


def _erf_expectations(k12, k11, k22):
    psi = (2 / np.pi) * np.arcsin(2 * k12 / np.sqrt((1 + 2 * k11) * (1 + 2 * k22)))
    dpsi = (4 / np.pi) / np.sqrt((1 + 2 * k11) * (1 + 2 * k22) - 4 * k12**2)
    return psi, dpsi


EXPECT = {"relu": _relu_expectations, "erf": _erf_expectations,
          "identity": lambda k12, k11, k22: (k12, np.ones_like(k12))}


@pytest.mark.parametrize("phi", ["relu", "erf"])
@pytest.mark.parametrize("shape", [(2, 3, 3), (3, 10)])
def test_one_hidden_layer_closed_form(phi, shape):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(5, *shape))
    sw, sb = 1.3, 0.4
    spec = ModelSpec(name="m", arch="mlp", depth=1, nonlinearity=phi, sigma_w=sw, sigma_b=sb)
    out = kernel_fn(spec, shape)(x)
    v = x.reshape(len(x), -1)
    k1 = sw**2 * v @ v.T / v.shape[1] + sb**2  # first layer: NNGP = NTK
    d = np.diag(k1)
    psi, dpsi = EXPECT[phi](k1, d[:, None], d[None, :])
    nngp = sw**2 * psi + sb**2
    _close(out["nngp"], nngp)
    _close(out["ntk"], nngp + sw**2 * dpsi * k1)
    diag = kernel_fn(spec, shape)(x, diag=True)
    _close(diag["ntk"], np.diag(nngp + sw**2 * dpsi * k1))


def test_erf_expectations_match_monte_carlo_formula_identity():
    # The erf closed form at k12 = k11 = k22 = k reduces to (2/pi) asin(2k/(1+2k)) and
    # (4/pi)/sqrt(1+4k); check the engine's implementation at those points exactly.
    import torch

    from analysis.kernel_nonlin import gaussian_expectations

    k = torch.tensor([0.0, 0.3, 2.0, 10.0], dtype=torch.float64)
    psi, dpsi = gaussian_expectations("erf", k, k, k)
    _close(psi.numpy(), (2 / np.pi) * np.arcsin(2 * k.numpy() / (1 + 2 * k.numpy())))
    _close(dpsi.numpy(), (4 / np.pi) / np.sqrt(1 + 4 * k.numpy()))
    # erf'(0)^2 = 4/pi: a zero-variance unit is the constant erf(0) = 0 with slope 2/sqrt(pi)
    assert abs(dpsi[0].item() - 4 / math.pi) < 1e-15
    assert abs(erf(0.0)) == 0.0


def test_relu_dead_units_have_zero_derivative_kernel():
    # An all-zero image without bias: every pre-activation is exactly 0, relu'(0) = 0 in torch.
    spec = ModelSpec(name="m", arch="cnn", depth=2, bias=False)
    x = np.zeros((2, 1, 4, 4))
    x[1, 0, 1, 2] = 1.0
    out = kernel_fn(spec, (1, 4, 4))(x)
    assert out["ntk"][0, 0] == 0.0 and out["nngp"][0, 1] == 0.0
    assert np.all(np.isfinite(out["ntk"]))


# ----- brute force over (input, group element, position) ------------------------------------------
def _offsets(k):
    lo = (k - 1) // 2
    return [(a - lo, b - lo) for a in range(k) for b in range(k)]


def _rotated(group, k):
    """R[g][t]: the offset R_g delta_t, read off L_g acting on one-hot k x k windows."""
    lo = (k - 1) // 2
    out = []
    for g in range(group.order):
        row = []
        for t in range(k * k):
            e = np.zeros((k, k))
            e.flat[t] = 1.0
            pos = int(np.argmax(np.asarray(group.act_image(e, g))))
            row.append((pos // k - lo, pos % k - lo))
        out.append(row)
    return out


def _conv_like(M, supp, G_out, rot, k, padding, pick):
    """K[n,g,p,m,h,q] = mean over (s in supp, t) of M[n, pick(g,s), p + R_g d_t, m, pick(h,s), q + R_h d_t].

    ``M`` is [N, Gin, H, W, N, Gin, H, W]; out-of-grid positions are periodic (circular) or
    zero (zero); ``valid`` outputs only positions whose window fits (output i is input i + lo).
    """
    N, _, H, W = M.shape[:4]
    lo = (k - 1) // 2
    pad = max(lo, k // 2)
    if padding == "valid":
        Mp, base, Ho, Wo = M, lo, H - k + 1, W - k + 1
    else:
        widths = [(0, 0), (0, 0), (pad, pad), (pad, pad)] * 2
        Mp = np.pad(M, widths, mode="wrap" if padding == "circular" else "constant")
        base, Ho, Wo = pad, H, W
    out = np.zeros((N, G_out, Ho, Wo, N, G_out, Ho, Wo))
    rows, cols = np.arange(Ho) + base, np.arange(Wo) + base
    for g in range(G_out):
        for h in range(G_out):
            for s in supp:
                sub = Mp[:, pick(g, s), :, :, :, pick(h, s)]
                for t in range(k * k):
                    (a1, b1), (a2, b2) = rot[g][t], rot[h][t]
                    out[:, g, :, :, :, h] += (
                        sub.take(rows + a1, axis=1).take(cols + b1, axis=2).take(rows + a2, axis=4).take(cols + b2, axis=5)
                    )
    return out / (len(supp) * k * k)


def _nonlin(K, phi):
    N, G, H, W = K.shape[:4]
    flat = K.reshape(N * G * H * W, -1)
    d = np.diag(flat)
    psi, dpsi = EXPECT[phi](flat, d[:, None], d[None, :])
    return psi.reshape(K.shape), dpsi.reshape(K.shape)


def brute_force_gcnn(spec, x):
    """NNGP and NTK of a canonical ``gcnn`` (or a ``cnn``, the trivial group) on inputs ``x``."""
    group = spec.group_obj if spec.arch == "gcnn" else Group.parse("C1")
    G, k, pad = group.order, spec.kernel_size, spec.padding
    sw2, sb2 = spec.sigma_w**2, (spec.sigma_b**2 if spec.bias else 0.0)
    rot = _rotated(group, k) if spec.arch == "gcnn" else [_offsets(k)]
    N, C, H, W = x.shape
    s0 = np.einsum("ncij,mcab->nijmab", x, x) / C
    s0 = s0[:, None, :, :, :, None]  # one trivial input field
    K = sw2 * _conv_like(s0, [0], G, rot, k, pad, lambda g, s: 0) + sb2
    T = K.copy()
    mul = group.mul
    for _ in range(spec.depth - 1):
        psi, dpsi = _nonlin(K, spec.nonlinearity)
        supp = list(range(G)) if spec.support == "full" else [0]
        pick = (lambda g, s: mul[g, s]) if spec.arch == "gcnn" else (lambda g, s: 0)
        if spec.arch != "gcnn":
            supp = [0]
        K = sw2 * _conv_like(psi, supp, G, rot, k, pad, pick) + sb2
        T = K + sw2 * _conv_like(dpsi * T, supp, G, rot, k, pad, pick)
    psi, dpsi = _nonlin(K, spec.nonlinearity)
    psi_t = dpsi * T
    pooled = [m.mean(axis=(1, 5)) for m in (psi, psi_t)]  # group pooling: [N, H, W, N, H, W]
    if spec.readout == "gap":
        red = [m.mean(axis=(1, 2, 4, 5)) for m in pooled]
    else:
        red = []
        for m in pooled:
            n, h, w = m.shape[:3]
            red.append(np.einsum("npmp->nm", m.reshape(n, h * w, n, h * w)) / (h * w))
    nngp = sw2 * red[0] + sb2
    return nngp, nngp + sw2 * red[1]


def brute_force_group_mlp(spec, x):
    group = spec.group_obj
    G = group.order
    sw2, sb2 = spec.sigma_w**2, (spec.sigma_b**2 if spec.bias else 0.0)
    from study.bases import domain_permutation

    perm = domain_permutation(group, x.shape[1:])
    v = x.reshape(len(x), -1)
    inv = group.inverse
    moved = np.stack([v[:, perm[inv[g]]] for g in range(G)], axis=1)  # L_g^-1 v: [N, G, d]
    K = sw2 * np.einsum("nai,mbi->namb", moved, moved) / v.shape[1] + sb2
    T = K.copy()
    supp = list(range(G)) if spec.support == "full" else [0]
    for _ in range(spec.depth - 1):
        flat = K.reshape(len(x) * G, -1)
        d = np.diag(flat)
        psi, dpsi = (m.reshape(K.shape) for m in EXPECT[spec.nonlinearity](flat, d[:, None], d[None, :]))
        mul = group.mul
        new = np.zeros_like(K)
        newt = np.zeros_like(K)
        for s in supp:
            new += psi[:, mul[:, s]][:, :, :, mul[:, s]]
            newt += (dpsi * T)[:, mul[:, s]][:, :, :, mul[:, s]]
        K = sw2 * new / len(supp) + sb2
        T = K + sw2 * newt / len(supp)
    flat = K.reshape(len(x) * G, -1)
    d = np.diag(flat)
    psi, dpsi = (m.reshape(K.shape) for m in EXPECT[spec.nonlinearity](flat, d[:, None], d[None, :]))
    nngp = sw2 * psi.mean(axis=(1, 3)) + sb2
    return nngp, nngp + sw2 * (dpsi * T).mean(axis=(1, 3))


CNN_CASES = [
    dict(padding="circular", readout="gap"),
    dict(padding="zero", readout="flatten", nonlinearity="erf"),
    dict(padding="valid", readout="gap", sigma_b=0.5),
    dict(padding="circular", readout="flatten", kernel_size=2),
    dict(padding="zero", readout="gap", kernel_size=2, bias=False),
]


@pytest.mark.parametrize("kw", CNN_CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_cnn_matches_brute_force(kw):
    kw = {"sigma_b": 0.3, **kw}
    spec = ModelSpec(name="c", arch="cnn", depth=2, sigma_w=1.1, **kw)
    shape = (2, 5, 5) if spec.padding == "valid" else (2, 4, 4)
    x = np.random.default_rng(1).normal(size=(3, *shape))
    nngp, ntk = brute_force_gcnn(spec, x)
    out = kernel_fn(spec, shape)(x)
    _close(out["nngp"], nngp)
    _close(out["ntk"], ntk)


GCNN_CASES = [
    dict(group="C4", support="full", padding="circular"),
    dict(group="C4", support="identity", padding="zero", readout="flatten"),
    dict(group="D4", support="full", padding="zero", nonlinearity="erf"),
    dict(group="D1", support="full", padding="valid", depth=2),
    dict(group="C2", support="identity", padding="circular", depth=3, bias=False),
]


@pytest.mark.parametrize("kw", GCNN_CASES, ids=lambda kw: "-".join(f"{v}" for v in kw.values()))
def test_canonical_gcnn_matches_brute_force(kw):
    kw = {"depth": 2, **kw}
    shape = (1, 4, 4) if kw.get("padding") != "valid" else (1, 5, 5)
    spec = ModelSpec(name="g", arch="gcnn", sigma_w=0.9, sigma_b=0.2, **kw)
    x = np.random.default_rng(2).normal(size=(2, *shape))
    nngp, ntk = brute_force_gcnn(spec, x)
    out = kernel_fn(spec, shape)(x)
    _close(out["nngp"], nngp)
    _close(out["ntk"], ntk)


@pytest.mark.parametrize("kw,shape", [
    (dict(group="C4", support="full"), (1, 3, 3)),
    (dict(group="D4", support="identity", depth=3), (2, 3, 3)),
    (dict(group="C6", support="full", nonlinearity="erf"), (2, 12)),
    (dict(group="D3", support="identity"), (1, 9)),
])
def test_canonical_group_mlp_matches_brute_force(kw, shape):
    spec = ModelSpec(name="g", arch="group_mlp", sigma_b=0.3, **{"depth": 2, **kw})
    x = np.random.default_rng(3).normal(size=(3, *shape))
    nngp, ntk = brute_force_group_mlp(spec, x)
    out = kernel_fn(spec, shape)(x)
    _close(out["nngp"], nngp)
    _close(out["ntk"], ntk)
