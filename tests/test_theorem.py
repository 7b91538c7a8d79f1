"""docs/theory.md §6 at infinite width: full-orbit augmentation and GCNNs share their mean.

Ensemble A trains an ``mlp`` / ``cnn`` on the full-orbit augmented set (its own kernels on
``|G| N`` samples, loss over ``|G| N``); ensemble B trains the canonical ``group_mlp`` /
``gcnn`` on the ``N`` originals. Their analytic means must agree at every step on any input,
A's mean must be invariant on every orbit, and their variances must differ. Both sides use
``analysis.kernels`` through ``analysis.predict.predict_as_trained``; neither side is
computed from the other's kernel.
"""

from __future__ import annotations

import numpy as np
import pytest

from analysis.predict import GDPredictor, augment_full_orbit, predict_as_trained
from study.spec import ModelSpec

pytest.importorskip("analysis.kernels")
from analysis.kernels import kernel_fn  # noqa: E402

STEPS = [0, 1, 5, 40, 400]
COMMON = dict(depth=2, sigma_w=1.3, sigma_b=0.2, kernel_size=3, padding="circular", readout="gap")
# Both sides are kernel-GD predictions from float64 kernels of different networks whose
# equality is exact algebra; they differ by rounding in the kernels (~1e-15 relative)
# amplified by cond(Theta(X,X)) < 2e3 here: measured 3e-15 .. 5e-14. The ReLU NTK's acos
# has an infinite slope at coincident inputs, where ulps of rounding become ~1e-8; the
# engine snaps cos to 1 there, and without that snap this test sees 5e-9. Any modelling
# error (a wrong loss normalisation, a non-averaged kernel) shows up at 1e-2 or more.
RTOL = 1e-8


def _images(group: str, seed: int):
    """Training data and test inputs: noise, transformed training points, transformed noise, far points."""
    rng = np.random.default_rng(seed)
    n, shape = 5, (2, 5, 5)
    x = rng.standard_normal((n, *shape))
    y = rng.standard_normal((n, 2))
    noise = rng.standard_normal((3, *shape))
    spec = ModelSpec(name="g", arch="mlp", group=group)
    grp = spec.group_obj
    moved = np.stack([grp.act_image(x[i], g) for i, g in [(0, 1), (2, grp.order - 1), (4, 2)]])
    moved_noise = np.stack([grp.act_image(noise[0], g) for g in range(1, grp.order)])
    far = 4.0 * rng.standard_normal((2, *shape))  # off the data's scale
    return x, y, np.concatenate([noise, moved, moved_noise, far])


def _lr(spec, x, y):
    """Half the stability bound of the augmented training kernel (the stiffer of the two)."""
    x_aug, y_aug = augment_full_orbit(spec, x, y)
    k = kernel_fn(spec.model_copy(update={"augmentation": "none"}), x.shape[1:], y.shape[1])(x_aug, get=("ntk",))
    return 0.5 * GDPredictor(k["ntk"], None, y_aug).max_stable_lr


def _rel(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


CASES = {  # plain arch, group arch, support, group, nonlinearity
    "mlp-C4": ("mlp", "group_mlp", "identity", "C4", "relu"),
    "mlp-D4": ("mlp", "group_mlp", "identity", "D4", "relu"),
    "mlp-C4-erf": ("mlp", "group_mlp", "identity", "C4", "erf"),
    "cnn-C4-identity": ("cnn", "gcnn", "identity", "C4", "relu"),
    "cnn-C4-full": ("cnn", "gcnn", "full", "C4", "relu"),
    "cnn-D4-full": ("cnn", "gcnn", "full", "D4", "relu"),
    "cnn-C4-full-erf": ("cnn", "gcnn", "full", "C4", "erf"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_augmented_mean_equals_group_network_mean(case):
    plain, equiv, support, group, phi = CASES[case]
    x, y, xt = _images(group, seed=len(case))
    aug = ModelSpec(name="a", arch=plain, group=group, augmentation="full_orbit", nonlinearity=phi, **COMMON)
    gnet = ModelSpec(name="b", arch=equiv, group=group, support=support, nonlinearity=phi, **COMMON)
    lr = _lr(aug, x, y)
    a = predict_as_trained(aug, x, y, xt, lr=lr, steps=STEPS)
    b = predict_as_trained(gnet, x, y, xt, lr=lr, steps=STEPS)
    assert a.mean.shape == (len(STEPS), len(xt), 2)
    assert np.all(a.mean[0] == 0) and np.max(np.abs(a.mean[-1])) > 0.1  # it learned something
    for k in range(1, len(STEPS)):
        assert _rel(a.mean[k], b.mean[k]) < RTOL, (STEPS[k], _rel(a.mean[k], b.mean[k]))
    # the orbit-averaged short cut gives the same mean
    short = predict_as_trained(aug, x, y, xt, lr=lr, steps=STEPS, use_orbit_mean=True, variance=False)
    assert _rel(short.mean[1:], a.mean[1:]) < RTOL
    # same mean, different spread: A's NNGP is not orbit-averaged
    gap = np.max(np.abs(a.variance - b.variance), axis=1)
    assert np.all(gap > 1e-3 * np.max(b.variance)), gap


@pytest.mark.parametrize("case", ["mlp-C4", "cnn-C4-identity"])
def test_augmented_mean_is_orbit_invariant(case):
    plain, _, _, group, _ = CASES[case]
    x, y, xt = _images(group, seed=11)
    aug = ModelSpec(name="a", arch=plain, group=group, augmentation="full_orbit", **COMMON)
    grp = aug.group_obj
    orbit = grp.orbit_image(xt)  # [n, |G|, C, H, W]
    pts = orbit.reshape(-1, *xt.shape[1:])
    lr = _lr(aug, x, y)
    pred = predict_as_trained(aug, x, y, pts, lr=lr, steps=STEPS)
    mean = pred.mean.reshape(len(STEPS), len(xt), grp.order, 2)
    spread = np.max(np.abs(mean - mean[:, :, :1]))
    # invariance is exact algebra (Theta(X_aug, X_aug) commutes with the permutation the
    # group induces on X_aug); what remains is rounding of O(1) numbers
    assert spread < RTOL * np.max(np.abs(mean)), spread
    # a single CNN/MLP on the original data alone is not invariant: the check has teeth
    plain_spec = aug.model_copy(update={"augmentation": "none"})
    lone = predict_as_trained(plain_spec, x, y, pts, lr=lr, steps=STEPS, variance=False)
    lone = lone.mean.reshape(len(STEPS), len(xt), grp.order, 2)
    assert np.max(np.abs(lone - lone[:, :, :1])) > 1e-2 * np.max(np.abs(lone))


def test_random_augmentation_mean_is_the_full_orbit_mean():
    x, y, xt = _images("C4", seed=3)
    full = ModelSpec(name="a", arch="mlp", group="C4", augmentation="full_orbit", **COMMON)
    rand = full.model_copy(update={"augmentation": "random"})
    lr = _lr(full, x, y)
    a = predict_as_trained(full, x, y, xt, lr=lr, steps=STEPS)
    r = predict_as_trained(rand, x, y, xt, lr=lr, steps=STEPS)
    np.testing.assert_array_equal(r.mean, a.mean)  # the same computation, by definition
    assert np.all(np.isnan(r.variance))
