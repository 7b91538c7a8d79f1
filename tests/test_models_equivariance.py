"""Equivariance of the finite equivariant layers and models, and the identities they obey.

Tolerances: every check runs in float32. A layer output is a sum of ``fan_in`` (at most a
few hundred here) products of O(1) numbers, so rounding differs between two equal
computations by about ``sqrt(fan_in) * 6e-8 * |terms|``; through a few layers and for
the values below that is < 1e-5 absolute. ``ATOL = 1e-5`` (with ``RTOL = 1e-5``) is
therefore "equal up to float32 round-off"; a real error (a wrong permutation, a wrong
scale) is O(1).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from study import escnn_types as et
from study.architecture import Affine
from study.bases import domain_permutation, filter_basis
from study.groups import Group
from study.spec import ModelSpec
from workers.escnn_modules import GroupMeanPool, PointwiseNonlin
from workers.layers import BasisConv2d, BasisLinear
from workers.models import build_model, init_parameters

ATOL = RTOL = 1e-5  # float32 round-off, see the module docstring

AFF = Affine(sigma_w=1.3, sigma_b=0.4, bias=True)


def close(a, b, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(a, b, atol=atol, rtol=rtol)


# ----- group actions on features (study.groups conventions) -------------------------------
def act_group_grid(group: Group, f: torch.Tensor, r: int) -> torch.Tensor:
    """``[L_r f](g, p) = f(r^-1 g, R_r^-1 p)`` for ``[B, c |G|, H, W]`` regular fields."""
    B, CG, H, W = f.shape
    G = group.order
    src = torch.as_tensor(group.mul[group.inverse[r]])  # new[g] = old[r^-1 g]
    f = f.reshape(B, CG // G, G, H, W)[:, :, src]
    return group.act_image(f, r).reshape(B, CG, H, W)


def act_group_vec(group: Group, f: torch.Tensor, r: int) -> torch.Tensor:
    """Regular fields without base space, ``[B, c |G|]``."""
    B, CG = f.shape
    G = group.order
    src = torch.as_tensor(group.mul[group.inverse[r]])
    return f.reshape(B, CG // G, G)[:, :, src].reshape(B, CG)


def act_input(group: Group, x: torch.Tensor, r: int) -> torch.Tensor:
    return group.act_image(x, r) if x.dim() == 4 else group.act_ring(x, r)


@pytest.mark.parametrize("gname", ["C4", "D4"])
def test_feature_action_is_escnns_transform(gname):
    """Our action on regular fields equals escnn's ``GeometricTensor.transform``."""
    group = Group.parse(gname)
    ftype = et.regular_type(group, 2)
    f = torch.randn(2, ftype.size, 5, 5, generator=torch.Generator().manual_seed(0))
    for r in range(group.order):
        ours = act_group_grid(group, f, r)
        theirs = et.enn.GeometricTensor(f, ftype).transform(et.escnn_element(group, r)).tensor
        close(ours, theirs, atol=1e-6, rtol=0)  # a permutation; escnn rotates exactly for n | 4


# ----- layers ----------------------------------------------------------------------------------
def _conv_layer(group, lifting, c_in, c_out, k, padding, basis, support):
    b = filter_basis(group, "lift" if lifting else "gconv", c_in, k, basis, support)
    in_type = (et.trivial_type if lifting else et.regular_type)(group, c_in)
    layer = BasisConv2d(in_type, et.regular_type(group, c_out), b, padding, AFF)
    return init_parameters(layer, 7)


GRID_CASES = [
    (g, lifting, padding, basis, support)
    for g in ("C4", "D4")
    for lifting in (True, False)
    for padding in ("circular", "zero", "valid")
    for basis, support in (("canonical", "full"), ("canonical", "identity"), ("escnn", "full"))
    if not (lifting and support == "identity")
]


@pytest.mark.parametrize("gname,lifting,padding,basis,support", GRID_CASES)
def test_grid_layer_equivariance(gname, lifting, padding, basis, support):
    group = Group.parse(gname)
    layer = _conv_layer(group, lifting, 2, 3, 3, padding, basis, support)
    x = torch.randn(2, layer.in_type.size, 7, 7, generator=torch.Generator().manual_seed(1))
    y = layer(et.enn.GeometricTensor(x, layer.in_type)).tensor
    for r in range(group.order):
        xr = group.act_image(x, r) if lifting else act_group_grid(group, x, r)
        yr = layer(et.enn.GeometricTensor(xr, layer.in_type)).tensor
        close(yr, act_group_grid(group, y, r))


@pytest.mark.parametrize(
    "gname,shape,layer_kind,basis,support",
    [
        (g, shape, kind, basis, support)
        for g, shape in (("C4", (2, 5, 5)), ("D4", (1, 6, 6)), ("C3", (2, 12)), ("D6", (1, 12)))
        for kind in ("glift", "gdense")
        for basis, support in (("canonical", "full"), ("canonical", "identity"), ("escnn", "full"))
        if not (kind == "glift" and support == "identity")
    ],
)
def test_no_base_space_layer_equivariance(gname, shape, layer_kind, basis, support):
    group = Group.parse(gname)
    perm = domain_permutation(group, shape)
    if layer_kind == "glift":
        b = filter_basis(group, "glift", 1, 0, basis, domain_perm=perm)
        in_type = et.permutation_type(group, perm)
    else:
        b = filter_basis(group, "gdense", 3, 0, basis, support)
        in_type = et.regular_type(group, 3, "none")
    layer = init_parameters(BasisLinear(in_type, et.regular_type(group, 4, "none"), b, AFF), 3)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(3, *shape, generator=gen).reshape(3, -1) if layer_kind == "glift" else torch.randn(3, in_type.size, generator=gen)
    y = layer(et.enn.GeometricTensor(x, in_type)).tensor
    for r in range(group.order):
        if layer_kind == "glift":
            xr = act_input(group, x.reshape(3, *shape), r).reshape(3, -1)
        else:
            xr = act_group_vec(group, x, r)
        close(layer(et.enn.GeometricTensor(xr, in_type)).tensor, act_group_vec(group, y, r))


@pytest.mark.parametrize("gname", ["D4"])  # D4 contains every C4 element
def test_escnn_check_equivariance_of_our_modules(gname):
    """escnn's own ``check_equivariance`` (20 random elements, escnn's transform) passes."""
    group = Group.parse(gname)
    np.random.seed(0)  # escnn samples group elements with numpy's global generator
    torch.manual_seed(0)  # and its test input with torch's
    modules = [
        _conv_layer(group, True, 2, 2, 3, "circular", "canonical", "full"),
        _conv_layer(group, False, 2, 2, 3, "zero", "canonical", "identity"),
        _conv_layer(group, False, 2, 2, 3, "valid", "escnn", "full"),
        PointwiseNonlin(et.regular_type(group, 2), "erf"),
        GroupMeanPool(et.regular_type(group, 2)),
        GroupMeanPool(et.regular_type(group, 2, "none")),
        init_parameters(
            BasisLinear(
                et.permutation_type(group, domain_permutation(group, (1, 5, 5))),
                et.regular_type(group, 2, "none"),
                filter_basis(group, "glift", 1, 0, "escnn", domain_perm=domain_permutation(group, (1, 5, 5))),
                AFF,
            ),
            0,
        ),
        init_parameters(
            BasisLinear(
                et.regular_type(group, 2, "none"),
                et.regular_type(group, 2, "none"),
                filter_basis(group, "gdense", 2, 0, "canonical", "full"),
                AFF,
            ),
            0,
        ),
    ]
    for m in modules:
        errors = m.check_equivariance(atol=ATOL, rtol=RTOL)  # asserts internally
        assert max(e for _, e in errors) < ATOL


# ----- whole models --------------------------------------------------------------------------
MODEL_CASES = [
    (dict(arch="gcnn", group=g, padding=p, basis=b, support=s, readout="gap"), (2, 7, 7))
    for g in ("C4", "D4")
    for p in ("circular", "zero", "valid")
    for b, s in (("canonical", "full"), ("canonical", "identity"), ("escnn", "full"))
] + [
    (dict(arch="group_mlp", group=g, basis=b, support=s), shape)
    for g, shape in (("C4", (1, 6, 6)), ("D4", (2, 5, 5)), ("C3", (2, 12)), ("D6", (1, 12)))
    for b, s in (("canonical", "full"), ("canonical", "identity"), ("escnn", "full"))
]


@pytest.mark.parametrize("kw,shape", MODEL_CASES)
def test_model_invariance(kw, shape):
    """Pooled equivariant models are invariant: ``f(L_g x) = f(x)`` for every element."""
    spec = ModelSpec(name="m", depth=3, nonlinearity="relu", sigma_b=0.3, **kw)
    group = spec.group_obj
    model = init_parameters(build_model(spec, 4, shape, 2), 11)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(5))
    y = model(x)
    assert y.abs().max() > 1e-2  # a non-trivial output, so invariance is not vacuous
    for r in range(group.order):
        close(model(act_input(group, x, r)), y)


@pytest.mark.parametrize("readout", ["gap", "flatten"])
def test_gcnn_features_before_readout_are_equivariant(readout):
    """With a ``flatten`` readout the output is not invariant, but the pooled map is (L_g acts on it)."""
    spec = ModelSpec(name="m", arch="gcnn", group="D4", depth=2, readout=readout, nonlinearity="erf")
    group = spec.group_obj
    model = init_parameters(build_model(spec, 3, (1, 6, 6), 2), 0)
    upto = model.kinds.index("grid", 1) + 1  # through group pooling
    x = torch.randn(2, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    h = model.features(x, upto)
    for r in range(group.order):
        close(model.features(group.act_image(x, r), upto), group.act_image(h, r))


def test_escnn_basis_c8_on_images_reports_its_error(capsys):
    """C8 does not permute pixels: escnn's sampled basis is only approximately equivariant.

    For the 90-degree rotations (elements 2, 4, 6 of C8) the sampled grid maps onto itself, so
    equivariance holds to float32 round-off; for 45-degree rotations escnn must interpolate
    the image, and the error is measured and printed, not hidden.
    """
    spec = ModelSpec(name="m", arch="gcnn", group="C8", basis="escnn", depth=2, padding="zero")
    group = spec.group_obj
    model = init_parameters(build_model(spec, 4, (1, 15, 15), 1), 0)
    upto = model.kinds.index("grid", 1) + 1
    # a smooth, centred input, so interpolating a 45-degree rotation is meaningful
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 15), torch.linspace(-1, 1, 15), indexing="ij")
    x = (torch.exp(-4 * ((xx - 0.2) ** 2 + 2 * (yy + 0.1) ** 2)) * (1 + xx)).reshape(1, 1, 15, 15)
    in_type = et.trivial_type(group, 1)
    out_type = et.trivial_type(group, model.layers[upto - 1].out_type.size)
    disk = (xx**2 + yy**2 < 0.5).to(x.dtype)  # away from the corners a 45-degree turn cuts off
    errors, central = {}, {}
    with torch.no_grad():
        h = model.features(x, upto)
        for r in range(1, group.order):
            el = et.escnn_element(group, r)
            xr = et.enn.GeometricTensor(x, in_type).transform(el).tensor
            diff = model.features(xr, upto) - et.enn.GeometricTensor(h, out_type).transform(el).tensor
            errors[r] = float(diff.norm() / h.norm())
            central[r] = float((diff * disk).norm() / (h * disk).norm())
    print("C8 escnn GCNN relative equivariance error by element:", {k: f"{v:.2e}" for k, v in errors.items()})
    print("  same, inside the central disk r^2 < 0.5:", {k: f"{v:.2e}" for k, v in central.items()})
    assert all(np.isfinite(v) for v in [*errors.values(), *central.values()])
    for r in (2, 4, 6):
        assert errors[r] < 1e-5  # exact rotation of the grid: float32 round-off
    assert max(errors[r] for r in (1, 3, 5, 7)) > 1e-5  # interpolation error is real, and reported


# ----- identity support is the group average --------------------------------------------------
def _weight_layers(model):
    return [m for m in model.layers if hasattr(m, "weight")]


def _copy_weights(src, dst):
    """Plain network -> identity-support equivariant network: the same numbers, reshaped."""
    with torch.no_grad():
        for a, b in zip(_weight_layers(src), _weight_layers(dst), strict=True):
            b.weight.copy_(a.weight.reshape(b.weight.shape))
            if a.bias is not None:
                b.bias.copy_(a.bias)


@pytest.mark.parametrize(
    "gname,padding,nonlin", [("C4", "circular", "relu"), ("D4", "zero", "erf"), ("D4", "valid", "relu"), ("D1", "circular", "relu")]
)
def test_identity_support_gcnn_is_group_averaged_cnn(gname, padding, nonlin):
    """``f_G(x) = (1/|G|) sum_g f(L_g^-1 x)``.

    Weight map: lifting filter ``W[o, c]`` = CNN first-layer filter (``theta[o, c, j]`` is tap
    ``j`` in row-major order); identity-support group-conv ``W[o, c, e]`` = CNN layer filter;
    biases and the dense readout are the same numbers.
    """
    common = dict(depth=3, padding=padding, nonlinearity=nonlin, sigma_w=1.2, sigma_b=0.5, group=gname, readout="gap")
    cnn = init_parameters(build_model(ModelSpec(name="c", arch="cnn", **common), 5, (2, 7, 7), 3), 4)
    gcnn = build_model(ModelSpec(name="g", arch="gcnn", support="identity", **common), 5, (2, 7, 7), 3)
    _copy_weights(cnn, gcnn)
    group = Group.parse(gname)
    x = torch.randn(4, 2, 7, 7, generator=torch.Generator().manual_seed(9))
    avg = torch.stack([cnn(group.act_image(x, group.inverse[g])) for g in range(group.order)]).mean(0)
    close(gcnn(x), avg)
    assert (cnn(x) - avg).abs().max() > 1e-3  # the CNN itself is not invariant


@pytest.mark.parametrize("gname,shape", [("C4", (1, 5, 5)), ("D4", (2, 4, 4)), ("C3", (2, 12)), ("D6", (1, 12))])
def test_identity_support_group_mlp_is_group_averaged_mlp(gname, shape):
    """The same for the group MLP: lift weights = first MLP layer, group-dense ``W[o, c, e]`` = MLP layer."""
    common = dict(depth=3, nonlinearity="relu", sigma_w=1.1, sigma_b=0.2, group=gname)
    mlp = init_parameters(build_model(ModelSpec(name="m", arch="mlp", **common), 6, shape, 2), 1)
    gmlp = build_model(ModelSpec(name="g", arch="group_mlp", support="identity", **common), 6, shape, 2)
    _copy_weights(mlp, gmlp)
    group = Group.parse(gname)
    x = torch.randn(3, *shape, generator=torch.Generator().manual_seed(2))
    avg = torch.stack([mlp(act_input(group, x, group.inverse[g])) for g in range(group.order)]).mean(0)
    close(gmlp(x), avg)
    assert (mlp(x) - avg).abs().max() > 1e-3


# ----- escnn-basis layers are escnn's layers ----------------------------------------------------
@pytest.mark.parametrize(
    "gname,lifting,padding,k",
    [("C4", True, "circular", 5), ("D4", False, "zero", 3), ("C8", False, "circular", 3), ("D6", True, "zero", 5), ("C3", False, "valid", 5)],
)
def test_escnn_basis_conv_reproduces_r2conv(gname, lifting, padding, k):
    """Our escnn-basis layer = ``sigma_w/sqrt(in k^2) * s * R2Conv(x)`` for the same coefficients."""
    group = Group.parse(gname)
    c_in, c_out = 2, 3
    ours = _conv_layer(group, lifting, c_in, c_out, k, padding, "escnn", "full")
    r2 = et.enn.R2Conv(
        ours.in_type,
        ours.out_type,
        k,
        padding=0 if padding == "valid" else k // 2,
        padding_mode="circular" if padding == "circular" else "zeros",
        bias=False,
        initialize=False,
    )
    with torch.no_grad():
        r2.weights.copy_(ours.weight.reshape(-1))  # escnn orders weights [out field, in field, basis j]
        ours.bias.zero_()
    scale = filter_basis(group, "lift" if lifting else "gconv", c_in, k, "escnn").scale
    x = et.enn.GeometricTensor(torch.randn(2, ours.in_type.size, 9, 9, generator=torch.Generator().manual_seed(0)), ours.in_type)
    close(ours(x).tensor, ours.w_scale * scale * r2(x).tensor)
    close(ours.filter(), scale * r2.expand_parameters()[0], atol=1e-6, rtol=1e-6)  # entries O(1): float32


@pytest.mark.parametrize("gname,shape,kind", [("D4", (1, 5, 5), "glift"), ("D6", (1, 12), "glift"), ("C4", None, "gdense")])
def test_escnn_basis_linear_reproduces_escnn_linear(gname, shape, kind):
    """Group lift / group dense with escnn's basis = escnn's ``nn.Linear`` for the same coefficients.

    The lift basis is read from ``Linear`` on one field per orbit (the input reordered by
    orbit), one output field at a time, so output field ``o`` is compared with that ``Linear``
    holding ``theta[o, 0, :]``. That this basis spans the same filters, with the same prior, as
    escnn's basis for the single permutation representation is checked in test_models_structure.
    """
    group = Group.parse(gname)
    G = group.order
    if kind == "glift":
        perm = domain_permutation(group, shape)
        basis = filter_basis(group, "glift", 1, 0, "escnn", domain_perm=perm)
        escnn_in, order = et.orbit_field_type(group, perm)
        ours_in = et.permutation_type(group, perm)
    else:
        basis = filter_basis(group, "gdense", 2, 0, "escnn")
        escnn_in = ours_in = et.regular_type(group, 2, "none")
        order = np.arange(ours_in.size)
    out_type = et.regular_type(group, 3, "none")
    ours = init_parameters(BasisLinear(ours_in, out_type, basis, AFF), 5)
    with torch.no_grad():
        ours.bias.zero_()
    x = torch.randn(4, ours_in.size, generator=torch.Generator().manual_seed(1))
    y = ours(et.enn.GeometricTensor(x, ours_in)).tensor
    if kind == "glift":
        lin = et.enn.Linear(escnn_in, et.regular_type(group, 1, "none"), bias=False, initialize=False)
        for o in range(3):
            with torch.no_grad():
                lin.weights.copy_(ours.weight[o, 0])
            theirs = lin(et.enn.GeometricTensor(x[:, order], escnn_in)).tensor
            close(y[:, o * G : (o + 1) * G], ours.w_scale * basis.scale * theirs)
    else:
        lin = et.enn.Linear(escnn_in, out_type, bias=False, initialize=False)
        with torch.no_grad():
            lin.weights.copy_(ours.weight.reshape(-1))  # one repr pair: [out field, in field, j]
        close(y, ours.w_scale * basis.scale * lin(et.enn.GeometricTensor(x, escnn_in)).tensor)
