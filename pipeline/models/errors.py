"""The one error type of the seed-checkpoint loader."""

from __future__ import annotations


class SeedFormatError(ValueError):
    """A seed release folder (config or checkpoint) that this loader cannot use faithfully.

    Messages always name the file and the key or reason, so a user can fix the folder.
    """
