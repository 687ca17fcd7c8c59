"""The config's `viewer:` table (defaults as in pipeline/schemas/workflow_config.schema.yaml)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViewerSettings:
    """tile_size and overlap: the Deep Zoom tiles (254 + 2 x 1 overlap: 256 px JPEGs, as OpenSlide's
    own deep-zoom server); jpeg_quality: of those JPEGs; thumbnail_size: the index page's images."""

    tile_size: int = 254
    overlap: int = 1
    jpeg_quality: int = 90
    thumbnail_size: int = 256

    def __post_init__(self) -> None:
        if self.tile_size < 1 or self.overlap < 0 or self.thumbnail_size < 1:
            raise ValueError("tile_size and thumbnail_size must be positive, overlap at least 0")
        if not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality {self.jpeg_quality}: expected 1 to 100")
