"""Our groups in escnn's vocabulary: gspaces, field types, group elements, and a numerical
fix escnn needs to build some groups.

The finite models (``workers``) build escnn modules on these field types; the filter bases
(``study.bases``) sample escnn's own basis from them for the analytic kernels too.
"""

from __future__ import annotations

import hashlib
import warnings
from functools import lru_cache

import numpy as np
import scipy.linalg
from scipy.sparse import linalg as slinalg

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # escnn warns that py3nj is missing; we never need it
    import escnn
    import escnn.group._numerical as _escnn_numerical
    from escnn import group as eg
    from escnn import gspaces
    from escnn import nn as enn
    from escnn.group.representation import build_from_discrete_group_representation

from study.groups import Group

__all__ = [
    "enn",
    "gspace",
    "trivial_type",
    "regular_type",
    "permutation_type",
    "orbit_field_type",
    "escnn_element",
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
        k = min(A.shape) - 1
        _, s, vh = slinalg.svds(A, k=k)
    else:
        _, s, vh = scipy.linalg.svd(np.asarray(A), full_matrices=False)
    return np.transpose(np.compress(s <= eps, vh, axis=0))


_escnn_numerical.null = _null_dense  # find_intertwiner_basis_sylvester looks it up here


# ----- gspaces and field types ------------------------------------------------------------
@lru_cache(maxsize=None)
def gspace(group: Group, base: str = "R2"):
    """escnn gspace of ``group`` on the plane (``R2``) or with no base space (``none``)."""
    if base == "R2":
        return gspaces.flipRot2dOnR2(group.n) if group.dihedral else gspaces.rot2dOnR2(group.n)
    if base == "none":
        grp = eg.dihedral_group(group.n) if group.dihedral else eg.cyclic_group(group.n)
        return gspaces.no_base_space(grp)
    raise ValueError(f"unknown base space {base!r}")


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
