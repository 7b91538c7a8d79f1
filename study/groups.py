"""Finite groups C<n> and D<n> and their exact actions on images and ring signals.

One convention for the whole project, chosen to match escnn so that escnn's field types,
`GeometricTensor.transform` and regular representations agree with ours:

- Elements are pairs ``(f, k)``: ``f`` in {0, 1} flips, ``k`` in 0..n-1 rotations by
  ``2 pi k / n``. The index of ``(f, k)`` is ``f * n + k`` (escnn's element order for
  ``rot2dOnR2(n)`` and ``flipRot2dOnR2(n)``).
- ``(f, k)`` acts as ``R^k F^f``: flip first, then rotate. Hence
  ``(f1, k1)(f2, k2) = (f1 ^ f2, k1 + (-1)^f1 k2 mod n)``.
- On an ``H x W`` image (last two axes) ``R`` is ``rot90`` by ``4/n`` quarter turns over
  axes (-2, -1) and ``F`` reverses the last axis, exactly as escnn transforms a trivial
  field. Only ``n`` dividing 4 acts exactly (by a pixel permutation) on a square grid.
- On a ring of ``m`` points (last axis) ``R`` shifts by ``m / n`` points,
  ``(R x)(i) = x(i - m/n)``, and ``(F x)(i) = x(-i)``. Exact whenever ``n`` divides ``m``.

Every action is a permutation ``perm`` of the flattened positions, applied as
``(L_g x).flat = x.flat[perm[g]]``, so it works on numpy arrays and torch tensors alike.

``orbit_rows`` is the one place that lays out a set expanded to its orbits (docs/theory.md §1):
row ``i |G| + g`` holds ``L_g x_i``, for ``C<n>``, ``D<n>`` and the logged rotations of SO(3).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch

from .seeds import derive_seed
from .sphere import dh_grid, random_rotations, rotate_signal

_NAME = re.compile(r"^([CD])(\d+)$")


class _Orbits:
    """Orbits of a batch of samples, from a group's ``orbit_image``/``orbit_ring`` and ``order``."""

    def orbit(self, x):
        """``[N, *shape] -> [N, |G|, *shape]`` with ``[:, g] = L_g x`` (images ``[C, H, W]``, rings ``[C, m]``)."""
        if x.ndim == 4:
            return self.orbit_image(x)
        if x.ndim == 3:
            return self.orbit_ring(x)
        raise ValueError(f"data: inputs must be images [N, C, H, W] or ring signals [N, C, m], got shape {tuple(x.shape)}")

    def orbit_rows(self, x):
        """``[N, *shape] -> [N |G|, *shape]``: row ``i |G| + g`` is ``L_g x_i`` (docs/theory.md §1)."""
        return self.orbit(x).reshape(x.shape[0] * self.order, *x.shape[1:])


@dataclass(frozen=True)
class Group(_Orbits):
    """The cyclic group ``C<n>`` or the dihedral group ``D<n>`` (order ``2n``)."""

    n: int
    dihedral: bool

    @classmethod
    def parse(cls, name: str) -> "Group":
        m = _NAME.match(str(name).strip())
        if not m:
            raise ValueError(f"unknown group {name!r}: use C<n> or D<n>, for example C4 or D4")
        n = int(m.group(2))
        if n < 1:
            raise ValueError(f"group order {name!r} must be at least 1: use C1 for the trivial group")
        return cls(n=n, dihedral=m.group(1) == "D")

    @property
    def name(self) -> str:
        return f"{'D' if self.dihedral else 'C'}{self.n}"

    def __str__(self) -> str:
        return self.name

    @property
    def order(self) -> int:
        return self.n * (2 if self.dihedral else 1)

    @cached_property
    def elements(self) -> list[tuple[int, int]]:
        flips = (0, 1) if self.dihedral else (0,)
        return [(f, k) for f in flips for k in range(self.n)]

    def index(self, f: int, k: int) -> int:
        return f * self.n + (k % self.n)

    @cached_property
    def mul(self) -> np.ndarray:
        """``mul[a, b]`` is the index of ``g_a g_b``."""
        table = np.empty((self.order, self.order), dtype=np.int64)
        for a, (f1, k1) in enumerate(self.elements):
            for b, (f2, k2) in enumerate(self.elements):
                table[a, b] = self.index(f1 ^ f2, k1 + (-1) ** f1 * k2)
        return table

    @cached_property
    def inverse(self) -> np.ndarray:
        return np.argmax(self.mul == 0, axis=1)

    # ----- exactness -------------------------------------------------------------
    def acts_exactly_on_grid(self) -> bool:
        """True when every element permutes the pixels of a square grid (n divides 4)."""
        return 4 % self.n == 0

    def acts_exactly_on_ring(self, m: int) -> bool:
        return m % self.n == 0

    # ----- permutations ----------------------------------------------------------
    def image_permutations(self, height: int, width: int) -> np.ndarray:
        """``perm[g]`` with ``(L_g x).reshape(..., H*W) = x.reshape(..., H*W)[..., perm[g]]``."""
        if not self.acts_exactly_on_grid():
            raise ValueError(
                f"group {self.name} does not act exactly on a pixel grid: use n in (1, 2, 4), "
                "or a ring signal, or basis 'escnn'"
            )
        if height != width and self.order > 1 and (self.n % 2 == 0 and self.n > 2):
            raise ValueError(f"group {self.name} needs square images, got {height}x{width}")
        idx = np.arange(height * width).reshape(height, width)
        perms = []
        for f, k in self.elements:
            img = idx[:, ::-1] if f else idx
            img = np.rot90(img, k * (4 // self.n), axes=(0, 1))
            perms.append(np.ascontiguousarray(img).reshape(-1))
        return np.stack(perms)

    def ring_permutations(self, m: int) -> np.ndarray:
        """``perm[g]`` with ``(L_g x)[..., i] = x[..., perm[g][i]]`` on a ring of ``m`` points."""
        if not self.acts_exactly_on_ring(m):
            raise ValueError(f"group {self.name} does not act exactly on a ring of {m} points: n must divide m")
        i = np.arange(m)
        shift = m // self.n
        perms = []
        for f, k in self.elements:
            j = (i - k * shift) % m  # rotate: x(i - k m/n)
            if f:
                j = (-j) % m  # then the flip inside: (F x)(j) = x(-j)
            perms.append(j)
        return np.stack(perms)

    # ----- actions ---------------------------------------------------------------
    def act_image(self, x, g: int):
        """``L_g x`` for images with the spatial axes last (numpy or torch)."""
        h, w = x.shape[-2], x.shape[-1]
        perm = self.image_permutations(h, w)[g]
        flat = x.reshape(*x.shape[:-2], h * w)
        return flat[..., perm].reshape(x.shape)

    def act_ring(self, x, g: int):
        """``L_g x`` for ring signals with the ring axis last (numpy or torch)."""
        return x[..., self.ring_permutations(x.shape[-1])[g]]

    def orbit_image(self, x):
        """``[..., C, H, W] -> [..., |G|, C, H, W]``: ``L_g x`` for every element."""
        return _stack([self.act_image(x, g) for g in range(self.order)], x, axis=-4)

    def orbit_ring(self, x):
        """``[..., C, m] -> [..., |G|, C, m]``."""
        return _stack([self.act_ring(x, g) for g in range(self.order)], x, axis=-3)


def _stack(items, like, axis: int):
    if isinstance(like, np.ndarray):
        return np.stack(items, axis=axis)
    return torch.stack(items, dim=axis)


# ----- SO(3): a continuous group, logged on a fixed sample of rotations --------------------
SO3_NAME = "SO3"
DEFAULT_SO3_ROTATIONS = 8


def group_name(name: str) -> str:
    """The canonical name of a group field: ``C<n>``, ``D<n>`` or ``SO3`` (also ``so3``, ``SO(3)``)."""
    if str(name).strip().upper().replace("(", "").replace(")", "") == SO3_NAME:
        return SO3_NAME
    try:
        return Group.parse(name).name
    except ValueError as e:
        if not str(e).startswith("unknown group"):
            raise
        raise ValueError(f"unknown group {name!r}: use C<n> or D<n> (for example C4, D4), or SO3") from None


@dataclass(frozen=True)
class SO3Group(_Orbits):
    """SO(3) acting on signals on the DH grid (``study.sphere``), ``(R s)(x) = s(R^-1 x)``.

    A continuous group has no finite orbit: eval inputs are logged on a fixed, seeded sample
    of ``rotations`` rotations, the identity first (so element 0 is the input itself, as
    for the finite groups), the others Haar-uniform from a seed that depends only on their
    number, so every model and every study with the same ``rotations`` logs the same
    rotations. ``order`` is that number, so the workers' and the analysis' orbit axis
    ``[.., |G|, ..]`` holds the logged rotations. Each is applied exactly by
    ``study.sphere.rotate_signal`` (SH coefficients times Wigner D, exact for signals of
    band limit ``< L`` on the ``2L x 2L`` grid).
    """

    rotations: int = DEFAULT_SO3_ROTATIONS

    dihedral = False
    continuous = True

    @property
    def name(self) -> str:
        return SO3_NAME

    def __str__(self) -> str:
        return SO3_NAME

    @property
    def order(self) -> int:
        return self.rotations

    @cached_property
    def matrices(self) -> np.ndarray:
        """The logged rotations ``[K, 3, 3]``, identity first (read-only)."""
        rest = random_rotations(self.rotations - 1, derive_seed("so3-logged-rotations", self.rotations))
        out = np.concatenate([np.eye(3)[None], rest])
        out.setflags(write=False)
        return out

    def acts_exactly_on_grid(self) -> bool:
        return False

    def acts_exactly_on_ring(self, m: int) -> bool:
        return False

    def rotate(self, x, R):
        """``R x`` for DH-grid signals ``[..., 2L, 2L]`` (numpy float64, or torch: back in its dtype/device).

        ``R [*b, 3, 3]`` broadcasts against ``x.shape[:-2]``.
        """
        h, w = x.shape[-2], x.shape[-1]
        if h != w or h % 2:
            raise ValueError(f"group SO3 acts on DH grids [2L, 2L], got {h}x{w}")
        if isinstance(x, np.ndarray):
            return rotate_signal(x, R, dh_grid(h // 2))

        out = rotate_signal(x.detach().cpu().to(torch.float64).numpy(), R, dh_grid(h // 2))
        return torch.as_tensor(out, dtype=x.dtype, device=x.device)

    def act_image(self, x, g: int):
        return self.rotate(x, self.matrices[g])

    def orbit_image(self, x):
        """``[..., C, 2L, 2L] -> [..., K, C, 2L, 2L]``: every logged rotation of every input."""
        R = self.matrices.reshape((1,) * (x.ndim - 3) + (self.rotations, 1, 3, 3))
        x = x[..., None, :, :, :]
        if isinstance(x, np.ndarray):
            return self.rotate(np.broadcast_to(x, x.shape[:-4] + (self.rotations,) + x.shape[-3:]), R)
        return self.rotate(x.expand(*x.shape[:-4], self.rotations, *x.shape[-3:]), R)

    def orbit_ring(self, x):
        raise ValueError("group SO3 acts on signals on the sphere (DH grids [C, 2L, 2L]), not on ring signals")


def parse_group(name: str, rotations: int | None = None):
    """``Group`` for ``C<n>``/``D<n>``, ``SO3Group(rotations)`` for ``SO3``."""
    name = group_name(name)
    if name == SO3_NAME:
        return SO3Group(rotations or DEFAULT_SO3_ROTATIONS)
    return Group.parse(name)
