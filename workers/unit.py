"""One work unit: members ``[member_start, member_stop)`` of a (model, width) ensemble,
trained together and logged through the writer. The Ray runner (``study``) calls
``run_unit`` inside a task and commits the writer's output.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import torch

from .augment import Minibatches, make_augmentation
from .ensemble import Ensemble, member_seeds
from .models import build_model, init_parameters
from .train import Writer, orbit_inputs, train_gd

TRAIN_SET = "train"  # eval-set name under which the training inputs are logged

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class UnitOutcome:
    status: str  # "done" or "diverged"
    steps_reached: int  # last step whose function was finite
    seconds: float
    device: str


def resolve_device(name: str) -> torch.device:
    """``auto``: CUDA when this process can see a GPU (Ray gave the task one), else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for but no GPU is visible to this process; use auto or cpu")
    return torch.device(name)


@contextlib.contextmanager
def reproducible():
    """Deterministic kernels, full-precision float32 (no TF32) and denormals flushed to zero
    for the block; restores the settings after (flushing to torch's default, off).

    Flushing: erf's derivative exp(-u^2) is tiny at the large pre-activations of
    sigma_w = 3 (|u| ~ 10), and the backward pass then computes with float32 denormals,
    which CPUs handle very slowly; measured on one core, a width-16 escnn C4 GCNN step took
    24 ms per member with denormals and 12 ms flushed. Values below 1e-38 change no
    logged prediction.
    """
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.backends.cudnn.benchmark,
    )
    # warn_only: a CUDA op without a deterministic variant should not abort a unit
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        torch.backends.cuda.matmul.allow_tf32 = saved[2]
        torch.backends.cudnn.allow_tf32 = saved[3]
        torch.backends.cudnn.benchmark = saved[4]


def run_unit(unit, data, writer: Writer) -> UnitOutcome:
    """Train the unit's members on ``data`` and log their orbit predictions through ``writer``.

    ``unit`` is a ``study.grid.UnitSpec``; ``data`` a ``study.data.StudyData``.
    """
    start = time.perf_counter()
    if TRAIN_SET in data.eval_sets:
        raise ValueError(f"eval_sets: the name {TRAIN_SET!r} is reserved for the training inputs; rename that eval set")
    device = resolve_device(unit.device)
    dtype = _DTYPES[unit.dtype]
    spec, group = unit.model, unit.model.group_obj
    with reproducible():
        module = build_model(spec, unit.width, tuple(data.input_shape), data.n_out)
        antithetic = spec.pairing == "antithetic"

        def seeds(purpose):
            return member_seeds(unit.study_seed, spec.name, unit.width, unit.member_start, unit.member_stop,
                                purpose, antithetic=antithetic)

        ensemble = Ensemble.from_seeds(module, seeds("init"), init_parameters, device, dtype, antithetic=antithetic)

        def tensor(a):  # a copy: the study's arrays may be read-only (memory-mapped or from Ray's store)
            return torch.tensor(a, dtype=dtype, device=device)

        x, y = tensor(data.train_x), tensor(data.train_y)
        augmentation = make_augmentation(spec.augmentation, group, x, y, seeds("augment"))
        if spec.optimizer == "sgd":
            augmentation = Minibatches(augmentation, spec.batch_size, seeds("sgd"))
        eval_sets = {TRAIN_SET: orbit_inputs(group, x)}
        eval_sets.update({name: orbit_inputs(group, tensor(v)) for name, v in data.eval_sets.items()})
        result = train_gd(ensemble, augmentation, unit.lr, unit.steps, list(unit.log_steps), eval_sets, writer,
                          loss=spec.loss)
    return UnitOutcome(result.status, result.steps_reached, time.perf_counter() - start, str(device))
