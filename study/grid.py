"""Grid expansion: a study becomes work units with stable ids.

A unit trains members ``[member_start, member_stop)`` of one (model, width, lr) ensemble.
Its id hashes everything that determines its numbers (the resolved spec and the data
digest), so the same study on the same data always yields the same ids, and a changed
field yields new ones.
"""

from __future__ import annotations

import hashlib
import json
from typing import Literal

from pydantic import BaseModel, ConfigDict

from .config import StudyConfig
from .spec import ModelSpec


class UnitSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    unit_id: str
    study_seed: int
    model: ModelSpec
    width: int
    member_start: int
    member_stop: int
    lr: float
    steps: int
    log_steps: list[int]
    dtype: Literal["float32", "float64"]
    device: Literal["auto", "cpu", "cuda"]
    store_members: bool

    @property
    def members(self) -> int:
        return self.member_stop - self.member_start


def unit_id(fields: dict, data_digest: str) -> str:
    text = json.dumps({"spec": fields, "data": data_digest}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def expand(cfg: StudyConfig, data_digest: str) -> list[UnitSpec]:
    """All units of the study, in a stable order (model, width, lr, member range)."""
    units = []
    for model in cfg.model_specs:
        for width in cfg.widths_of(model.name):
            for lr in cfg.lrs_of(model.name):
                members = cfg.ensemble_size_of(model.name)
                size = min(cfg.unit_size, members)
                for start in range(0, members, size):
                    fields = dict(
                        study_seed=cfg.seed,
                        model=model,
                        width=width,
                        member_start=start,
                        member_stop=min(start + size, members),
                        lr=float(lr),
                        steps=cfg.steps,
                        log_steps=cfg.resolved_log_steps,
                        dtype=cfg.dtype,
                        device=cfg.device,
                        store_members=cfg.store_members,
                    )
                    uid = unit_id({**fields, "model": model.model_dump()}, data_digest)
                    units.append(UnitSpec(unit_id=uid, **fields))
    return units
