"""Reading the images the stages write: patches and sheets (PNG/JPEG) and large images (PNG, or
pyramidal TIFF written by `pipeline.io.large_image_files`)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import StageOutputError

TIFF_SUFFIXES = (".tif", ".tiff")


@contextlib.contextmanager
def _own_large_images() -> Iterator[None]:
    # Our own large images may exceed PIL's decompression-bomb limit (meant for untrusted files).
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def _rgb(array: np.ndarray) -> np.ndarray:
    if array.ndim == 3 and array.shape[0] in (3, 4) and array.shape[-1] not in (3, 4):
        array = np.moveaxis(array, 0, -1)  # planar (samples first)
    if array.ndim == 2:
        return np.repeat(array[..., None], 3, axis=2)
    return np.ascontiguousarray(array[..., :3])


def _tiff_pixels(path: Path, max_side: int | None) -> np.ndarray:
    """Level 0, or with max_side the smallest pyramid level still at least max_side (the full image is
    never decoded when a level will do)."""
    import tifffile  # with imagecodecs: the JPEG-compressed pyramids as they are written

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        levels = list(getattr(series, "levels", None) or [series])
        chosen = levels[0]
        if max_side is not None:
            for level in levels:
                if max(level.shape[:2]) >= max_side:
                    chosen = level
        return _rgb(chosen.asarray())


def read_image(path: str | Path, max_side: int | None = None) -> np.ndarray:
    """An image file as HxWx3 uint8; with max_side, downscaled (Lanczos) to at most max_side."""
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            image = Image.fromarray(_tiff_pixels(path, max_side))
        else:
            with _own_large_images(), Image.open(path) as opened:
                if max_side is not None:
                    opened.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale
                image = opened.convert("RGB")
    except (OSError, ValueError) as exc:
        raise StageOutputError(f"{path}: cannot read the image: {exc}") from exc
    if max_side is not None and max(image.size) > max_side:
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return np.asarray(image)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding its pixels."""
    path = Path(path)
    try:
        if path.suffix.lower() in TIFF_SUFFIXES:
            import tifffile

            with tifffile.TiffFile(path) as tif:
                level0 = tif.series[0].keyframe
                return int(level0.imagewidth), int(level0.imagelength)
        with _own_large_images(), Image.open(path) as image:
            return image.size
    except (OSError, ValueError) as exc:
        raise StageOutputError(f"{path}: cannot read the image: {exc}") from exc
