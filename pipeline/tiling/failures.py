"""Typed reasons why an input produced no patches."""

from __future__ import annotations

import enum
import math
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError


class Reason(str, enum.Enum):
    NOT_FOUND = "not_found"  # the path does not exist
    EMPTY_FILE = "empty_file"  # zero bytes
    OPEN_FAILED = "open_failed"  # the reader does not recognise or cannot parse the file
    READ_FAILED = "read_failed"  # opened, but pixel data is missing or corrupt (truncated file)
    NO_MPP = "no_mpp"  # no level-0 resolution in metadata, tags or override table
    BAD_MPP_OVERRIDES = "bad_mpp_overrides"  # the configured mpp_overrides table is missing or malformed
    ABSURD_MPP = "absurd_mpp"  # a resolution is present but physically implausible
    TOO_SMALL = "too_small"  # the image is smaller than one patch at the target resolution
    WOULD_UPSAMPLE = "would_upsample"  # the target is finer than the source by more than max_upsample
    NO_TISSUE = "no_tissue"  # tiling kept no patch (all background, or all nodata)
    UNSUPPORTED_BANDS = "unsupported_bands"  # configured bands missing from an aerial image
    UNSUPPORTED_DTYPE = "unsupported_dtype"  # aerial pixels that are not 8-bit
    NO_CRS = "no_crs"  # an aerial image without a coordinate reference system
    CRS_IN_DEGREES = "crs_in_degrees"  # geographic CRS: the ground sample distance is not in metres
    CRS_NOT_GROUND_METRES = "crs_not_ground_metres"  # projected, but map units far from ground metres, no known fix
    TOO_LARGE = "too_large"  # the file claims sizes (image, tile, read) past the tiler's bounds: refused unread
    BAD_GEOREFERENCE = "bad_georeference"  # a geotransform or CRS that is non-finite, degenerate, mirrored or unusable
    OUT_OF_MEMORY = "out_of_memory"  # tiling the input needed more memory than its limit
    READER_CRASHED = "reader_crashed"  # the process tiling the input died (a signal) or left no status
    UNEXPECTED_ERROR = "unexpected_error"  # a reader raised something unforeseen: a bug to report

    @property
    def description(self) -> str:
        """The reason in plain words, for people reading the report."""
        return _DESCRIPTIONS[self]


_DESCRIPTIONS = {
    Reason.NOT_FOUND: "the file does not exist",
    Reason.EMPTY_FILE: "the file is empty",
    Reason.OPEN_FAILED: "the reader does not recognise or cannot parse the file (unsupported format, or truncated)",
    Reason.READ_FAILED: "the file opens, but its pixel data is corrupt",
    Reason.NO_MPP: "the file does not record its pixel size; add a row to the dataset's mpp_overrides table",
    Reason.BAD_MPP_OVERRIDES: "the dataset's mpp_overrides table is missing or cannot be parsed",
    Reason.ABSURD_MPP: "the recorded pixel size is implausible (outside 0.05-100 µm/px)",
    Reason.TOO_SMALL: "the image is smaller than one patch",
    Reason.WOULD_UPSAMPLE: "the target resolution is finer than the file's own pixels by more than max_upsample",
    Reason.NO_TISSUE: "no patch contained enough tissue",
    Reason.UNSUPPORTED_BANDS: "the configured bands do not exist in the file",
    Reason.UNSUPPORTED_DTYPE: "the pixel data type is not supported",
    Reason.NO_CRS: "the GeoTIFF has no coordinate reference system",
    Reason.CRS_IN_DEGREES: "the GeoTIFF's coordinates are in degrees, not a projected CRS in metres",
    Reason.CRS_NOT_GROUND_METRES: "the GeoTIFF's projection is too far from ground metres at the image (and no "
                                  "known correction applies)",
    Reason.TOO_LARGE: "the file claims an image, tile or read size past the tiler's bounds (corrupt or unpyramided)",
    Reason.BAD_GEOREFERENCE: "the GeoTIFF's geotransform or CRS is non-finite, degenerate, mirrored or unusable",
    Reason.OUT_OF_MEMORY: "tiling the file needed more memory than its limit",
    Reason.READER_CRASHED: "the process tiling the file died (the message names the signal)",
    Reason.UNEXPECTED_ERROR: "the reader raised an unforeseen error (the message has it; please report it)",
}


class TilingError(PipelineError):
    """An input that cannot be tiled; ``reason`` is machine readable, the message names the file."""

    def __init__(self, path: str | Path, reason: Reason, detail: str):
        self.path = str(path)
        self.reason = Reason(reason)
        self.detail = detail
        self.facts: dict[str, Any] = {}  # what the reader had learnt about the input (status fields)
        super().__init__(f"{self.path}: {self.reason.value}: {detail}")


def check_readable_file(path: str | Path) -> Path:
    """Fail early, with the right reason, on files that no reader should be handed."""
    path = Path(path)
    if not path.exists():
        raise TilingError(path, Reason.NOT_FOUND, "no such file")
    if path.is_file() and path.stat().st_size == 0:
        raise TilingError(path, Reason.EMPTY_FILE, "the file is empty (0 bytes)")
    return path


# Bounds on what a file's claims may make the tiler allocate, checked before anything is read:
# one tile (OpenSlide and the tile reader allocate whole tiles; real ones are at most 4096 px a side)
# and one region (a whole level for the tissue mask, a strip of aerial tiles). A region costs up
# to ~12 bytes a pixel on OpenSlide's path (ARGB, RGBA, RGB copies): 2^27 px stay near 1.5 GiB,
# under the tile rules' 4 GB.
MAX_TILE_PIXELS = 2**24
MAX_READ_PIXELS = 2**27


def check_claimed_pixels(path: str | Path, what: str, width: float, height: float, limit: int) -> None:
    """Refuse a read of ``width`` x ``height`` px the file asks for, past ``limit`` pixels."""
    if not (width * height <= limit):  # also catches NaN
        raise TilingError(path, Reason.TOO_LARGE,
                          f"{what} would be {width:.0f} x {height:.0f} px, more than the {limit / 2**20:g} Mpx "
                          "the tiler reads at once: the file's dimensions are corrupt, or it needs a pyramid "
                          "(overview levels) to be tiled")


def check_upsampling(path: str | Path, source_size: float, target: float, max_upsample: float, unit: str) -> None:
    """Refuse a target pixel size that would only interpolate the source's pixels (sizes in ``unit``/px)."""
    factor = source_size / target
    if factor > max_upsample * (1 + 1e-9):
        raise TilingError(path, Reason.WOULD_UPSAMPLE,
                          f"the source has {source_size:.4g} {unit}/px; tiling it at {target:g} {unit}/px would "
                          f"upsample it {factor:.3g}x, more than max_upsample = {max_upsample:g}: choose a "
                          f"resolution of at least {source_size / max_upsample:.4g} {unit}/px, or set "
                          f"max_upsample: {math.ceil(factor * 100) / 100:g} for the dataset to accept "
                          "interpolated patches")
