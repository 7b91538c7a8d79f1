"""escnn glue: field types, a numerical fix for escnn, and the escnn modules escnn lacks.

escnn's own layers cover convolution with its band-limited basis; this study also needs
mean group pooling (escnn's ``GroupPooling`` takes the max), erf, and layers whose filter
comes from an explicit basis tensor (``workers.layers``). They are written as escnn
``EquivariantModule`` s so they compose with escnn modules and its ``check_equivariance``.
"""

from __future__ import annotations

import hashlib
import warnings
from functools import lru_cache

import numpy as np
import torch

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # escnn warns that py3nj is missing; we never need it
    import escnn
    import escnn.group._numerical as _escnn_numerical
    from escnn import nn as enn
    from escnn.group.representation import build_from_discrete_group_representation

from study.groups import Group

from .pointwise import phi

__all__ = [
    "enn",
    "gspace",
    "trivial_type",
    "regular_type",
    "permutation_type",
    "orbit_field_type",
    "escnn_element",
    "PointwiseNonlin",
    "GroupMeanPool",
]


# ----- escnn fix ---------------------------------------------------------------------------
def _null_dense(A, use_sparse: bool, eps: float = 1e-12) -> np.ndarray:
    """escnn's ``null`` without sklearn's ``randomized_svd``.

    escnn 1.0.11 hands an ``np.matrix`` to sklearn's ``randomized_svd``, which current
    scikit-learn rejects (TypeError), so every group needing numerical Clebsch-Gordan
    coefficients (e.g. ``flipRot2dOnR2(8)``) fails to build. escnn asks for all
    ``min(A.shape)`` components, i.e. a full SVD, so LAPACK's deterministic SVD computes the
    same null space (and the same one every run, unlike ``random_state=None``).
    """
    if use_sparse:
        from scipy.sparse import linalg as slinalg

        k = min(A.shape) - 1
        _, s, vh = slinalg.svds(A, k=k)
    else:
        import scipy.linalg

        _, s, vh = scipy.linalg.svd(np.asarray(A), full_matrices=False)
    return np.transpose(np.compress(s <= eps, vh, axis=0))


_escnn_numerical.null = _null_dense  # find_intertwiner_basis_sylvester looks it up here


# ----- gspaces and field types ------------------------------------------------------------
@lru_cache(maxsize=None)
def gspace(group: Group, base: str = "R2"):
    """escnn gspace of ``group`` on the plane (``R2``) or with no base space (``none``)."""
    return group.escnn_gspace(base)


def trivial_type(group: Group, fields: int, base: str = "R2") -> "enn.FieldType":
    gs = gspace(group, base)
    return enn.FieldType(gs, [gs.trivial_repr] * fields)


def regular_type(group: Group, fields: int, base: str = "R2") -> "enn.FieldType":
    gs = gspace(group, base)
    return enn.FieldType(gs, [gs.regular_repr] * fields)


def escnn_element(group: Group, g: int):
    """The escnn group element with our index ``g`` (the same order, see ``study.groups``)."""
    return list(gspace(group, "none").fibergroup.elements)[g]


def _orbits(perm: np.ndarray) -> list[np.ndarray]:
    """Orbits of the positions, each listed as ``perm[g][x0]`` in order of first appearance."""
    seen = np.zeros(perm.shape[1], dtype=bool)
    orbits = []
    for x0 in range(perm.shape[1]):
        if not seen[x0]:
            pts = list(dict.fromkeys(int(p) for p in perm[:, x0]))
            seen[pts] = True
            orbits.append(np.array(pts))
    return orbits


@lru_cache(maxsize=None)
def _small_permutation_repr(group: Group, matrices_bytes: bytes, size: int):
    """escnn's own decomposition of a transitive permutation representation (size <= |G|)."""
    G = gspace(group, "none").fibergroup
    name = f"eqntk_orbit_{group.name}_{hashlib.sha1(matrices_bytes).hexdigest()[:16]}"
    if name in G.representations:
        return G.representations[name]
    mats = np.frombuffer(matrices_bytes, dtype=np.float64).reshape(group.order, size, size)
    return build_from_discrete_group_representation(
        {el: mats[g] for g, el in enumerate(G.elements)}, name, G, ["pointwise"]
    )


def _orbit_reprs(group: Group, perm: np.ndarray):
    """Per orbit: its positions and the escnn representation by which it transforms."""
    out = []
    for pts in _orbits(perm):
        n = len(pts)
        where = {int(p): i for i, p in enumerate(pts)}
        mats = np.zeros((group.order, n, n))
        for g in range(group.order):
            for i, p in enumerate(pts):
                mats[g, i, where[int(perm[g, p])]] = 1.0  # (M_g v)_i = v at perm[g][pts[i]]
        out.append((pts, _small_permutation_repr(group, mats.tobytes(), n)))
    return out


def orbit_field_type(group: Group, perm: np.ndarray) -> tuple["enn.FieldType", np.ndarray]:
    """The permutation representation split into one field per orbit.

    Returns the field type and ``order``: field-type component ``i`` is input position
    ``order[i]``. escnn's basis between these fields equals its basis for the single
    representation of ``permutation_type`` (same change of basis, block by block).
    """
    parts = _orbit_reprs(group, np.asarray(perm, dtype=np.int64))
    ftype = enn.FieldType(gspace(group, "none"), [rep for _, rep in parts])
    return ftype, np.concatenate([pts for pts, _ in parts])


@lru_cache(maxsize=None)
def _permutation_repr(group: Group, perm_bytes: bytes, d: int):
    """The permutation representation ``v -> v[perm[g]]`` as one escnn representation.

    escnn's numerical decomposition needs a ``(|G| d^2) x d^2`` Sylvester system, far too
    large for an image (d ~ 10^3), so the change of basis is assembled orbit by orbit:
    each orbit is a small transitive permutation representation that escnn decomposes
    itself, and the full change of basis is their block sum placed at the orbit's positions.
    """
    perm = np.frombuffer(perm_bytes, dtype=np.int64).reshape(group.order, d)
    G = gspace(group, "none").fibergroup
    name = f"eqntk_perm_{group.name}_{d}_{hashlib.sha1(perm_bytes).hexdigest()[:16]}"
    if name in G.representations:
        return G.representations[name]
    irreps: list = []
    cob = np.zeros((d, d))
    cob_inv = np.zeros((d, d))
    col = 0
    for pts, small in _orbit_reprs(group, perm):
        n = len(pts)
        cob[np.ix_(pts, np.arange(col, col + n))] = small.change_of_basis
        cob_inv[np.ix_(np.arange(col, col + n), pts)] = small.change_of_basis_inv
        irreps += list(small.irreps)
        col += n
    return escnn.group.Representation(G, name, irreps, cob, ["pointwise"], change_of_basis_inv=cob_inv)


def permutation_type(group: Group, perm: np.ndarray) -> "enn.FieldType":
    """One field on ``no_base_space(G)`` transforming by the permutations ``perm`` [|G|, d].

    escnn decomposes it into irreps numerically (its change of basis is orthogonal for
    permutation matrices); the representation's matrices are exactly ours.
    """
    perm = np.ascontiguousarray(perm, dtype=np.int64)
    rep = _permutation_repr(group, perm.tobytes(), perm.shape[1])
    return enn.FieldType(gspace(group, "none"), [rep])


# ----- modules escnn lacks -----------------------------------------------------------------
apply_pointwise = phi  # the one definition, workers.pointwise


class PointwiseNonlin(enn.EquivariantModule):
    """``phi`` applied entry by entry; equivariant on fields whose group acts by permutations."""

    def __init__(self, in_type: "enn.FieldType", kind: str):
        super().__init__()
        for rep in in_type.representations:
            if "pointwise" not in rep.supported_nonlinearities:
                raise ValueError(f"nonlinearity: representation {rep.name} does not admit a pointwise {kind}")
        apply_pointwise(kind, torch.zeros(1))  # validate the name early
        self.in_type = self.out_type = in_type
        self.kind = kind

    def forward(self, x: "enn.GeometricTensor") -> "enn.GeometricTensor":
        return enn.GeometricTensor(apply_pointwise(self.kind, x.tensor), self.out_type, x.coords)

    def evaluate_output_shape(self, input_shape):
        return input_shape


class GroupMeanPool(enn.EquivariantModule):
    """Mean over the group index of regular fields: ``width`` regular -> ``width`` trivial.

    Channel ``c * |G| + g`` holds field ``c`` at element ``g`` (escnn's regular fields).
    """

    def __init__(self, in_type: "enn.FieldType"):
        super().__init__()
        reps = in_type.representations
        order = in_type.fibergroup.order()
        if any(r.name != "regular" or r.size != order for r in reps):
            raise ValueError("group pooling: input must be regular fields")
        self.in_type = in_type
        gs = in_type.gspace
        self.out_type = enn.FieldType(gs, [gs.trivial_repr] * len(reps))
        self.order = order

    def forward(self, x: "enn.GeometricTensor") -> "enn.GeometricTensor":
        t = x.tensor
        fields = self.out_type.size
        pooled = t.reshape(t.shape[0], fields, self.order, *t.shape[2:]).mean(dim=2)
        return enn.GeometricTensor(pooled, self.out_type, x.coords)

    def evaluate_output_shape(self, input_shape):
        return (input_shape[0], self.out_type.size, *input_shape[2:])
