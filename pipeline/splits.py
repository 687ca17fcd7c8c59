"""Which patches are held out of training, so that sampling and evaluation condition on unseen ones.

Two rules, both pure functions of names (no split file to keep in sync):

- every patch of a held-out input (a whole slide or GeoTIFF: the honest split, since patches of
  one slide share its stain, scanner and patient);
- from the other inputs, a fraction of patches chosen by a hash of the patch key, which is stable
  across runs, machines and re-tiling with the same settings.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable


def key_position(key: str) -> float:
    """A uniform number in [0, 1) fixed by the key (the first 8 bytes of its SHA-256)."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_held_out(key: str, fraction: float) -> bool:
    """True for about `fraction` of all keys; a key held out at fraction f stays held out above f."""
    return fraction > 0 and key_position(key) < fraction


def held_out_mask(keys: Iterable[str], fraction: float) -> list[bool]:
    return [is_held_out(key, fraction) for key in keys]
