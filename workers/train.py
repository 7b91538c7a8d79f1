"""Gradient descent of a whole ensemble, logging predictions on group orbits.

Loss ``L = (1/(2 N_train)) sum_i ||f(x_i) - y_i||^2`` (docs/models.md, "Training"), or the
cross-entropy (``loss="cross_entropy"``), learning rate ``eta``; step ``k`` is the function
after ``k`` updates (step 0: at initialisation). Each step takes the batch the augmentation
hands out: the full batch, or for SGD (``augment.Minibatches``) each member's own minibatch;
the losses recorded are those of the batch each step took.
At each logged step every member is evaluated on every input of every eval set and on
each element of its orbit; the writer receives ``[members, n, |G|, n_out]``.

Divergence: the loss of each step is kept on the device and checked every
``check_every`` steps and before each log, so the GPU is not stalled every step. The
first step whose parameters give a non-finite loss or prediction ends training; the
steps before it are the ones reached.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from study.groups import Group

from .augment import Augmentation
from .ensemble import Ensemble


class Writer(Protocol):
    def log(self, step: int, eval_set: str, preds: np.ndarray) -> None: ...


@dataclass
class OrbitInputs:
    """An eval set and its orbit, flattened for one forward pass: ``x`` is ``[n |G|, *shape]``, row ``i |G| + g``."""

    x: torch.Tensor
    n: int
    order: int


def orbit_inputs(group: Group, x: torch.Tensor) -> OrbitInputs:
    n = x.shape[0]
    return OrbitInputs(group.orbit_rows(x), n, group.order)


@dataclass
class TrainResult:
    status: str  # "done" or "diverged"
    steps_reached: int  # last step whose function was finite (== steps when done)
    losses: np.ndarray  # [k, M]: training loss at steps 0 .. k-1 (parameters before each update)


def train_gd(
    ensemble: Ensemble,
    augmentation: Augmentation,
    lr: float,
    steps: int,
    log_steps: list[int],
    eval_sets: dict[str, OrbitInputs],
    writer: Writer,
    check_every: int = 32,
    loss: str = "mse",
) -> TrainResult:
    """Train ``ensemble`` for ``steps`` GD steps on ``loss``, logging ``eval_sets`` at ``log_steps``."""
    log_at = sorted(set(int(s) for s in log_steps))
    if log_at and (log_at[0] < 0 or log_at[-1] > steps):
        raise ValueError(f"log_steps: must lie in 0..{steps}, got {log_at[0]}..{log_at[-1]}")
    log_at = set(log_at)
    losses = torch.empty(steps, ensemble.members, dtype=ensemble.dtype, device=ensemble.device)
    checked = 0  # losses[:checked] are known to be finite

    def first_bad(upto: int) -> int | None:
        """The first step below ``upto`` with a non-finite loss, checking only new steps."""
        nonlocal checked
        if upto <= checked:
            return None
        ok = torch.isfinite(losses[checked:upto]).all(dim=1).cpu()
        if bool(ok.all()):
            checked = upto
            return None
        return checked + int(torch.nonzero(~ok)[0])

    def stopped(bad_step: int) -> TrainResult:
        if bad_step == 0:
            raise FloatingPointError("the initial function is not finite: check the inputs and targets")
        return TrainResult("diverged", bad_step - 1, losses[:bad_step].cpu().numpy())

    for k in range(steps + 1):
        if k in log_at or k == steps:
            bad = first_bad(k)
            if bad is not None:
                return stopped(bad)
            if k in log_at:
                preds = {name: _orbit_predictions(ensemble, inputs) for name, inputs in eval_sets.items()}
                if not all(np.isfinite(p).all() for p in preds.values()):
                    return stopped(k)
                for name, p in preds.items():
                    writer.log(k, name, p)
            elif not _finite_on_train(ensemble, augmentation):
                return stopped(k)
        if k == steps:
            break
        batch = augmentation.next_batch()
        losses[k] = ensemble.gd_step(batch.x, batch.y, lr, batch.per_member, loss=loss)
        if (k + 1) % check_every == 0:
            bad = first_bad(k + 1)
            if bad is not None:
                return stopped(bad)
    return TrainResult("done", steps, losses.cpu().numpy())


def _orbit_predictions(ensemble: Ensemble, inputs: OrbitInputs) -> np.ndarray:
    out = ensemble.predict(inputs.x)  # [M, n |G|, n_out]
    return out.reshape(ensemble.members, inputs.n, inputs.order, -1).cpu().numpy()


def _finite_on_train(ensemble: Ensemble, augmentation: Augmentation) -> bool:
    """Whether the final function is finite on the training inputs (when the last step is not logged)."""
    return bool(torch.isfinite(ensemble.predict(augmentation.x)).all())
