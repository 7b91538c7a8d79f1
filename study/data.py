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

from .config import DataConfig, StudyError
from .seeds import derive_seed


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
        tmp = path.with_name("." + path.name + ".tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "StudyData":
        with np.load(path) as z:
            evals = {k[len("eval__"):]: z[k] for k in z.files if k.startswith("eval__")}
            return cls(train_x=z["train_x"], train_y=z["train_y"], eval_sets=evals)


# ----- sources ---------------------------------------------------------------------------
def _digits(src, seed: int):
    from sklearn.datasets import load_digits

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
    from .groups import Group

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
    import torch
    import torch.nn.functional as F

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
    from sklearn.datasets import load_sample_images

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


def _normalize(x: np.ndarray) -> np.ndarray:
    """Per input: subtract its mean, scale to mean square 1. Invariant under any permutation
    of positions, so it commutes with every group action."""
    axes = tuple(range(1, x.ndim))
    x = x - x.mean(axis=axes, keepdims=True)
    rms = np.sqrt((x**2).mean(axis=axes, keepdims=True))
    return x / np.where(rms > 0, rms, 1.0)


def _labelled(src, seed: int, base: Path, group: str = "C4"):
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
        else:
            xe = _labelled(src, seed, base, group)[0]
        if len(xe) == 0:
            raise StudyError(f"data.eval.{ev.name}: the eval set has no inputs; give n > 0 or a file with images")
        if xe.shape[1:] != x.shape[1:]:
            raise StudyError(
                f"data.eval.{ev.name}: inputs have shape {xe.shape[1:]} but the training inputs {x.shape[1:]}; "
                "use the same image size (resize) and channels"
            )
        evals[ev.name] = xe
    if cfg.normalize == "per_image":
        x = _normalize(x)
        evals = {k: _normalize(v) for k, v in evals.items()}
    return StudyData(train_x=x, train_y=y, eval_sets=evals)
