"""Typed reasons why an input produced no patches."""

from __future__ import annotations

import enum
from pathlib import Path


class Reason(str, enum.Enum):
    NOT_FOUND = "not_found"  # the path does not exist
    EMPTY_FILE = "empty_file"  # zero bytes
    OPEN_FAILED = "open_failed"  # the reader does not recognise or cannot parse the file
    READ_FAILED = "read_failed"  # opened, but pixel data is missing or corrupt (truncated file)
    NO_MPP = "no_mpp"  # no level-0 resolution in metadata, tags or override table
    ABSURD_MPP = "absurd_mpp"  # a resolution is present but physically implausible
    TOO_SMALL = "too_small"  # the image is smaller than one patch at the target resolution
    NO_TISSUE = "no_tissue"  # tiling kept no patch (all background, or all nodata)
    UNSUPPORTED_BANDS = "unsupported_bands"  # configured bands missing from an aerial image
    UNSUPPORTED_DTYPE = "unsupported_dtype"  # aerial pixels that are not 8-bit
    NO_CRS = "no_crs"  # an aerial image without a coordinate reference system
    CRS_IN_DEGREES = "crs_in_degrees"  # geographic CRS: the ground sample distance is not in metres
    CRS_NOT_GROUND_METRES = "crs_not_ground_metres"  # projected, but map units far from ground metres, no known fix
    UNEXPECTED_ERROR = "unexpected_error"  # a reader raised something unforeseen: a bug to report


class TilingError(Exception):
    """An input that cannot be tiled; ``reason`` is machine readable, the message names the file."""

    def __init__(self, path: str | Path, reason: Reason, detail: str):
        self.path = str(path)
        self.reason = Reason(reason)
        self.detail = detail
        super().__init__(f"{self.path}: {self.reason.value}: {detail}")


def check_readable_file(path: str | Path) -> Path:
    """Fail early, with the right reason, on files that no reader should be handed."""
    path = Path(path)
    if not path.exists():
        raise TilingError(path, Reason.NOT_FOUND, "no such file")
    if path.is_file() and path.stat().st_size == 0:
        raise TilingError(path, Reason.EMPTY_FILE, "the file is empty (0 bytes)")
    return path
