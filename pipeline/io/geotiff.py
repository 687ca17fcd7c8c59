"""Georeferenced GeoTIFFs of every band of a large image (an aerial region: R, G, B, NIR), written
through rasterio, tiled, lossless, with internal overviews, atomically (temporary name in the
destination folder, then rename). The RGB previews are :mod:`pipeline.io.large_image_files`'.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling
from rasterio.windows import Window

from pipeline.io.atomic import atomic_file
from pipeline.io.large_image_files import pyramid_sizes, release_mapped_pages

GEOTIFF_TILE = 256


def write_geotiff(
    path: str | Path,
    image: Any,
    crs: str | None,
    transform: tuple[float, ...] | list[float],
    *,
    tile: int = GEOTIFF_TILE,
    band_descriptions: list[str] | None = None,
    description: str | None = None,
) -> list[int]:
    """Write every band of a uint8 (H, W, bands) array-like as a georeferenced GeoTIFF, atomically.

    ``crs``: what rasterio's CRS takes (``"EPSG:26914"``, WKT), or None for an image with a pixel
    size but no place; ``transform``: the affine of pixel
    (0, 0)'s top-left corner, ``[a, b, c, d, e, f]`` in rasterio's order. Tiled (``tile`` squared),
    Deflate with the horizontal predictor (lossless), pixel-interleaved; the first three bands are
    tagged red, green, blue and any further ones undefined. Internal overviews (2x2 averages of
    each other) are added until one fits in a tile. The image is read ``tile`` rows at a time.
    Returns the overview factors.
    """
    shape = tuple(getattr(image, "shape", ()))
    if len(shape) != 3 or shape[2] < 1 or np.dtype(image.dtype) != np.uint8 or min(shape[:2]) < 1:
        raise ValueError(f"expected a uint8 (H, W, bands) image, got shape {shape} and dtype {image.dtype}")
    if tile <= 0 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    height, width, count = (int(v) for v in shape)
    factors = [2**level for level in range(1, len(pyramid_sizes(height, width, tile)))]
    profile = {"driver": "GTiff", "width": width, "height": height, "count": count, "dtype": "uint8",
               "crs": crs, "transform": Affine(*[float(v) for v in transform][:6]), "tiled": True,
               "blockxsize": tile, "blockysize": tile, "compress": "deflate", "predictor": 2, "interleave": "pixel"}
    if count >= 3:  # bands 1-3 red, green, blue; the rest undefined (GDAL would tag a fourth alpha)
        profile.update(photometric="RGB", **({"alpha": "UNSPECIFIED"} if count > 3 else {}))
    with atomic_file(path) as temp:
        with rasterio.open(temp, "w", **profile) as dataset:
            for y in range(0, height, tile):
                rows = np.asarray(image[y : y + tile], dtype=np.uint8)
                release_mapped_pages(image)
                dataset.write(np.moveaxis(rows, 2, 0), window=Window(0, y, width, rows.shape[0]))
            for band, text in enumerate(band_descriptions or [], start=1):
                dataset.set_band_description(band, text)
            if description:
                dataset.update_tags(TIFFTAG_IMAGEDESCRIPTION=description)
            if factors:
                dataset.build_overviews(factors, Resampling.average)
                dataset.update_tags(ns="rio_overview", resampling="average")
    return factors
