"""The kinds of study, one ``StudyKind`` each (``base``), by the ``kind`` a study file names.

    ensemble            finite ensembles against the analytic NTK (``ensemble``; the default)
    kernel_regression   infinite-width NTK/NNGP regression learning curves (``regression``)

``study.config.KIND_SCHEMAS`` holds each kind's study-file schema under the same names.
"""

from __future__ import annotations

from pathlib import Path

from study.config import StudyError, load_study

from .base import RunOptions, StudyKind, kind_name_of_dir
from .ensemble import EnsembleKind
from .regression import RegressionKind

KINDS: dict[str, StudyKind] = {k.name: k for k in (EnsembleKind(), RegressionKind())}

__all__ = ["KINDS", "RunOptions", "StudyKind", "kind_of_dir", "kind_of_study"]


def kind_of_study(path: Path) -> StudyKind:
    """The kind of a study file (which is validated on the way; bad input raises StudyError)."""
    return KINDS[load_study(path).kind]


def kind_of_dir(out: Path) -> StudyKind:
    """The kind of the study in a results directory, as its study.json records it."""
    name = kind_name_of_dir(out)
    if name not in KINDS:
        raise StudyError(f"DIR: {out}/study.json records kind {name!r}, which this eqntk does not know; "
                         f"use an eqntk that has it")
    return KINDS[name]
