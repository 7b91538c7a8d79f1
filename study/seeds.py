"""Seeds that depend only on what they seed, never on how work is split into units.

Member ``j`` of the (model, width) ensemble gets the same initial parameters and the same
augmentation draws whichever unit trains it, so a rerun with another ``members_per_unit``
or after a crash gives the same numbers.
"""

from __future__ import annotations

import hashlib


def derive_seed(*parts: object) -> int:
    """A 63-bit seed from any printable parts (stable across processes and machines)."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


def member_seed(study_seed: int, model_name: str, width: int, member: int, purpose: str = "init") -> int:
    """Seed of one ensemble member; ``purpose`` separates streams (``init``, ``augment``, ``sgd``)."""
    return derive_seed("member", study_seed, model_name, width, member, purpose)
