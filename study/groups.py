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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property

import numpy as np

_NAME = re.compile(r"^([CD])(\d+)$")


@dataclass(frozen=True)
class Group:
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

    # ----- escnn -----------------------------------------------------------------
    def escnn_gspace(self, base: str = "R2"):
        """The escnn gspace with this group: on the plane, or with no base space."""
        from escnn import gspaces

        if base == "R2":
            if self.dihedral:
                return gspaces.flipRot2dOnR2(self.n)
            return gspaces.rot2dOnR2(self.n)
        if base == "none":
            from escnn import group as eg

            grp = eg.dihedral_group(self.n) if self.dihedral else eg.cyclic_group(self.n)
            return gspaces.no_base_space(grp)
        raise ValueError(f"unknown base space {base!r}")


def _stack(items, like, axis: int):
    if isinstance(like, np.ndarray):
        return np.stack(items, axis=axis)
    import torch

    return torch.stack(items, dim=axis)
