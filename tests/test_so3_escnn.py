"""The SO(3) layers as escnn EquivariantModules (workers/so3_escnn.py).

Tolerances: the intertwiners and the Fourier-domain layers (lifting, group convolution) are
exact maps, so float64 round-off (1e-12 with margin); escnn's own ``check_equivariance``
runs in float32 (1e-5 absolute, its float32 round-off with margin). The grid nonlinearity is
equivariant only up to aliasing, which falls with the SOFT bandwidth ``B`` (docs/so3.md); the
test asserts the fall and prints the numbers.
"""

import numpy as np
import pytest
import torch

from study.sphere import SO3Spec, dh_grid, wigner_d
from workers.so3 import SO3Conv, SO3Lift, SO3Nonlin, build_so3_model
from workers.so3_escnn import EscnnSO3, as_escnn, intertwiner, so3_gspace

G = so3_gspace().fibergroup


def _elements(n, seed=0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((n, 4))
    return [G.element(v / np.linalg.norm(v), "Q") for v in q]


@pytest.mark.parametrize("l", [0, 1, 2, 3, 4])
def test_our_wigner_d_is_escnns_irrep_in_another_basis(l):
    Q = intertwiner(l)
    np.testing.assert_allclose(Q @ Q.T, np.eye(2 * l + 1), atol=1e-12)
    for g in _elements(5, seed=l):
        D = wigner_d(l, np.asarray(g.to("MAT"))[None])[l][0]
        np.testing.assert_allclose(D, Q @ np.asarray(G.irrep(l)(g)) @ Q.T, atol=1e-12)


def _field(module, n=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return module.in_type(torch.randn(n, module.in_type.size, generator=gen, dtype=torch.float64))


def _equivariance_error(module, x, elements) -> float:
    y = module(x)
    scale = y.tensor.abs().max().item()
    return max((module(x.transform(g)).tensor - y.transform(g).tensor).abs().max().item() for g in elements) / scale


def test_lift_and_group_conv_are_exactly_equivariant_escnn_fields():
    lift = EscnnSO3.lift(SO3Lift(2, 3, 3, 3, 1.0, 0.1), 2, 3)
    conv = EscnnSO3.conv(SO3Conv(3, 4, 3, 1.0, 0.1), 4)
    x = _field(lift)
    assert _equivariance_error(lift, x, _elements(4)) < 1e-12
    assert _equivariance_error(conv, lift(x), _elements(4, seed=1)) < 1e-12
    for m in (lift, conv):  # escnn's own check (float32, its testing elements)
        for _, err in m.float().check_equivariance(atol=1e-5, rtol=1e-4):
            assert err < 1e-5


def test_grid_nonlinearity_equivariance_error_falls_with_bandwidth():
    errors = {}
    for B in (3, 4, 6):
        nl = EscnnSO3.nonlin(SO3Nonlin(3, 3, B, "relu"), 3, 3, 3)
        errors[B] = _equivariance_error(nl, _field(nl, seed=2), _elements(4, seed=3))
    print("relu nonlinearity, bands 3 -> 3, relative equivariance error by SOFT bandwidth B:", errors)
    assert errors[3] > errors[4] > errors[6]


def test_whole_network_as_escnn_module_equals_the_trained_model_and_is_near_invariant():
    spec = SO3Spec(channels=2, L_in=3, bands=(3, 2), B=6, nonlin="relu", outputs=2)
    net = build_so3_model(spec, 5, seed=0)
    e = as_escnn(net)
    x = _field(e, n=3)
    grid = dh_grid(3)
    Y = torch.tensor(grid.harmonics(2)).reshape(-1, 9)
    samples = (x.tensor.reshape(3, 2, 9) @ Y.T).reshape(3, 2, 6, 6)  # the band-limited signals
    np.testing.assert_allclose(e(x).tensor.detach(), net(samples).detach(), atol=1e-12)
    assert e.out_type.size == 2 and all(r.is_trivial() for r in e.out_type.representations)
    # invariant outputs: only the grid nonlinearity's aliasing (small at B = 6) breaks it
    assert _equivariance_error(e, x, _elements(3, seed=4)) < 2e-2
