"""Structure of the finite models: layer plan mapping, fan-ins, bases, initialisation, vmap.

Float tolerances are float32 round-off (see test_models_equivariance); Monte-Carlo checks
use z-scores against the estimated standard error, with |z| < 4 (seeds are fixed, so the
outcome is deterministic; 4 SE would be exceeded by chance with probability ~6e-5).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, stack_module_state, vmap

from study import architecture as arch
from study import escnn_types as et
from study.bases import domain_permutation, filter_basis
from study.groups import Group
from study.spec import ModelSpec
from workers.escnn_modules import GroupMeanPool, PointwiseNonlin
from workers.layers import (
    BasisConv2d,
    BasisLinear,
    FilterExpansion,
    Flatten,
    GlobalAvgPool,
    NTKConv2d,
    NTKDense,
    Pointwise,
)
from workers.models import build_model, init_parameters

ATOL = RTOL = 1e-5  # float32 round-off
Z_MAX = 4.0  # Monte-Carlo: standard errors allowed


def close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


SPECS = [
    (dict(arch="mlp", depth=2), (2, 6, 6)),
    (dict(arch="mlp", depth=3, bias=False), (3, 10)),
    (dict(arch="cnn", padding="circular", readout="gap"), (2, 6, 6)),
    (dict(arch="cnn", padding="zero", readout="flatten", kernel_size=4), (1, 6, 7)),
    (dict(arch="cnn", padding="valid", readout="flatten", depth=2), (3, 8, 8)),
    (dict(arch="gcnn", group="C4", support="full"), (2, 6, 6)),
    (dict(arch="gcnn", group="D4", support="identity", padding="valid", readout="flatten"), (1, 7, 7)),
    (dict(arch="gcnn", group="C8", basis="escnn", padding="zero"), (1, 7, 7)),
    (dict(arch="group_mlp", group="D4", depth=3), (2, 5, 5)),
    (dict(arch="group_mlp", group="D6", basis="escnn"), (1, 12)),
]

FINITE_LAYER = {
    arch.Dense: NTKDense,
    arch.Conv: NTKConv2d,
    arch.Lift: BasisConv2d,
    arch.GroupConv: BasisConv2d,
    arch.GroupLift: BasisLinear,
    arch.GroupDense: BasisLinear,
    arch.GroupPool: GroupMeanPool,
    arch.GlobalAvgPool: GlobalAvgPool,
    arch.Flatten: Flatten,
}


@pytest.mark.parametrize("kw,shape", SPECS)
def test_one_finite_layer_per_plan_entry(kw, shape):
    spec = ModelSpec(name="m", **kw)
    plan = arch.layer_plan(spec, shape, 3)
    model = build_model(spec, 5, shape, 3)
    assert len(model.layers) == len(plan)
    for entry, layer in zip(plan, model.layers):
        if isinstance(entry, arch.Nonlin):
            assert isinstance(layer, (Pointwise, PointwiseNonlin)) and layer.kind == entry.kind
        else:
            assert isinstance(layer, FINITE_LAYER[type(entry)])
    init_parameters(model, 0)
    for dtype in (torch.float32, torch.float64):
        y = model(torch.randn(4, *shape, dtype=dtype))
        assert y.shape == (4, 3) and y.dtype == torch.float32 and torch.isfinite(y).all()


def _expected_fan_ins(kw, shape, w):
    """fan_in of each weight layer, straight from docs/models.md."""
    k = kw.get("kernel_size", 3)
    depth = kw.get("depth", 2)
    G = Group.parse(kw.get("group", "C4")).order
    S = G if kw.get("support", "full") == "full" else 1
    if kw["arch"] == "mlp":
        return [math.prod(shape)] + [w] * depth
    if kw["arch"] == "group_mlp":
        return [math.prod(shape)] + [w * S] * (depth - 1) + [w]
    C, H, W = shape
    if kw.get("padding", "circular") == "valid":
        H, W = H - depth * (k - 1), W - depth * (k - 1)
    readout = w * H * W if kw.get("readout", "gap") == "flatten" else w
    if kw["arch"] == "cnn":
        return [C * k * k] + [w * k * k] * (depth - 1) + [readout]
    hidden = w * G * k * k if kw.get("basis", "canonical") == "escnn" else w * S * k * k
    return [C * k * k] + [hidden] * (depth - 1) + [readout]


@pytest.mark.parametrize("kw,shape", SPECS + [(dict(arch="gcnn", group="D4", basis="escnn", depth=3), (2, 5, 5))])
def test_ntk_scales_use_the_documented_fan_in(kw, shape):
    spec = ModelSpec(name="m", sigma_w=1.7, sigma_b=0.3, **kw)
    w = 4
    model = build_model(spec, w, shape, 2)
    layers = [m for m in model.layers if hasattr(m, "weight")]
    fans = _expected_fan_ins(kw, shape, w)
    assert len(layers) == len(fans)
    for layer, fan in zip(layers, fans):
        assert layer.w_scale == pytest.approx(1.7 / math.sqrt(fan), rel=1e-12)
        assert layer.sigma_b == 0.3
        assert (layer.bias is None) == (not spec.bias)


# ----- bases -------------------------------------------------------------------------------------
def _filter_action(group: Group, basis, r: int, f: np.ndarray, perm: np.ndarray | None = None) -> np.ndarray:
    """``(r . F)[g, b] = L_r F[r^-1 g, r^-1 b]`` on one block ``[|G|, in_size, (k, k)]``.

    A filter is equivariant iff it is fixed by every ``r`` (docs/models.md's constraints).
    """
    src = group.mul[group.inverse[r]]
    f = f[src]
    if basis.layer == "gconv" or basis.layer == "gdense":
        f = f[:, src]
    if basis.spatial:
        f = group.act_image(f, r)
    if basis.layer == "glift":
        # h(L_r v)(g) = h(v)(r^-1 g) iff F[g, i] = F[r^-1 g, perm[r][i]]
        f = f[:, perm[r]]
    return f


def _projector_trace(group: Group, basis, perm=None) -> float:
    """Dimension of the equivariant filter space: trace of the group-averaging projector."""
    E = int(np.prod(basis.tensor.shape[1:]))
    eye = np.eye(E).reshape(E, *basis.tensor.shape[1:])
    P = sum(np.stack([_filter_action(group, basis, r, e, perm) for e in eye]).reshape(E, E) for r in range(group.order))
    return float(np.trace(P) / group.order)


BASIS_CASES = [
    ("C4", "lift", "canonical", "full"),
    ("D4", "lift", "canonical", "full"),
    ("C4", "gconv", "canonical", "full"),
    ("D4", "gconv", "canonical", "full"),
    ("D4", "gconv", "canonical", "identity"),
    ("D1", "gconv", "canonical", "full"),
    ("C4", "lift", "escnn", "full"),
    ("D4", "gconv", "escnn", "full"),
    ("D4", "gdense", "canonical", "full"),
    ("D4", "gdense", "escnn", "full"),
]


@pytest.mark.parametrize("gname,layer,basis_kind,support", BASIS_CASES)
def test_basis_elements_are_equivariant_and_canonical_spans_all(gname, layer, basis_kind, support):
    group = Group.parse(gname)
    b = filter_basis(group, layer, 1, 3, basis_kind, support)
    for j in range(b.dim):
        for r in range(group.order):
            # escnn's float32 samples are projected onto equivariant filters in float64
            np.testing.assert_allclose(_filter_action(group, b, r, b.tensor[j]), b.tensor[j], atol=1e-14)
    flat = b.tensor.reshape(b.dim, -1)
    gram = flat @ flat.T
    rank = np.linalg.matrix_rank(gram)
    assert rank == b.dim  # linearly independent
    space = _projector_trace(group, b)
    if basis_kind == "canonical":
        np.testing.assert_allclose(gram, np.eye(b.dim) * group.order, atol=0)  # orthogonal, |G| entries each
        if support == "full":
            assert b.dim == pytest.approx(space)  # spans every equivariant filter
        assert b.scale == 1.0
    else:
        assert b.dim <= space + 1e-9  # escnn's basis is band-limited: a subspace
        # s makes the mean prior variance of a filter entry 1
        assert np.sum(b.tensor**2) == pytest.approx(np.prod(b.tensor.shape[1:]), rel=1e-12)


@pytest.mark.parametrize("gname,shape", [("D4", (1, 5, 5)), ("C4", (2, 4, 4)), ("D6", (1, 12))])
def test_glift_bases(gname, shape):
    group = Group.parse(gname)
    perm = domain_permutation(group, shape)
    for kind in ("canonical", "escnn"):
        b = filter_basis(group, "glift", 1, 0, kind, domain_perm=perm)
        for j in range(b.dim):
            for r in range(group.order):
                np.testing.assert_allclose(_filter_action(group, b, r, b.tensor[j], perm), b.tensor[j], atol=1e-6)
        space = _projector_trace(group, b, perm)
        if kind == "canonical":
            assert b.dim == pytest.approx(space) == perm.shape[1]
        else:
            assert b.dim <= space + 1e-9
        assert b.fan_in(1) == perm.shape[1]


@pytest.mark.parametrize("gname,shape", [("D4", (2, 5, 5)), ("C4", (1, 4, 4)), ("D6", (1, 12)), ("C3", (2, 9))])
def test_permutation_type_is_our_action(gname, shape):
    """The escnn representation assembled orbit by orbit has exactly our permutation matrices."""
    group = Group.parse(gname)
    perm = domain_permutation(group, shape)
    rep = et.permutation_type(group, perm).representations[0]
    d = perm.shape[1]
    for g in range(group.order):
        P = np.zeros((d, d))
        P[np.arange(d), perm[g]] = 1.0
        np.testing.assert_allclose(rep(et.escnn_element(group, g)), P, atol=1e-12)  # float64 change of basis


@pytest.mark.parametrize("gname,shape", [("D4", (1, 5, 5)), ("D6", (1, 12))])
def test_escnn_glift_basis_equals_escnns_basis_for_the_whole_permutation_representation(gname, shape):
    """Read per orbit, the basis is escnn's basis of the single permutation representation:
    every element appears there, and the prior covariance ``sum_j B_j (x) B_j`` is the same."""
    group = Group.parse(gname)
    perm = domain_permutation(group, shape)
    b = filter_basis(group, "glift", 1, 0, "escnn", domain_perm=perm)
    lin = et.enn.Linear(et.permutation_type(group, perm), et.regular_type(group, 1, "none"), bias=False, initialize=False)
    D = lin.basisexpansion.dimension()
    with torch.no_grad():
        whole = torch.stack([lin.basisexpansion(e) for e in torch.eye(D)]).double().numpy().reshape(D, group.order, -1)
    ours = b.tensor / b.scale
    assert D == b.dim
    cov_ours = np.einsum("jab,jcd->abcd", ours, ours)
    cov_whole = np.einsum("jab,jcd->abcd", whole, whole)
    np.testing.assert_allclose(cov_ours, cov_whole, atol=1e-6)  # float32 samples
    overlap = np.abs(np.einsum("jab,kab->jk", ours, whole))
    np.testing.assert_allclose(overlap.max(axis=1), np.einsum("jab,jab->j", ours, ours), rtol=1e-6)


@pytest.mark.parametrize(
    "gname,layer,basis_kind,support,shape",
    [
        ("D4", "gconv", "canonical", "full", None),
        ("C4", "gconv", "canonical", "identity", None),
        ("D4", "lift", "escnn", "full", None),
        ("C8", "gconv", "escnn", "full", None),
        ("D4", "glift", "escnn", "full", (2, 6, 6)),
        ("D4", "glift", "canonical", "full", (1, 5, 5)),
        ("D6", "gdense", "escnn", "full", None),
    ],
)
def test_filter_expansion_equals_basis_einsum(gname, layer, basis_kind, support, shape):
    """The layers' gather / blocked einsum expansion equals ``sum_j theta_j tensor[j]``."""
    group = Group.parse(gname)
    perm = domain_permutation(group, shape) if shape else None
    b = filter_basis(group, layer, 2, 3, basis_kind, support, domain_perm=perm)
    c_in = 1 if layer == "glift" else 2
    theta = torch.randn(3, c_in, b.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    expansion = FilterExpansion(b).double()
    ours = expansion(theta).reshape(b.filter(theta.numpy()).shape)
    np.testing.assert_allclose(ours.numpy(), b.filter(theta.numpy()), atol=1e-12)  # float64, exact up to sums
    assert expansion.gather == (basis_kind == "canonical")


def test_basis_errors_and_cache():
    c4, c8 = Group.parse("C4"), Group.parse("C8")
    with pytest.raises(ValueError, match="canonical"):
        filter_basis(c8, "gconv", 1, 3, "canonical")
    with pytest.raises(ValueError, match="support"):
        filter_basis(c4, "gconv", 1, 3, "escnn", "identity")
    with pytest.raises(ValueError, match="domain_perm"):
        filter_basis(c4, "glift", 1, 0, "canonical")
    bad = domain_permutation(c4, (1, 4, 4))[[0, 2, 1, 3]]  # rows swapped: not an action
    with pytest.raises(ValueError, match="not an action"):
        filter_basis(c4, "glift", 1, 0, "canonical", domain_perm=bad)
    a = filter_basis(c4, "gconv", 3, 3, "escnn")
    assert filter_basis(c4, "gconv", 7, 3, "escnn") is a  # cached, per single input field
    assert not a.tensor.flags.writeable and a.tensor.dtype == np.float64


# ----- initialisation and dtypes -----------------------------------------------------------------
def test_init_parameters_is_seeded_standard_normal():
    spec = ModelSpec(name="g", arch="gcnn", group="D4", sigma_b=0.2)
    m1 = init_parameters(build_model(spec, 16, (2, 6, 6), 3), 123)
    m2 = init_parameters(build_model(spec, 16, (2, 6, 6), 3), 123)
    m3 = init_parameters(build_model(spec, 16, (2, 6, 6), 3), 124)
    m64 = init_parameters(build_model(spec, 16, (2, 6, 6), 3).double(), 123)
    p1 = torch.cat([p.detach().reshape(-1) for p in m1.parameters()])
    assert torch.equal(p1, torch.cat([p.reshape(-1) for p in m2.parameters()]))
    assert not torch.equal(p1, torch.cat([p.reshape(-1) for p in m3.parameters()]))
    p64 = torch.cat([p.detach().reshape(-1) for p in m64.parameters()])
    assert torch.equal(p64.float(), p1)  # the same draws, rounded
    n = p1.numel()
    assert abs(float(p1.mean())) < Z_MAX / math.sqrt(n)  # N(0, 1): SE of the mean 1/sqrt(n)
    assert abs(float(p1.var()) - 1) < Z_MAX * math.sqrt(2 / n)  # SE of the variance sqrt(2/n)
    x = torch.randn(3, 2, 6, 6, dtype=torch.float64)
    close(m64(x).float(), m1(x.float()))  # float64 and float32 models agree to float32 round-off


# ----- vmap over an ensemble ----------------------------------------------------------------------
VMAP_CASES = [
    (dict(arch="mlp"), (2, 5, 5)),
    (dict(arch="cnn", padding="zero"), (2, 6, 6)),
    (dict(arch="gcnn", group="D4", support="identity"), (1, 6, 6)),
    (dict(arch="gcnn", group="C8", basis="escnn", padding="valid"), (1, 7, 7)),
    (dict(arch="group_mlp", group="D4", basis="escnn"), (1, 6, 6)),
    (dict(arch="group_mlp", group="C3"), (2, 12)),
]


@pytest.mark.parametrize("kw,shape", VMAP_CASES)
def test_vmap_functional_call_matches_member_loop(kw, shape):
    """A whole ensemble in one computation: outputs and gradients equal a loop over members,
    with shared inputs and with per-member inputs (augmentation)."""
    spec = ModelSpec(name="m", depth=3, sigma_b=0.2, **kw)
    members = [init_parameters(build_model(spec, 4, shape, 2), s) for s in range(3)]
    params, buffers = stack_module_state(members)
    base = copy.deepcopy(members[0]).to("meta")

    def f(p, b, x):
        return functional_call(base, (p, b), (x,))

    def loss(p, b, x):
        return (f(p, b, x) ** 2).sum()

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, *shape, generator=gen)
    xs = torch.randn(3, 5, *shape, generator=gen)
    close(vmap(f, in_dims=(0, 0, None))(params, buffers, x), torch.stack([m(x) for m in members]))
    close(vmap(f, in_dims=(0, 0, 0))(params, buffers, xs), torch.stack([m(xi) for m, xi in zip(members, xs)]))
    grads = vmap(grad(loss), in_dims=(0, 0, None))(params, buffers, x)
    for i, m in enumerate(members):
        m.zero_grad()
        (m(x) ** 2).sum().backward()
        for name, p in m.named_parameters():
            close(grads[name][i], p.grad)


# ----- NTK parameterisation: output variance at init ------------------------------------------------
def _second_moment(model, x, seeds):
    """Mean and standard error of ``f(x)^2`` over members initialised with ``seeds``
    (evaluated as one vmapped ensemble)."""
    draws = []
    for s in seeds:
        init_parameters(model, s)
        draws.append({k: v.detach().clone() for k, v in model.named_parameters()})
    params = {k: torch.stack([d[k] for d in draws]) for k in draws[0]}
    buffers = dict(model.named_buffers())
    with torch.no_grad():
        ys = vmap(lambda p: functional_call(model, (p, buffers), (x,)))(params)[:, 0, 0].double()
    m = ys.pow(2)
    return float(m.mean()), float(m.std() / math.sqrt(len(seeds)))


def test_relu_mlp_output_variance_is_the_width_independent_nngp_value():
    """For a ReLU MLP, ``E f(x)^2`` equals the NNGP recursion at every width (exact: each
    layer's pre-activation is conditionally centred Gaussian, so ``E relu(h)^2 = E h^2 / 2``)."""
    sw, sb, depth = 1.4, 0.5, 3
    x = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    K = sw**2 * float(x.pow(2).mean()) + sb**2
    for _ in range(depth):
        K = sw**2 * K / 2 + sb**2
    spec = ModelSpec(name="m", arch="mlp", depth=depth, sigma_w=sw, sigma_b=sb)
    for width in (4, 32, 128):
        mean, se = _second_moment(build_model(spec, width, (2, 4, 4), 1), x, range(300))
        print(f"relu MLP width {width}: E f^2 = {mean:.3f} +- {se:.3f} (NNGP {K:.3f})")
        assert abs(mean - K) < Z_MAX * se


LINEAR_CASES = [
    (dict(arch="cnn"), (2, 5, 5)),
    (dict(arch="gcnn", group="C4", support="full"), (2, 5, 5)),
    (dict(arch="gcnn", group="D4", support="identity"), (1, 5, 5)),
    (dict(arch="group_mlp", group="C4", support="full"), (1, 4, 4)),
    (dict(arch="group_mlp", group="D6", support="identity"), (2, 12)),
]


@pytest.mark.parametrize("kw,shape", LINEAR_CASES)
def test_linear_network_output_variance_is_width_independent(kw, shape):
    """Linear canonical networks (circular padding, gap): every second moment is exact at
    any width, and ``E f^2 = T^(depth+1)(M0)`` with ``T(m) = sigma_w^2 m + sigma_b^2``, where
    ``M0`` is the pooled input kernel: ``(1/C) sum_c mean_p(x_c)^2`` for (G)CNNs, ``|mean_g L_g v|^2 / d``
    for group MLPs (each layer preserves the pooled mean of the kernel; docs/models.md)."""
    sw, sb = 1.3, 0.4
    spec = ModelSpec(name="m", depth=2, nonlinearity="identity", sigma_w=sw, sigma_b=sb, **kw)
    x = torch.randn(1, *shape, generator=torch.Generator().manual_seed(1)).double() + 0.5
    if kw["arch"] == "group_mlp":
        g = spec.group_obj
        perm = torch.as_tensor(domain_permutation(g, shape))
        v = x.reshape(-1)
        M = float(torch.stack([v[p] for p in perm]).mean(0).pow(2).sum() / v.numel())
    else:
        M = float(x[0].mean(dim=(-2, -1)).pow(2).mean())
    for _ in range(spec.depth + 1):
        M = sw**2 * M + sb**2
    for width in (4, 32):
        mean, se = _second_moment(build_model(spec, width, shape, 1), x.float(), range(300))
        print(f"{kw} width {width}: E f^2 = {mean:.3f} +- {se:.3f} (exact {M:.3f})")
        assert abs(mean - M) < Z_MAX * se


def test_escnn_gcnn_output_variance_is_order_one_at_every_width():
    """escnn-basis GCNN: ``E f^2`` is O(1) and the same at widths 4 and 32 (exact for a linear network)."""
    spec = ModelSpec(name="m", arch="gcnn", group="C4", basis="escnn", nonlinearity="identity", sigma_b=0.3)
    x = torch.randn(1, 1, 5, 5, generator=torch.Generator().manual_seed(2)) + 0.5
    (m4, se4), (m48, se48) = (_second_moment(build_model(spec, w, (1, 5, 5), 1), x, range(300)) for w in (4, 32))
    print(f"escnn C4 GCNN: E f^2 = {m4:.3f} +- {se4:.3f} (width 4), {m48:.3f} +- {se48:.3f} (width 32)")
    assert 0.05 < m48 < 20  # O(1)
    assert abs(m4 - m48) < Z_MAX * math.hypot(se4, se48)
