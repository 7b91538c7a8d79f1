"""Files that appear whole or not at all.

Every file eqntk writes (parts, records, inputs, caches, tables, plots, the report) goes to a
temp file beside its target, is flushed to disk and renamed onto the target, so a reader (or a
rerun after a kill) sees the old file, the new one, or none, never half of one. Temp names
start with ``.`` and contain ``.tmp``: ``ResultStore.clean_temp_files`` finds the ones a killed
process left behind.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path

import numpy as np

__all__ = ["atomic_path", "atomic_savez", "atomic_write"]


@contextlib.contextmanager
def atomic_path(path: os.PathLike | str):
    """A temp path beside ``path`` to write to; synced and renamed onto ``path`` when the block
    succeeds, removed when it fails. The temp name keeps the suffix, so writers that infer the
    format from it (``savefig``) still do."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp{path.suffix}")
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: os.PathLike | str, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_savez(path: os.PathLike | str, arrays: dict) -> None:
    """``np.savez`` of ``arrays`` at ``path`` exactly (no ``.npz`` appended), atomically."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
