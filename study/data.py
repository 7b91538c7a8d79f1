"""The arrays a study trains and evaluates on, built once by the driver and stored with the
results so every unit (and every later reader) sees exactly the same numbers.

Shapes: images ``[N, C, H, W]``, ring signals ``[N, C, m]``; targets ``[N, n_out]``.
"""

from __future__ import annotations

import hashlib
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import map_coordinates
from sklearn.datasets import load_digits, load_sample_images

from .atomic import atomic_savez
from .config import DataConfig, StudyError
from .groups import Group
from .seeds import derive_seed
from .sphere import band_limited_noise, dh_grid, isht, random_rotations, rotate_coeffs, sht


@dataclass
class StudyData:
    train_x: np.ndarray
    train_y: np.ndarray
    eval_sets: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train_x.shape[1:])

    @property
    def n_out(self) -> int:
        return int(self.train_y.shape[1])

    def all_sets(self) -> dict[str, np.ndarray]:
        """The training inputs (as ``train``) and every eval set, in logging order."""
        return {"train": self.train_x, **self.eval_sets}

    def digest(self) -> str:
        h = hashlib.sha256()
        for name, arr in [("train_x", self.train_x), ("train_y", self.train_y), *sorted(self.eval_sets.items())]:
            h.update(name.encode())
            h.update(str(arr.shape).encode())
            h.update(np.ascontiguousarray(arr, dtype=np.float64).tobytes())
        return h.hexdigest()[:16]

    def save(self, path: Path) -> None:
        arrays = {"train_x": self.train_x, "train_y": self.train_y}
        arrays.update({f"eval__{k}": v for k, v in self.eval_sets.items()})
        atomic_savez(path, arrays)

    @classmethod
    def load(cls, path: Path) -> "StudyData":
        with np.load(path) as z:
            evals = {k[len("eval__"):]: z[k] for k in z.files if k.startswith("eval__")}
            return cls(train_x=z["train_x"], train_y=z["train_y"], eval_sets=evals)


# ----- sources ---------------------------------------------------------------------------
def _digits(src, seed: int):

    d = load_digits()
    order = np.random.default_rng(derive_seed("digits-order", seed)).permutation(len(d.target))
    if src.start + src.n > len(order):
        raise StudyError(
            f"data: digits start {src.start} + n {src.n} exceeds the {len(order)} digits; lower n or start"
        )
    idx = order[src.start : src.start + src.n]
    return d.images[idx][:, None].astype(np.float64), d.target[idx], 10


def _rotated_digits(src, seed: int, group: str):
    """Digits in the ``digits`` order, digit ``i`` (of that order) turned by a group element
    drawn once per digit from the study seed, so a digit looks the same in every source that
    includes it."""
    g = Group.parse(src.group or group)
    x, labels, classes = _digits(src, seed)
    if not g.acts_exactly_on_grid():
        raise StudyError(
            f"data: rotated_digits needs a group that acts exactly on the 8x8 grid, not {g.name}; "
            "use C1, C2, C4, D1, D2 or D4"
        )
    elems = np.random.default_rng(derive_seed("rotated-digits", seed, g.name)).integers(0, g.order, size=1797)
    elems = elems[src.start : src.start + src.n]
    out = x.copy()
    for e in range(g.order):
        sel = elems == e
        if sel.any():
            out[sel] = g.act_image(x[sel], e)
    return out, labels, classes


def _npz(src, base: Path):
    path = Path(src.path)
    if not path.is_absolute():
        path = base / path
    if not path.is_file():
        raise StudyError(
            f"data.path: {path} not found; put the .npz there (MedMNIST layout, e.g. pathmnist.npz) "
            "or fix the path"
        )
    keys = (f"{src.split}_images", f"{src.split}_labels")
    try:
        with np.load(path) as z:
            missing = [k for k in keys if k not in z.files]
            if missing:
                raise StudyError(
                    f"data.split: {path} has no {missing[0]} array (it has {', '.join(z.files) or 'none'}); "
                    f"expected {keys[0]} and {keys[1]}"
                )
            imgs, labels = z[keys[0]], z[keys[1]]
    except StudyError:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise StudyError(f"data.path: {path} is not a readable .npz ({type(e).__name__}); re-download or regenerate it") from None
    if imgs.ndim == 3:
        imgs = imgs[..., None]
    if imgs.ndim != 4:
        raise StudyError(f"data.path: {src.split}_images in {path} has shape {imgs.shape}; expected [N, H, W] or [N, H, W, C]")
    labels = np.asarray(labels).reshape(len(labels), -1)
    if labels.shape[0] != imgs.shape[0] or labels.shape[1] != 1:
        raise StudyError(
            f"data.path: {src.split}_labels in {path} has shape {labels.shape}; expected [{imgs.shape[0]}] or [{imgs.shape[0]}, 1]"
        )
    stop = len(imgs) if src.n is None else src.start + src.n
    if stop > len(imgs):
        raise StudyError(f"data.n: {path} has {len(imgs)} {src.split} images, fewer than start + n = {stop}")
    x = imgs[src.start : stop].astype(np.float64).transpose(0, 3, 1, 2)
    if src.grayscale:
        x = x.mean(axis=1, keepdims=True)
    if src.resize:
        x = _resize(x, src.resize)
    y = labels[src.start : stop, 0].astype(np.int64)
    return x, y, int(labels.max()) + 1


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    t = torch.from_numpy(x)
    return F.interpolate(t, size=(size, size), mode="area" if size < x.shape[-1] else "bilinear").numpy()


def _ring(src, seed: int):
    """Signals with 1..classes bumps at random positions on the ring; the label is the count - 1.

    The label does not change under rotations or reflections of the ring, so the task is
    invariant under every C<n>/D<n> acting on it.
    """
    rng = np.random.default_rng(derive_seed("ring", seed, src.start))
    i = np.arange(src.m)
    labels = rng.integers(0, src.classes, size=src.n)
    x = np.zeros((src.n, 1, src.m))
    for a, lab in enumerate(labels):
        for c in rng.choice(src.m, size=lab + 1, replace=False):
            d = np.minimum(np.abs(i - c), src.m - np.abs(i - c))
            x[a, 0] += np.exp(-0.5 * (d / 1.0) ** 2)
    x += 0.05 * rng.standard_normal(x.shape)
    return x, labels, src.classes


def _photo_patches(src, shape: tuple[int, ...], seed: int) -> np.ndarray:

    if len(shape) != 3:
        raise StudyError("data.eval: sample_images patches need image training data (C, H, W)")
    c, h, w = shape
    photos = [im.astype(np.float64) for im in load_sample_images().images]
    rng = np.random.default_rng(derive_seed("photos", seed))
    size = max(src.patch, h, w)
    out = np.empty((src.n, c, h, w))
    for a in range(src.n):
        im = photos[rng.integers(len(photos))]
        r0 = rng.integers(0, im.shape[0] - size + 1)
        c0 = rng.integers(0, im.shape[1] - size + 1)
        patch = im[r0 : r0 + size, c0 : c0 + size].transpose(2, 0, 1)
        patch = patch.mean(axis=0, keepdims=True) if c == 1 else patch[:c]
        out[a] = _resize(patch[None], h)[0] if size != h else patch
    return out


# ----- signals on the sphere (group SO3; docs/so3.md, "The SO(3) study") ----------------------
# The planar image covers [-_PLANE_HALF, _PLANE_HALF]^2 of the plane tangent at the north pole,
# reached by stereographic projection from the south pole, (u, v) = 2 (x, y) / (1 + z): the
# square's inscribed disk is the northern hemisphere (2 tan(b/2) = 2 at b = 90 deg), as in the
# Spherical CNNs MNIST-on-sphere benchmark, which projects each digit onto the northern hemisphere.
_PLANE_HALF = 2.0
# Bandwidth of the fine DH grid the projected image is sampled on before it is band-limited.
_FINE_L = 32


def _project_to_sphere(images: np.ndarray, L: int) -> np.ndarray:
    """``[N, h, w]`` planar images -> ``[N, 1, 2L, 2L]`` DH samples band-limited to degrees ``< L``.

    The image is sampled (bilinear, zero outside it) on a fine DH grid of bandwidth
    ``max(_FINE_L, 4L)``, its harmonics of degree ``< L`` are taken there by DH quadrature,
    and synthesised on the grid of bandwidth ``L``: a low-pass projection of the projected
    digit (sampling on the coarse grid directly would alias its sharp edges into the low
    degrees). The result is exactly band-limited, so ``rotate_signal`` acts on it exactly.
    """
    fine = dh_grid(max(_FINE_L, 4 * L))
    x, y, z = (fine.xyz[..., i] for i in range(3))
    with np.errstate(divide="ignore", invalid="ignore"):
        u, v = 2 * x / (1 + z), 2 * y / (1 + z)
    out = np.empty((len(images), 1, 2 * L, 2 * L))
    coarse = dh_grid(L)
    for a, im in enumerate(images):
        h, w = im.shape
        col = (u / _PLANE_HALF + 1) * w / 2 - 0.5  # pixel centres at -1 + (i + 1/2) 2/w
        row = (1 - v / _PLANE_HALF) * h / 2 - 0.5  # image rows run downwards, +y upwards
        ok = np.isfinite(col) & np.isfinite(row)
        coords = np.stack([np.where(ok, row, -10.0), np.where(ok, col, -10.0)])
        samples = map_coordinates(np.asarray(im, dtype=np.float64), coords, order=1, mode="constant", cval=0.0)
        out[a, 0] = isht(sht(samples, fine, L - 1), coarse)
    return out


def _sphere_L(src, L_train) -> int:
    L = src.L if src.L is not None else L_train
    if L is None:  # config requires L in training sources; an eval set inherits it
        raise StudyError(f"data: source {src.source} needs its DH grid bandwidth; add L: <bandwidth>")
    return int(L)


def _spherical_digits(src, seed: int, L: int):
    """The ``digits`` (same seeded order) on the sphere; ``rotate``: each turned by a Haar
    rotation drawn once per digit (for all 1797, so a digit looks the same in every set)."""
    x, labels, classes = _digits(src, seed)
    out = _project_to_sphere(x[:, 0], L)
    if src.rotate:
        R = random_rotations(1797, derive_seed("spherical-digits-rotations", seed))[src.start : src.start + src.n]
        g = dh_grid(L)
        out = isht(rotate_coeffs(sht(out, g), R[:, None]), g)
    return out, labels, classes


def _sphere_noise(src, seed: int, name: str, L: int) -> np.ndarray:
    """White noise band-limited to degrees ``< L``: i.i.d. N(0, 1) real SH coefficients."""
    return band_limited_noise(src.n, 1, L, derive_seed("sphere-noise", seed, name))


def _sphere_photos(src, seed: int, L: int) -> np.ndarray:
    """Grey ``patch x patch`` crops of scikit-learn's sample photographs, projected like the digits."""

    photos = [im.astype(np.float64).mean(axis=2) for im in load_sample_images().images]
    rng = np.random.default_rng(derive_seed("sphere-photos", seed))
    crops = np.empty((src.n, src.patch, src.patch))
    for a in range(src.n):
        im = photos[rng.integers(len(photos))]
        r0 = rng.integers(0, im.shape[0] - src.patch + 1)
        c0 = rng.integers(0, im.shape[1] - src.patch + 1)
        crops[a] = im[r0 : r0 + src.patch, c0 : c0 + src.patch]
    return _project_to_sphere(crops, L)


def _normalize_sphere(x: np.ndarray) -> np.ndarray:
    """Per input ``[C, 2L, 2L]``: subtract its mean and scale to mean square 1, both under the
    sphere's (DH quadrature) measure.

    Why the quadrature measure: the pixels of a DH grid are not equal areas, so the plain
    pixel mean and mean square of ``R x`` differ from those of ``x``; normalising with them
    would not commute with rotations (``normalize(R x) != R normalize(x)``) and rotated
    inputs would leave the normalised set. Under the quadrature measure the mean is the
    ``l = 0`` coefficient and the mean square the squared norm of the coefficients, both
    exactly rotation invariant for signals of band limit ``< L`` (the quadrature is exact
    for products of two such signals), and subtracting a constant keeps the band limit.
    So the normalised data stay band-limited, rotations stay exact, and
    ``Sigma0(x, x) = 1`` for the sphere MLP as for the image models.
    """
    w = dh_grid(x.shape[-1] // 2).weights
    mean = np.einsum("ncjk,jk->n", x, w) / x.shape[1]
    x = x - mean[:, None, None, None]
    rms = np.sqrt(np.einsum("ncjk,jk->n", x**2, w) / x.shape[1])
    return x / np.where(rms > 0, rms, 1.0)[:, None, None, None]


def _normalize(x: np.ndarray) -> np.ndarray:
    """Per input: subtract its mean, scale to mean square 1. Invariant under any permutation
    of positions, so it commutes with every group action."""
    axes = tuple(range(1, x.ndim))
    x = x - x.mean(axis=axes, keepdims=True)
    rms = np.sqrt((x**2).mean(axis=axes, keepdims=True))
    return x / np.where(rms > 0, rms, 1.0)


def _labelled(src, seed: int, base: Path, group: str = "C4", L_train=None):
    if src.source == "spherical_digits":
        return _spherical_digits(src, seed, _sphere_L(src, L_train))
    if src.source == "digits":
        return _digits(src, seed)
    if src.source == "rotated_digits":
        return _rotated_digits(src, seed, group)
    if src.source == "npz":
        return _npz(src, base)
    if src.source == "ring":
        return _ring(src, seed)
    raise StudyError(f"data.train: source {src.source} has no labels")  # config already rules this out


def build_data(cfg: DataConfig, seed: int, base: Path = Path("."), group: str = "C4") -> StudyData:
    """Build the study's arrays from its data config; ``base`` resolves relative paths,
    ``group`` (the study's) is the default group of ``rotated_digits``."""
    x, labels, classes = _labelled(cfg.train, seed, base, group)
    sphere = cfg.train.source == "spherical_digits"
    L_train = x.shape[-1] // 2 if sphere else None
    if len(x) == 0:
        raise StudyError("data.train: the training set has no inputs; give n > 0 or a file with images")
    y = np.eye(classes)[labels]
    if cfg.targets == "one_hot_centred":
        y = y - 1.0 / classes
    evals = {}
    for ev in cfg.eval:
        src = ev.data
        if src.source == "gaussian":
            rng = np.random.default_rng(derive_seed("gaussian", seed, ev.name))
            xe = rng.standard_normal((src.n, *x.shape[1:]))
        elif src.source == "sample_images":
            xe = _photo_patches(src, x.shape[1:], seed)
        elif src.source == "sphere_noise":
            xe = _sphere_noise(src, seed, ev.name, _sphere_L(src, L_train))
        elif src.source == "sphere_photos":
            xe = _sphere_photos(src, seed, _sphere_L(src, L_train))
        else:
            xe = _labelled(src, seed, base, group, L_train)[0]
        if len(xe) == 0:
            raise StudyError(f"data.eval.{ev.name}: the eval set has no inputs; give n > 0 or a file with images")
        if xe.shape[1:] != x.shape[1:]:
            raise StudyError(
                f"data.eval.{ev.name}: inputs have shape {xe.shape[1:]} but the training inputs {x.shape[1:]}; "
                "use the same image size (resize) and channels"
            )
        evals[ev.name] = xe
    if cfg.normalize == "per_image":
        norm = _normalize_sphere if sphere else _normalize
        x = norm(x)
        evals = {k: norm(v) for k, v in evals.items()}
    return StudyData(train_x=x, train_y=y, eval_sets=evals)
