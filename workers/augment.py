"""Training-set augmentation by the model's group (docs/models.md, "Augmentation").

Every transformed input is an exact permutation of the original (``study.groups``), so
``full_orbit`` and ``random`` never interpolate. Each augmentation hands the trainer one
full batch per step: either one batch shared by all members, or (``random``) one batch per
member, since members draw their own group elements. ``Minibatches`` wraps any of them for
SGD: each member then takes its own minibatch of that full batch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from study.groups import Group
from study.sphere import dh_grid, isht, random_rotations, rotate_coeffs, sht


@dataclass
class Batch:
    """One full training batch: ``x`` is ``[B, *shape]`` (shared) or ``[M, B, *shape]`` (per member)."""

    x: torch.Tensor
    # [B, n_out], shared: augmentation never changes a target; [M, B, n_out] for minibatches
    # (each member samples its own rows)
    y: torch.Tensor
    per_member: bool


class NoAugmentation:
    """Train on the ``N`` samples as given.

    Every augmentation keeps the original inputs as ``x`` (``[N, *shape]``) and hands out
    one full batch per step from ``next_batch()``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x = x
        self._batch = Batch(x, y, per_member=False)

    def next_batch(self) -> Batch:
        return self._batch


class FullOrbit:
    """All ``|G| N`` samples ``(L_g x_i, y_i)``, sample-major: row ``i |G| + g`` is ``L_g x_i``."""

    def __init__(self, group: Group, x: torch.Tensor, y: torch.Tensor):
        self.x = x
        xs = group.orbit_rows(x)
        ys = y.repeat_interleave(group.order, dim=0)
        self._batch = Batch(xs, ys, per_member=False)

    def next_batch(self) -> Batch:
        return self._batch


class RandomOrbit:
    """Each step, each member replaces each sample by ``L_g x_i`` with ``g`` uniform and fresh.

    Member ``j`` draws from its own CPU generator seeded by ``seeds[j]``, one draw of ``N``
    elements per step, so its sequence does not depend on the device or on which other
    members share its unit.
    """

    def __init__(self, group: Group, x: torch.Tensor, y: torch.Tensor, seeds: Sequence[int]):
        self.x = x
        self.order = group.order
        self._orbit = group.orbit(x)  # [N, |G|, *shape], on x's device
        self._rows = torch.arange(x.shape[0], device=x.device)
        self._y = y
        self._generators = [torch.Generator().manual_seed(int(s)) for s in seeds]

    def draw(self) -> torch.Tensor:
        """The next group elements, ``[M, N]`` (int64, CPU)."""
        n = self._rows.numel()
        return torch.stack([torch.randint(self.order, (n,), generator=gen) for gen in self._generators])

    def next_batch(self) -> Batch:
        g = self.draw().to(self._rows.device)
        return Batch(self._orbit[self._rows, g], self._y, per_member=True)  # [M, N, *shape]


class Minibatches:
    """SGD: each step, each member trains on ``batch_size`` distinct samples of the augmentation's batch.

    The full batch is that of ``augmentation``: the ``N`` samples (``none``), the ``|G| N``
    augmented samples (``full_orbit``), or the ``N`` samples each turned by a fresh group
    element (``random``: the elements are drawn as without minibatches, one per sample, and
    the minibatch picks its samples' rows). Member ``j`` draws its rows from its own CPU
    generator seeded by ``seeds[j]`` (uniformly without replacement, then sorted), so its
    sequence depends neither on the device nor on which members share its unit, and with
    ``batch_size`` equal to the whole batch every step takes every row in order, i.e. the
    full-batch step.
    """

    def __init__(self, augmentation: "Augmentation", batch_size: int, seeds: Sequence[int]):
        self.augmentation = augmentation
        self.x = augmentation.x
        self.batch_size = int(batch_size)
        self._generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
        if not self._generators:
            raise ValueError("optimizer: sgd needs one seed per member")
        pool = augmentation.next_batch() if isinstance(augmentation, (NoAugmentation, FullOrbit)) else None
        self.pool_size = len(pool.y) if pool is not None else augmentation.x.shape[0]
        if not 1 <= self.batch_size <= self.pool_size:
            raise ValueError(
                f"batch_size: {self.batch_size} must lie in 1..{self.pool_size}, the samples one step can draw from"
            )

    def draw(self) -> torch.Tensor:
        """The next rows of every member's minibatch, ``[M, batch_size]`` (int64, CPU, sorted per member)."""
        return torch.stack(
            [torch.randperm(self.pool_size, generator=gen)[: self.batch_size].sort().values for gen in self._generators]
        )

    def next_batch(self) -> Batch:
        full = self.augmentation.next_batch()  # random augmentation draws its elements here
        rows = self.draw().to(full.y.device)
        if full.per_member:  # [M, P, *shape]: member j takes its rows of its own batch
            x = full.x[torch.arange(rows.shape[0], device=rows.device)[:, None], rows]
        else:
            x = full.x[rows]
        return Batch(x, full.y[rows], per_member=True)  # [M, B, *shape], [M, B, n_out]


class RandomRotations:
    """SO(3) (``study.groups.SO3Group``): each step, each member replaces each sample by ``R x_i``
    with ``R`` Haar-uniform and fresh.

    Vectorised: the SH coefficients of the ``N`` inputs (degrees ``< L``, exact for the
    band-limited study data) are computed once; each step the ``M N`` rotations are drawn,
    their Wigner matrices computed at once (``study.sphere.wigner_d``), the coefficients
    rotated and synthesised on the grid, all in float64, then cast to ``x``'s dtype. Member
    ``j`` draws from its own numpy generator seeded by ``seeds[j]``, ``N`` rotations per step
    (``study.sphere.random_rotations``), so its sequence depends neither on the device nor on
    the members sharing its unit.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, seeds: Sequence[int]):
        self.x = x
        h = x.shape[-1]
        if x.ndim != 4 or x.shape[-2] != h or h % 2:
            raise ValueError(f"augmentation: SO3 rotates signals on DH grids [N, C, 2L, 2L], got shape {tuple(x.shape)}")
        self.L = h // 2
        self._grid = dh_grid(self.L)
        self._coeffs = sht(x.detach().cpu().to(torch.float64).numpy(), self._grid)  # [N, C, L^2]
        self._y = y
        self._generators = [np.random.default_rng(int(s)) for s in seeds]

    def draw(self):
        """The next rotations, ``[M, N, 3, 3]`` (numpy float64)."""
        n = self._coeffs.shape[0]
        return np.stack([random_rotations(n, gen) for gen in self._generators])

    def rotated(self, R) -> torch.Tensor:
        """``R[m, i] x_i`` for rotations ``[M, N, 3, 3]``: ``[M, N, C, 2L, 2L]`` in ``x``'s dtype and device."""
        out = isht(rotate_coeffs(self._coeffs[None], R[:, :, None]), self._grid)
        return torch.as_tensor(out, dtype=self.x.dtype, device=self.x.device)

    def next_batch(self) -> Batch:
        return Batch(self.rotated(self.draw()), self._y, per_member=True)


Augmentation = NoAugmentation | FullOrbit | RandomOrbit | RandomRotations | Minibatches


def make_augmentation(
    kind: str, group: Group, x: torch.Tensor, y: torch.Tensor, seeds: Sequence[int] = ()
) -> Augmentation:
    """The augmentation ``kind`` (``none``, ``full_orbit``, ``random``); ``seeds`` (one per member) for ``random``."""
    if kind == "none":
        return NoAugmentation(x, y)
    if getattr(group, "continuous", False):
        if kind == "full_orbit":
            raise ValueError(f"augmentation: full_orbit needs a finite orbit and {group.name} has none; use random")
        if kind == "random":
            if not seeds:
                raise ValueError("augmentation: random needs one seed per member")
            return RandomRotations(x, y, seeds)
    if kind == "full_orbit":
        return FullOrbit(group, x, y)
    if kind == "random":
        if not seeds:
            raise ValueError("augmentation: random needs one seed per member")
        return RandomOrbit(group, x, y, seeds)
    raise ValueError(f"augmentation: unknown kind {kind!r}; use none, full_orbit or random")
