"""Identities the analytic kernels must satisfy (docs/theory.md §3, §4 and §6), and engine consistency.

Tolerances: 1e-12 / 1e-10 relative are float64 round-off of two different evaluation orders
(with margin). escnn samples its basis in float32; study.bases projects it onto exactly
equivariant filters in float64 for groups that permute the grid, so escnn models and their
kernels are invariant to float64 round-off as well.
"""

import numpy as np
import pytest
import torch

from analysis.kernels import kernel_fn, mean_kernel_fn, orbit_averaged
from analysis.stax import right_invariant
from study.groups import Group
from study.spec import ModelSpec
from study.bases import filter_basis


def _rel(a, b):
    return np.abs(np.asarray(a) - np.asarray(b)).max() / np.abs(np.asarray(b)).max()


def _inputs(shape, n=3, seed=0):
    return np.random.default_rng(seed).normal(size=(n, *shape))


def _act(group, x, g):
    return group.act_image(x, g) if x.ndim == 4 else group.act_ring(x, g)


INVARIANT = [
    ("mlp", dict(group="D4"), (2, 4, 4), 1e-12, False),
    ("mlp", dict(group="D3", nonlinearity="erf"), (2, 6), 1e-12, False),
    ("cnn", dict(group="D4", padding="circular", readout="gap"), (1, 5, 5), 1e-12, False),
    ("cnn", dict(group="C4", padding="zero", readout="flatten"), (2, 4, 4), 1e-12, False),
    ("gcnn", dict(group="C4", support="full"), (1, 5, 5), 1e-12, True),
    ("gcnn", dict(group="D4", support="identity", padding="zero"), (1, 4, 4), 1e-12, True),
    ("gcnn", dict(group="C4", basis="escnn"), (1, 5, 5), 1e-12, True),
    ("gcnn", dict(group="D4", basis="escnn", padding="zero"), (1, 4, 4), 1e-12, True),
    ("group_mlp", dict(group="D4"), (1, 3, 3), 1e-12, True),
    ("group_mlp", dict(group="C5", support="identity"), (2, 10), 1e-12, True),
    ("group_mlp", dict(group="D2", basis="escnn"), (1, 8), 1e-12, True),
    ("group_mlp", dict(group="C4", basis="escnn"), (1, 3, 3), 1e-12, True),
]


@pytest.mark.parametrize("arch,kw,shape,tol,each", INVARIANT, ids=lambda v: str(v))
def test_kernels_invariant_under_the_group(arch, kw, shape, tol, each):
    spec = ModelSpec(name="m", arch=arch, sigma_b=0.2, **kw)
    group = spec.group_obj
    x = _inputs(shape)
    kf = kernel_fn(spec, shape)
    base = kf(x)
    for g in range(1, group.order):
        xg = _act(group, x, g)
        both = kf(xg)
        for name in ("nngp", "ntk"):
            assert _rel(both[name], base[name]) < tol
        if each:  # an invariant network: the kernel is invariant in each argument
            one = kf(xg, x)
            for name in ("nngp", "ntk"):
                assert _rel(one[name], base[name]) < tol


SYMMETRISED = [
    ("gcnn", "cnn", dict(group="C4", padding="circular", readout="gap"), (1, 5, 5)),
    ("gcnn", "cnn", dict(group="D4", padding="zero", readout="gap", nonlinearity="erf"), (2, 4, 4)),
    ("gcnn", "cnn", dict(group="D1", padding="circular", readout="gap", depth=3), (1, 4, 4)),
    ("group_mlp", "mlp", dict(group="D4"), (1, 4, 4)),
    ("group_mlp", "mlp", dict(group="C6", depth=3), (2, 12)),
]


@pytest.mark.parametrize("eq,plain,kw,shape", SYMMETRISED, ids=lambda v: str(v))
def test_identity_support_is_the_orbit_averaged_network(eq, plain, kw, shape):
    """docs/theory.md §3.3: the identity-support GCNN (group MLP) kernel is the CNN (MLP) kernel
    averaged over the orbit of one argument. (Only with a rotation-invariant readout: with a
    flatten readout the GCNN's pooled features meet rotated readout weights, so it is not
    the symmetrised CNN with the same weights.)"""
    x = _inputs(shape, n=4, seed=1)
    common = dict(sigma_w=1.2, sigma_b=0.3, **kw)
    spec_eq = ModelSpec(name="e", arch=eq, support="identity", **common)
    spec_plain = ModelSpec(name="p", arch=plain, augmentation="full_orbit", **common)
    averaged = orbit_averaged(kernel_fn(spec_plain, shape), spec_plain.group_obj)
    want, got = averaged(x), kernel_fn(spec_eq, shape)(x)
    for name in ("nngp", "ntk"):
        assert _rel(got[name], want[name]) < 1e-10
    # and the analytic mean of augmented training uses exactly this kernel
    mean = mean_kernel_fn(spec_plain, shape)(x)
    for name in ("nngp", "ntk"):
        assert _rel(mean[name], want[name]) < 1e-14
    d = averaged(x, diag=True)
    assert _rel(d["ntk"], np.diag(want["ntk"])) < 1e-12


@pytest.mark.parametrize("arch,kw,shape", [
    ("gcnn", dict(group="C4", padding="circular"), (1, 5, 5)),
    ("gcnn", dict(group="D4", padding="zero", readout="flatten"), (2, 4, 4)),
    ("gcnn", dict(group="C2", padding="valid", depth=3), (1, 7, 7)),
    ("group_mlp", dict(group="D4", depth=3), (1, 3, 3)),
    ("group_mlp", dict(group="D5"), (1, 10)),
])
def test_full_support_equals_identity_support_for_canonical_filters(arch, kw, shape):
    """Right invariance (docs/theory.md §3.2): the support changes nothing at infinite width."""
    x = _inputs(shape, seed=2)
    full = kernel_fn(ModelSpec(name="f", arch=arch, support="full", sigma_b=0.1, **kw), shape)(x)
    ident = kernel_fn(ModelSpec(name="i", arch=arch, support="identity", sigma_b=0.1, **kw), shape)(x)
    for name in ("nngp", "ntk"):
        assert _rel(full[name], ident[name]) < 1e-10


@pytest.mark.parametrize("route", ["basis", "basis_full"])
@pytest.mark.parametrize("arch,kw,shape", [
    ("gcnn", dict(group="C4", support="full", padding="circular"), (1, 5, 5)),
    ("gcnn", dict(group="D4", support="identity", padding="zero", readout="flatten"), (1, 4, 4)),
    ("gcnn", dict(group="C2", support="full", padding="valid", nonlinearity="erf"), (2, 5, 5)),
    ("group_mlp", dict(group="C4", support="full"), (2, 3, 3)),
    ("group_mlp", dict(group="D3", support="identity"), (1, 6)),
])
def test_covariance_route_with_canonical_basis_equals_fast_route(route, arch, kw, shape):
    """docs/theory.md §4 evaluated with the canonical basis tensors gives §3's kernel (§4.2)."""
    spec = ModelSpec(name="m", arch=arch, sigma_b=0.25, **kw)
    x = _inputs(shape, seed=3)
    fast = kernel_fn(spec, shape)(x)
    slow = kernel_fn(spec, shape, route=route)(x)
    for name in ("nngp", "ntk"):
        assert _rel(slow[name], fast[name]) < 1e-10


def test_escnn_basis_is_a_different_model():
    shape = (1, 5, 5)
    x = _inputs(shape, seed=4)
    canon = kernel_fn(ModelSpec(name="c", arch="gcnn", group="C4"), shape)(x)
    esc = kernel_fn(ModelSpec(name="e", arch="gcnn", group="C4", basis="escnn"), shape)(x)
    assert _rel(esc["ntk"], canon["ntk"]) > 1e-2
    # escnn's covariance is right invariant on C4 (so the fast storage applies) ...
    c4 = Group.parse("C4")
    assert right_invariant(filter_basis(c4, "lift", 1, 3, "escnn"), c4)
    assert right_invariant(filter_basis(c4, "gconv", 1, 3, "escnn"), c4)
    # ... and the right-invariant and full evaluations agree
    full = kernel_fn(ModelSpec(name="e", arch="gcnn", group="C4", basis="escnn"), shape, route="basis_full")(x)
    assert _rel(full["ntk"], esc["ntk"]) < 1e-10


@pytest.mark.parametrize("arch,kw,shape", [
    ("mlp", dict(), (2, 3, 3)),
    ("cnn", dict(padding="zero", readout="flatten"), (1, 5, 5)),
    ("gcnn", dict(group="C4"), (1, 4, 4)),
    ("gcnn", dict(group="C8", basis="escnn"), (1, 4, 4)),
    ("group_mlp", dict(group="C3"), (1, 6)),
])
def test_blocks_diag_and_input_types_agree(arch, kw, shape):
    spec = ModelSpec(name="m", arch=arch, sigma_b=0.1, **kw)
    kf = kernel_fn(spec, shape)
    x = _inputs(shape, n=5, seed=5)
    full = kf(x)
    for name in ("nngp", "ntk"):
        assert np.array_equal(full[name], full[name].T)
    small = kf(torch.from_numpy(x), block_size=2)
    cross = kf(x[:2], x[2:], block_size=1)
    only = kf(x, get="ntk")
    diag = kf(x, diag=True)
    pairs = kf(x[:3], x[2:], diag=True)
    for name in ("nngp", "ntk"):
        assert _rel(small[name], full[name]) < 1e-13
        assert _rel(cross[name], full[name][:2, 2:]) < 1e-13
        assert _rel(diag[name], np.diag(full[name])) < 1e-13
        assert _rel(pairs[name], np.diag(full[name][:3, 2:])) < 1e-13
    assert set(only) == {"ntk"} and _rel(only["ntk"], full["ntk"]) < 1e-13


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
def test_duplicate_inputs_get_identical_kernels(arch):
    # The same input computed through different summation orders (matrix blocks, the
    # diagonal pass) differs by a few ulps in cos, which acos' infinite slope at 1 turns into
    # ~1e-9 in the relu derivative kernel unless cos is snapped (analysis.kernel_nonlin._SNAP;
    # with _SNAP = 0 these cases differ by 6e-9 and 8e-11).
    shape = (3, 8, 8)
    spec = ModelSpec(name="c", arch=arch, readout="flatten", depth=3)
    x = _inputs(shape, n=6, seed=0)
    x = np.concatenate([x, x[:3]])
    kf = kernel_fn(spec, shape)
    K = kf(x, block_size=4)["ntk"]
    assert _rel(K[6:], K[:3]) < 1e-14
    assert _rel(np.diag(K), kf(x, diag=True)["ntk"]) < 1e-14


def test_mean_kernel_is_the_models_own_without_augmentation():
    shape = (1, 4, 4)
    x = _inputs(shape, seed=7)
    spec = ModelSpec(name="m", arch="cnn", group="C4")
    assert np.array_equal(mean_kernel_fn(spec, shape)(x)["ntk"], kernel_fn(spec, shape)(x)["ntk"])
    aug = spec.model_copy(update={"augmentation": "full_orbit"})
    # kernel_fn never averages: an augmented model's own kernel is the plain CNN's
    assert np.array_equal(kernel_fn(aug, shape)(x)["ntk"], kernel_fn(spec, shape)(x)["ntk"])
    assert _rel(mean_kernel_fn(aug, shape)(x)["ntk"], kernel_fn(spec, shape)(x)["ntk"]) > 1e-3
