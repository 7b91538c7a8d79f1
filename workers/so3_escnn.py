"""The SO(3) layers of ``workers.so3`` as escnn ``EquivariantModule`` s: typed fields, checked equivariance.

``workers.so3`` holds features in the Fourier domain: per channel, coefficients ``f^l``
(``[2l+1, 2l+1]``, row-major, ``l < L``) on which a rotation acts by ``f^l -> D^l(R) f^l``,
and sphere signals by their SH coefficients ``s^l -> D^l(R) s^l``, with ``D`` from
``study.sphere``. Those are escnn fields of escnn's ``so3_group``: ``D^l(R_g)`` and escnn's
irrep ``psi_l(g)`` (``R_g = g.to('MAT')``) are the same representation in two bases,
``D^l(R_g) = Q_l psi_l(g) Q_l^T`` with ``Q_l`` orthogonal (solved once per degree from the
intertwining equations, exact to ~1e-15). So

- ``sh_field_type(C, L)``: per channel one ``psi_l`` per degree, change of basis ``Q_l``;
- ``fourier_field_type(C, L)``: per channel ``2l+1`` copies of ``psi_l`` per degree, change
  of basis ``kron(Q_l, I) P_l`` (``P_l`` reorders the copies into row-major ``f^l``);
- ``invariant_field_type(C)``: ``C`` trivial fields (the pooled features).

``EscnnSO3`` wraps a ``workers.so3`` layer between such types; the lifting layer takes SH
coefficients (a band-limited signal's exact description: grid samples of it do not carry
a representation of SO(3)) and synthesises the DH samples ``SO3Lift`` reads. The layers are
the same computation as in the trained models, so escnn's ``check_equivariance`` checks them.
"""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np
import torch

from study.sphere import dh_grid, euler_zyz, wigner_d

from .so3 import SO3Conv, SO3Lift, SO3Net, SO3Nonlin, SO3Pool

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # escnn warns that py3nj is missing (SO(3) Clebsch-Gordan speed only)
    from escnn import gspaces
    from escnn import nn as enn
    from escnn.group import Representation, so3_group

__all__ = ["EscnnSO3", "as_escnn", "fourier_field_type", "invariant_field_type", "intertwiner", "sh_field_type",
           "so3_gspace"]


@lru_cache(maxsize=None)
def so3_gspace():
    """escnn's SO(3) acting on features with no base space."""
    return gspaces.no_base_space(so3_group())


@lru_cache(maxsize=None)
def intertwiner(l: int) -> np.ndarray:
    """``Q_l`` (orthogonal) with ``D^l(R_g) Q_l = Q_l psi_l(g)`` for every element ``g``."""
    G = so3_group()
    n = 2 * l + 1
    # a few generic rotations determine Q_l (Schur: the commutant of an irreducible pair is 1-dim)
    angles = [(0.3, 1.1, -0.7), (2.0, 0.4, 1.3), (-1.2, 2.5, 0.2), (0.9, 1.9, 2.8)]
    els = [G.element(euler_zyz(*a), "MAT") for a in angles]
    rows = []
    for g in els:
        R = np.asarray(g.to("MAT"))
        D = wigner_d(l, R[None])[l][0]
        P = np.asarray(G.irrep(l)(g))
        rows.append(np.kron(np.eye(n), D) - np.kron(P.T, np.eye(n)))  # vec_F(D Q - Q P) = 0
    _, s, vt = np.linalg.svd(np.concatenate(rows))
    if s[-1] > 1e-9 or (len(s) > 1 and s[-2] < 1e-6):
        raise RuntimeError(f"no unique intertwiner between D^{l} and escnn's psi_{l} (singular values {s[-2:]})")
    Q = vt[-1].reshape(n, n, order="F")
    return Q * np.sqrt(n / np.sum(Q**2))  # orthogonal up to its sign


def _representation(name: str, irreps: list, cob: np.ndarray) -> Representation:
    G = so3_group()
    if name in G.representations:
        return G.representations[name]
    return Representation(G, name, irreps, cob, supported_nonlinearities=set())


def _irrep_id(l: int):
    return so3_group().irrep(l).id


@lru_cache(maxsize=None)
def _sh_rep(L: int) -> Representation:
    cob = np.zeros((L * L, L * L))
    for l in range(L):
        cob[l * l:(l + 1) ** 2, l * l:(l + 1) ** 2] = intertwiner(l)
    return _representation(f"eqntk_sh_{L}", [_irrep_id(l) for l in range(L)], cob)


@lru_cache(maxsize=None)
def _fourier_rep(L: int) -> Representation:
    size = sum((2 * l + 1) ** 2 for l in range(L))
    cob = np.zeros((size, size))
    irreps, at = [], 0
    for l in range(L):
        k = 2 * l + 1
        # the k copies of psi_l arrive one after another (copy n, row m at n k + m); f^l is
        # row-major (row m, column n at m k + n), and column n is the copy that D^l acts on
        P = np.zeros((k * k, k * k))
        for m in range(k):
            for n in range(k):
                P[m * k + n, n * k + m] = 1.0
        cob[at:at + k * k, at:at + k * k] = np.kron(intertwiner(l), np.eye(k)) @ P
        irreps += [_irrep_id(l)] * k
        at += k * k
    return _representation(f"eqntk_fourier_{L}", irreps, cob)


def sh_field_type(channels: int, L: int) -> "enn.FieldType":
    """``channels`` band-limited sphere signals as SH coefficients ``[C, L^2]`` (index ``l^2 + l + m``)."""
    return enn.FieldType(so3_gspace(), [_sh_rep(L)] * channels)


def fourier_field_type(channels: int, L: int) -> "enn.FieldType":
    """``channels`` band-limited functions on SO(3) as packed coefficients ``[C, fourier_size(L)]``."""
    return enn.FieldType(so3_gspace(), [_fourier_rep(L)] * channels)


def invariant_field_type(channels: int) -> "enn.FieldType":
    return enn.FieldType(so3_gspace(), [so3_gspace().trivial_repr] * channels)


class EscnnSO3(enn.EquivariantModule):
    """A ``workers.so3`` layer between escnn field types (see the module docstring)."""

    def __init__(self, layer: torch.nn.Module, in_type: "enn.FieldType", out_type: "enn.FieldType"):
        super().__init__()
        self.layer, self.in_type, self.out_type = layer, in_type, out_type
        self.channels = len(in_type)
        if isinstance(layer, SO3Lift):
            L_in = in_type.representations[0].size  # L^2 coefficients per channel
            L_in = int(round(np.sqrt(L_in)))
            # SH coefficients -> DH samples of the band-limited signal (SO3Lift's input)
            g = dh_grid(L_in)
            self.register_buffer("synth", torch.tensor(g.harmonics(L_in - 1).reshape(-1, L_in * L_in).T),
                                 persistent=False)
            self.grid_side = 2 * L_in

    @classmethod
    def lift(cls, layer: SO3Lift, channels: int, L_in: int) -> "EscnnSO3":
        return cls(layer, sh_field_type(channels, L_in), fourier_field_type(layer.width, layer.L))

    @classmethod
    def conv(cls, layer: SO3Conv, width: int) -> "EscnnSO3":
        return cls(layer, fourier_field_type(layer.C, layer.L), fourier_field_type(width, layer.L))

    @classmethod
    def nonlin(cls, layer: SO3Nonlin, channels: int, L_in: int, L_out: int) -> "EscnnSO3":
        return cls(layer, fourier_field_type(channels, L_in), fourier_field_type(channels, L_out))

    @classmethod
    def pool(cls, layer: SO3Pool, channels: int, L_in: int) -> "EscnnSO3":
        return cls(layer, fourier_field_type(channels, L_in), invariant_field_type(channels))

    def forward(self, x: "enn.GeometricTensor") -> "enn.GeometricTensor":
        t = x.tensor
        if self.in_type.size > self.channels:  # [N, C, per-channel coefficients]; invariant fields stay [N, C]
            t = t.reshape(t.shape[0], self.channels, -1)
        if isinstance(self.layer, SO3Lift):
            t = (t @ self.synth.to(t.dtype)).reshape(*t.shape[:2], self.grid_side, self.grid_side)
        out = self.layer(t)
        return enn.GeometricTensor(out.reshape(out.shape[0], -1), self.out_type)

    def evaluate_output_shape(self, input_shape):
        return (input_shape[0], self.out_type.size)


def as_escnn(net: SO3Net) -> "enn.SequentialModule":
    """``net``'s own layers (shared parameters) as an escnn ``SequentialModule`` from SH
    coefficients ``[N, C L_in^2]`` to invariant outputs; equal to ``net`` on the band-limited
    signals those coefficients describe."""
    s, b, width = net.spec, net.spec.bands, net.width
    layers = [EscnnSO3.lift(net.lift, s.channels, s.L_in)]
    for k, (nl, conv) in enumerate(zip(net.nonlins, net.convs)):
        layers += [EscnnSO3.nonlin(nl, width, b[k], b[k + 1]), EscnnSO3.conv(conv, width)]
    layers.append(EscnnSO3.pool(net.pool, width, b[-1]))
    layers.append(EscnnSO3(net.readout, invariant_field_type(width), invariant_field_type(s.outputs)))
    return enn.SequentialModule(*layers)
