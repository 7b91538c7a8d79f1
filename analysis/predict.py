"""Predictions of an infinitely wide ensemble over training time (docs/theory.md §5).

Linearised full-batch gradient descent on ``L = (1/(2N)) sum_i ||f(x_i) - y_i||^2`` from a
mean-zero Gaussian initial function with NNGP ``K``, driven by the NTK ``Theta``:

    f_k(x)  = f_0(x) - a_k(x) (f_0(X) - Y)
    a_k(x)  = Theta(x,X) Theta(X,X)^-1 [I - (I - (eta/N) Theta(X,X))^k]
    mean    = a_k(x) Y
    Var     = K(x,x) - 2 a_k(x) K(X,x) + a_k(x) K(X,X) a_k(x)^T

Gradient flow replaces ``(I - (eta/N) Theta)^k`` by ``exp(-(t/N) Theta)`` (``t = eta k``);
``t = inf`` is kernel regression. Everything goes through one eigendecomposition
``Theta(X,X) = V diag(lam) V^T``: in that basis ``a_k(x) = Theta(x,X) V diag(g_k(lam)) V^T``
with the scalar filter ``g_k(lam) = (1 - (1 - eta lam/N)^k) / lam`` (discrete) or
``(1 - exp(-t lam/N)) / lam`` (flow), evaluated with ``expm1``/``log1p`` so that small
eigenvalues keep full precision and ``lam = 0`` gives the limit ``k eta/N`` (``t/N``).

``predict_as_trained`` applies this to a model spec as it is trained: plain, with
full-orbit augmentation (own kernels on the ``|G| N`` augmented set, docs/theory.md §6), or
with random augmentation (mean only).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from study.spec import kernel_jointly_invariant

from . import kernels

__all__ = ["GDPredictor", "Prediction", "UnstableLearningRate", "augment_full_orbit", "predict_as_trained"]

# A kernel matrix of Theta(X,X) whose smallest eigenvalue is below -_PSD_RTOL * lam_max is
# not a rounding artefact of a positive semidefinite kernel: float64 kernels of a few
# thousand points carry relative errors near 1e-13, far below this.
_PSD_RTOL = 1e-8
# Negative variances below -_VAR_WARN_RTOL * K(x,x) are reported: rounding alone (which grows
# with cond(Theta(X,X)) times 1e-16) does not reach them for reasonably conditioned kernels.
_VAR_WARN_RTOL = 1e-6


class UnstableLearningRate(ValueError):
    """Raised when ``eta >= 2N / lam_max(Theta(X,X))``: discrete GD would diverge."""


def _f64(a, name: str, ndim: Optional[int] = None) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name}: contains NaN or infinite entries")
    return a


class GDPredictor:
    """Mean and variance of linearised gradient descent for one pair of training kernels.

    Args:
        ntk_train_train: ``Theta(X,X)``, ``[N, N]``.
        nngp_train_train: ``K(X,X)``, ``[N, N]``; may be ``None`` when only means are needed.
        y_train: ``[N, n_out]`` targets (a ``[N]`` vector is one output).
        lr: learning rate ``eta``; needed for ``steps``, not for ``times``.
        diag_reg: added to the diagonal of ``Theta(X,X)`` at every time (as neural-tangents
            does with ``diag_reg_absolute_scale=True``): the ridge of kernel regression at
            ``t = inf``. With ``diag_reg = 0`` the ``t = inf`` prediction uses the
            pseudo-inverse, dropping eigenvalues below ``N * eps * lam_max`` (their
            contribution there is rounding noise).
        check_stability: raise ``UnstableLearningRate`` when ``lr >= max_stable_lr``.
    """

    def __init__(
        self,
        ntk_train_train,
        nngp_train_train,
        y_train,
        lr: Optional[float] = None,
        *,
        diag_reg: float = 0.0,
        check_stability: bool = True,
    ):
        theta = _f64(ntk_train_train, "ntk_train_train", 2)
        n = theta.shape[0]
        if theta.shape != (n, n):
            raise ValueError(f"ntk_train_train: expected a square matrix, got shape {theta.shape}")
        y = _f64(y_train, "y_train")
        if y.ndim == 1:
            y = y[:, None]
        if y.ndim != 2 or y.shape[0] != n:
            raise ValueError(f"y_train: expected [{n}, n_out], got shape {np.shape(y_train)}")
        if diag_reg < 0:
            raise ValueError(f"diag_reg: must be >= 0, got {diag_reg}")
        self.n_train = n
        self.n_out = y.shape[1]
        self.diag_reg = float(diag_reg)

        # Symmetrise: kernels assembled from blocks may differ from their transpose by rounding.
        lam, v = np.linalg.eigh(0.5 * (theta + theta.T))
        lam = lam + self.diag_reg
        if lam[-1] <= 0:
            raise ValueError("ntk_train_train: has no positive eigenvalue")
        if lam[0] < -_PSD_RTOL * lam[-1]:
            raise ValueError(
                f"ntk_train_train: not positive semidefinite (eigenvalues {lam[0]:.3e} .. {lam[-1]:.3e})"
            )
        self.eigenvalues = lam  # of Theta(X,X) + diag_reg I, ascending
        self.eigenvectors = v
        self._vty = v.T @ y  # targets in the eigenbasis, [N, n_out]

        self._nngp_eig = None
        if nngp_train_train is not None:
            k = _f64(nngp_train_train, "nngp_train_train", 2)
            if k.shape != (n, n):
                raise ValueError(f"nngp_train_train: expected [{n}, {n}], got shape {k.shape}")
            self._nngp_eig = v.T @ (0.5 * (k + k.T)) @ v  # K(X,X) in Theta's eigenbasis

        self.lr = None if lr is None else float(lr)
        if self.lr is not None:
            if self.lr <= 0:
                raise ValueError(f"lr: must be positive, got {lr}")
            if check_stability and not self.is_stable(self.lr):
                raise UnstableLearningRate(
                    f"lr: eta = {self.lr:g} is not below the stability bound 2N/lam_max = "
                    f"{self.max_stable_lr:g} (N = {n}, lam_max = {lam[-1]:.6g}); gradient descent "
                    "would diverge. Use a smaller lr, or check_stability=False to see it diverge."
                )

    # ----- stability -------------------------------------------------------------------
    @property
    def max_stable_lr(self) -> float:
        """``2N / lam_max``: discrete gradient descent converges for every ``eta`` below it."""
        return 2.0 * self.n_train / self.eigenvalues[-1]

    def is_stable(self, lr: float) -> bool:
        return float(lr) < self.max_stable_lr

    # ----- the spectral filter ---------------------------------------------------------
    def filter(self, steps=None, times=None) -> np.ndarray:
        """``g(lam)`` for each requested step or time: ``[T, N]``, so that
        ``a(x) = Theta(x,X) V diag(g) V^T``."""
        lam, n = self.eigenvalues, self.n_train
        if (steps is None) == (times is None):
            raise ValueError("give exactly one of steps= (discrete GD) or times= (gradient flow)")
        if steps is not None:
            if self.lr is None:
                raise ValueError("steps: the predictor has no lr; pass lr= to GDPredictor, or use times=")
            ks = np.atleast_1d(np.asarray(steps))
            if ks.ndim != 1 or np.any(ks < 0) or np.any(ks != np.round(ks)) or not np.all(np.isfinite(ks)):
                raise ValueError(f"steps: expected non-negative integers, got {steps!r}")
            return np.stack([_gd_filter(lam, self.lr / n, int(k)) for k in ks])
        ts = np.atleast_1d(np.asarray(times, dtype=np.float64))
        if ts.ndim != 1 or np.any(np.isnan(ts)) or np.any(ts < 0):
            raise ValueError(f"times: expected non-negative times (np.inf allowed), got {times!r}")
        return np.stack([self._inf_filter() if np.isinf(t) else _flow_filter(lam, t / n) for t in ts])

    def _inf_filter(self) -> np.ndarray:
        lam = self.eigenvalues
        if self.diag_reg > 0:
            return 1.0 / lam
        cut = self.n_train * np.finfo(np.float64).eps * lam[-1]
        out = np.zeros_like(lam)
        keep = lam > cut
        out[keep] = 1.0 / lam[keep]
        return out

    # ----- predictions -----------------------------------------------------------------
    def _weights_eig(self, ntk_test_train) -> np.ndarray:
        kt = _f64(ntk_test_train, "ntk_test_train", 2)
        if kt.shape[1] != self.n_train:
            raise ValueError(f"ntk_test_train: expected [n_test, {self.n_train}], got shape {kt.shape}")
        return kt @ self.eigenvectors  # Theta(x,X) V

    def mean(self, ntk_test_train, steps=None, times=None) -> np.ndarray:
        """Ensemble mean ``[T, n_test, n_out]`` at the given ``steps`` or ``times``."""
        g = self.filter(steps=steps, times=times)
        tv = self._weights_eig(ntk_test_train)
        return np.einsum("in,tn,no->tio", tv, g, self._vty, optimize=True)

    def variance(self, ntk_test_train, nngp_test_train, nngp_test_diag, steps=None, times=None) -> np.ndarray:
        """Variance ``[T, n_test]`` of each test output (the same for every output unit).

        ``nngp_test_diag`` is ``K(x,x)`` for each test input, ``[n_test]``.
        """
        g = self.filter(steps=steps, times=times)
        tv = self._weights_eig(ntk_test_train)
        kxv = self._nngp_test_eig(nngp_test_train, tv.shape[0])
        kdiag = _f64(nngp_test_diag, "nngp_test_diag", 1)
        if kdiag.shape != (tv.shape[0],):
            raise ValueError(f"nngp_test_diag: expected [{tv.shape[0]}], got shape {kdiag.shape}")
        out = np.empty((len(g), tv.shape[0]))
        for i, gi in enumerate(g):  # one time at a time keeps memory at n_test x N
            a = tv * gi  # a(x) in the eigenbasis
            out[i] = kdiag - 2.0 * np.einsum("in,in->i", a, kxv) + np.einsum("in,in->i", a @ self._nngp_eig, a)
        return _clip_rounding(out, kdiag)

    def covariance(self, ntk_test_train, nngp_test_train, nngp_test_test, steps=None, times=None) -> np.ndarray:
        """Covariance ``[T, n_test, n_test]`` between the test outputs (the same for every output unit)."""
        g = self.filter(steps=steps, times=times)
        tv = self._weights_eig(ntk_test_train)
        m = tv.shape[0]
        kxv = self._nngp_test_eig(nngp_test_train, m)
        ktt = _f64(nngp_test_test, "nngp_test_test", 2)
        if ktt.shape != (m, m):
            raise ValueError(f"nngp_test_test: expected [{m}, {m}], got shape {ktt.shape}")
        out = np.empty((len(g), m, m))
        for i, gi in enumerate(g):
            a = tv * gi
            cross = a @ kxv.T  # a(x) K(X,x')
            c = ktt - cross - cross.T + a @ self._nngp_eig @ a.T
            out[i] = 0.5 * (c + c.T)
        return out

    def _nngp_test_eig(self, nngp_test_train, m: int) -> np.ndarray:
        if self._nngp_eig is None:
            raise ValueError("nngp_train_train: the predictor was built without it; variances need the NNGP")
        k = _f64(nngp_test_train, "nngp_test_train", 2)
        if k.shape != (m, self.n_train):
            raise ValueError(f"nngp_test_train: expected [{m}, {self.n_train}], got shape {k.shape}")
        return k @ self.eigenvectors  # K(x,X) V


def _gd_filter(lam: np.ndarray, c: float, k: int) -> np.ndarray:
    """``(1 - (1 - c lam)^k) / lam`` with ``c = eta/N``; the limit ``c k`` at ``lam = 0``."""
    r = c * lam
    out = np.empty_like(lam)
    small = r < 1.0  # includes tiny negative eigenvalues: (1 - r)^k = exp(k log1p(-r)) > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = -np.expm1(k * np.log1p(-r[small])) / r[small]  # (1 - (1-r)^k) / r
    ratio[r[small] == 0] = k
    out[small] = c * ratio
    big = ~small  # 1 <= r < 2: no cancellation, lam is large
    out[big] = (1.0 - (1.0 - r[big]) ** k) / lam[big]
    return out


def _flow_filter(lam: np.ndarray, s: float) -> np.ndarray:
    """``(1 - exp(-s lam)) / lam`` with ``s = t/N``; the limit ``s`` at ``lam = 0``."""
    x = s * lam
    out = np.full_like(lam, s)
    nz = x != 0
    out[nz] = s * (-np.expm1(-x[nz]) / x[nz])
    return out


def _clip_rounding(var: np.ndarray, kdiag: np.ndarray) -> np.ndarray:
    # The variance is a quadratic form of the PSD NNGP matrix of (x, X), so it is >= 0
    # exactly; rounding can push it slightly below zero where it nearly vanishes.
    scale = np.maximum(np.abs(kdiag), np.finfo(np.float64).tiny)
    if np.any(var < -_VAR_WARN_RTOL * scale):
        warnings.warn(
            f"variance: values down to {var.min():.3e} are negative beyond rounding; "
            "the NNGP matrices are probably not positive semidefinite",
            RuntimeWarning,
            stacklevel=3,
        )
    return np.maximum(var, 0.0)


# ----- models as trained -----------------------------------------------------------------


@dataclass(frozen=True)
class Prediction:
    """``mean [T, n_test, n_out]``; ``variance [T, n_test]`` (NaN where there is no closed form)."""

    mean: np.ndarray
    variance: np.ndarray


def augment_full_orbit(spec, x, y) -> tuple[np.ndarray, np.ndarray]:
    """The full-orbit augmented set ``{(L_g x_i, y_i)}``: ``[N |G|, ...]``, sample-major.

    Images ``[N, C, H, W]`` or ring signals ``[N, C, m]``, acted on by ``spec.group``.
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    grp = spec.group_obj
    x_aug = grp.orbit_rows(x)  # row i |G| + g is L_g x_i (docs/theory.md §1)
    y_aug = np.repeat(y, grp.order, axis=0)
    return x_aug, y_aug


def predict_as_trained(
    spec,
    x_train,
    y_train,
    x_test,
    *,
    lr: Optional[float] = None,
    steps: Optional[Sequence[int]] = None,
    times: Optional[Sequence[float]] = None,
    kernel_fn: Optional[Callable] = None,
    mean_kernel_fn: Optional[Callable] = None,
    use_orbit_mean: bool = False,
    variance: bool = True,
    diag_reg: float = 0.0,
) -> Prediction:
    """Analytic ensemble mean and variance of ``spec`` trained as ``spec.augmentation`` says.

    - ``none`` (and every ``gcnn`` / ``group_mlp``): the model's kernels on the ``N`` samples.
    - ``full_orbit``: the model's own, not orbit-averaged, kernels on the ``|G| N`` augmented
      set, loss over ``|G| N`` (docs/theory.md §6). This is exact for any architecture.
      With ``use_orbit_mean=True`` the mean instead uses the orbit-averaged kernel
      (``mean_kernel_fn``) on the ``N`` originals; this short cut equals the exact mean only
      for models with a jointly invariant NTK (MLP; CNN with circular padding and gap
      readout), and the variance is still computed on the augmented set.
    - ``random``: the expected update of linearised GD equals the full-orbit update, so the
      mean is the full-orbit mean exactly (for a continuous group, SO3: kernel GD with the
      orbit-averaged kernel ``mean_kernel_fn`` on the ``N`` originals). The variance has no closed form here (the
      random draws add a variance that depends on the sampled sequence of transforms and
      does not reduce to these kernels), so it is returned as NaN.

    ``kernel_fn(spec, input_shape, n_out)`` and ``mean_kernel_fn`` have the signatures of
    ``analysis.kernels`` (the defaults); ``blocks.blocked_kernel_fn`` wraps them for Ray.
    """
    kernel_fn = kernel_fn or kernels.kernel_fn
    mean_kernel_fn = mean_kernel_fn or kernels.mean_kernel_fn
    x_train = np.asarray(x_train, dtype=np.float64)
    x_test = np.asarray(x_test, dtype=np.float64)
    y = np.asarray(y_train, dtype=np.float64)
    if y.ndim == 1:
        y = y[:, None]
    shape, n_out = tuple(x_train.shape[1:]), y.shape[1]
    aug = "none" if spec.equivariant else spec.augmentation
    own = spec.model_copy(update={"augmentation": "none"})  # the network itself, untransformed data

    def on(fn, s, xtr, ytr, want_var):
        kf = fn(s, shape, n_out)
        get = ("nngp", "ntk") if want_var else ("ntk",)
        k_dd = kf(xtr, None, get=get)
        k_td = kf(x_test, xtr, get=get)
        pred = GDPredictor(k_dd["ntk"], k_dd.get("nngp") if want_var else None, ytr, lr, diag_reg=diag_reg)
        mean = pred.mean(k_td["ntk"], steps=steps, times=times)
        if not want_var:
            return mean, None
        k_tt = kf(x_test, None, get=("nngp",), diag=True)
        var = pred.variance(k_td["ntk"], k_td["nngp"], k_tt["nngp"], steps=steps, times=times)
        return mean, var

    if aug == "none":
        mean, var = on(kernel_fn, own, x_train, y, variance)
    elif aug == "random" and getattr(spec.group_obj, "continuous", False):
        # SO(3): no finite orbit to augment with. With a fresh independent rotation per sample
        # and step and a jointly invariant NTK, the mean follows kernel GD with the orbit-averaged
        # kernel on the N originals (docs/so3.md, "The SO(3) study"); no closed-form variance.
        mean, var = on(mean_kernel_fn, spec, x_train, y, False)
    elif aug in ("full_orbit", "random"):
        x_aug, y_aug = augment_full_orbit(spec, x_train, y)
        want_var = variance and aug == "full_orbit"
        if use_orbit_mean:
            if not kernel_jointly_invariant(spec):
                raise ValueError(f"use_orbit_mean: the kernel of {spec.name} is not jointly invariant (docs/theory.md "
                                 "§3.4), so the orbit-averaged kernel is not its augmented mean; use the augmented set")
            mean, _ = on(mean_kernel_fn, spec, x_train, y, False)
            var = on(kernel_fn, own, x_aug, y_aug, True)[1] if want_var else None
        else:
            mean, var = on(kernel_fn, own, x_aug, y_aug, want_var)
    else:  # pragma: no cover - the spec's Literal rules this out
        raise ValueError(f"augmentation: unknown value {spec.augmentation!r}")
    if var is None:
        var = np.full(mean.shape[:2], np.nan)
    return Prediction(mean=mean, variance=var)
