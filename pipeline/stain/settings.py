"""The `stain_normalization` table of a dataset, as the stage's settings."""

from __future__ import annotations

from dataclasses import dataclass

METHODS = ("macenko", "vahadane", "reinhard")


@dataclass(frozen=True)
class StainSettings:
    """`datasets.<name>.stain_normalization` (the schema describes every key)."""

    method: str
    target: str  # an H&E image or a folder of patch images, absolute after pipeline.config
    min_stained_fraction: float = 0.1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0 <= self.min_stained_fraction <= 1:
            raise ValueError(f"min_stained_fraction must be between 0 and 1, got {self.min_stained_fraction}")
