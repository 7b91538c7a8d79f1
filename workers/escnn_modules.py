"""The escnn modules escnn lacks.

escnn's own layers cover convolution with its band-limited basis; this study also needs
mean group pooling (escnn's ``GroupPooling`` takes the max), erf, and layers whose filter
comes from an explicit basis tensor (``workers.layers``). They are written as escnn
``EquivariantModule`` s so they compose with escnn modules and its ``check_equivariance``.
"""

from __future__ import annotations

import torch

from study.escnn_types import enn

from .pointwise import phi


class PointwiseNonlin(enn.EquivariantModule):
    """``phi`` applied entry by entry; equivariant on fields whose group acts by permutations."""

    def __init__(self, in_type: "enn.FieldType", kind: str):
        super().__init__()
        for rep in in_type.representations:
            if "pointwise" not in rep.supported_nonlinearities:
                raise ValueError(f"nonlinearity: representation {rep.name} does not admit a pointwise {kind}")
        phi(kind, torch.zeros(1))  # validate the name early
        self.in_type = self.out_type = in_type
        self.kind = kind

    def forward(self, x: "enn.GeometricTensor") -> "enn.GeometricTensor":
        return enn.GeometricTensor(phi(self.kind, x.tensor), self.out_type, x.coords)

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
