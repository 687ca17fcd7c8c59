"""Pixels of TIFF-based slides decoded straight from their tiles (tifffile + imagecodecs).

OpenSlide stays the authority on what a slide is (format, levels, resolution); this only
replaces how pixels are decoded where that is provably the same. OpenSlide hands pixels out as
premultiplied ARGB that openslide-python turns into a PIL RGBA image, which costs about six
times the JPEG decode itself; tifffile decodes the same tiles with libjpeg-turbo into RGB.

A level is served here only when its TIFF page is a tiled, 8-bit, 3-sample page of exactly the
level's size with a codec tifffile decodes, and when its first decoded tile equals OpenSlide's
pixels for the same area (checked once per level, on first use). Anything else - other vendors,
JPEG 2000 colour transforms, odd layouts, a mismatch - goes through OpenSlide as before.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import openslide
import tifffile

from pipeline.errors import PipelineError

# Vendors whose levels are plain TIFF pages (NDPI, Philips, Ventana... have their own layouts).
TIFF_VENDORS = {"aperio", "generic-tiff"}
# Codecs whose decoded RGB bytes match OpenSlide's: JPEG, LZW, Deflate, none.
DECODED_COMPRESSIONS = {1, 5, 7, 8, 32946}
# Decoded tiles kept: patches are read in row-major order, and a patch row shares its top and
# bottom tile rows with the rows above and below, so two tile rows of a level are worth keeping.
TILE_CACHE_BYTES = 192 * 2**20


class TileDecodeError(PipelineError):
    """A tile's bytes are missing or corrupt."""


class TiffLevelReader:
    """Reads regions of the levels of one slide from its TIFF tiles; see the module docstring."""

    def __init__(self, path: Path, slide: openslide.OpenSlide, tiff: tifffile.TiffFile,
                 pages: dict[int, tifffile.TiffPage]) -> None:
        self.path = path
        self.slide = slide
        self.tiff = tiff
        self.pages = pages  # OpenSlide level -> TIFF page, for candidate levels
        self.verified: dict[int, bool] = {}
        self.tiles: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        widest = max(pages.values(), key=lambda page: page.imagewidth)
        tiles_across = -(-widest.imagewidth // widest.tilewidth)
        tile_bytes = widest.tilewidth * widest.tilelength * 3
        self.cache_tiles = max(16, min(2 * tiles_across + 2, TILE_CACHE_BYTES // tile_bytes))

    @classmethod
    def open(cls, path: Path, slide: openslide.OpenSlide) -> TiffLevelReader | None:
        """A reader for the slide's TIFF-page levels, or None when no level qualifies."""
        if slide.properties.get(openslide.PROPERTY_NAME_VENDOR) not in TIFF_VENDORS:
            return None
        try:
            tiff = tifffile.TiffFile(path)
        except Exception:  # noqa: BLE001 - OpenSlide opened it: it stays the reader
            return None
        try:
            pages = {}
            for level, (width, height) in enumerate(slide.level_dimensions):
                page = next((p for p in tiff.pages if _decodable(p) and p.shape[:2] == (height, width)), None)
                if page is not None:
                    pages[level] = page
        except Exception:  # noqa: BLE001 - a directory tifffile cannot parse: OpenSlide reads it
            pages = {}
        if not pages:
            tiff.close()
            return None
        return cls(path, slide, tiff, pages)

    def serves(self, level: int) -> bool:
        """True when `level` is decoded here (verifying it against OpenSlide on first use)."""
        if level not in self.pages:
            return False
        if level not in self.verified:
            self.verified[level] = self._matches_openslide(level)
        return self.verified[level]

    def _matches_openslide(self, level: int) -> bool:
        page = self.pages[level]
        # The first tile with data, compared over its area inside the level.
        index = next((i for i, count in enumerate(page.databytecounts) if count), None)
        if index is None:
            return False
        tiles_across = -(-page.imagewidth // page.tilewidth)
        top, left = (index // tiles_across) * page.tilelength, (index % tiles_across) * page.tilewidth
        height = min(page.tilelength, page.imagelength - top)
        width = min(page.tilewidth, page.imagewidth - left)
        downsample = self.slide.level_downsamples[level]
        try:
            ours = self.region(level, left, top, width, height)
            theirs = np.asarray(self.slide.read_region((round(left * downsample), round(top * downsample)),
                                                       level, (width, height)))
        except (TileDecodeError, openslide.OpenSlideError):
            return False
        return bool(np.all(theirs[..., 3] == 255) and np.array_equal(ours, theirs[..., :3]))

    def _tile(self, page_level: int, index: int) -> np.ndarray:
        key = (page_level, index)
        tile = self.tiles.get(key)
        if tile is not None:
            self.tiles.move_to_end(key)
            return tile
        page = self.pages[page_level]
        count = page.databytecounts[index]
        if count == 0:
            # An unscanned tile: OpenSlide leaves it transparent, which tiling shows as white.
            tile = np.full((page.tilelength, page.tilewidth, 3), 255, np.uint8)
        else:
            handle = self.tiff.filehandle
            handle.seek(page.dataoffsets[index])
            data = handle.read(count)
            try:
                segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
            except Exception as exc:  # noqa: BLE001 - any codec error means corrupt tile data
                raise TileDecodeError(f"{self.path}: tile {index} of level {page_level}: {exc}") from exc
            if len(data) < count or segment is None:
                raise TileDecodeError(f"{self.path}: tile {index} of level {page_level} is truncated")
            tile = segment[0]
        self.tiles[key] = tile
        if len(self.tiles) > self.cache_tiles:
            self.tiles.popitem(last=False)
        return tile

    def region(self, level: int, left: int, top: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 of the level at level pixel (left, top); white outside it."""
        page = self.pages[level]
        inside = left >= 0 and top >= 0 and left + width <= page.imagewidth and top + height <= page.imagelength
        # Every pixel of a region inside the level comes from a tile (a missing tile decodes white).
        out = np.empty((height, width, 3), np.uint8) if inside else np.full((height, width, 3), 255, np.uint8)
        tile_w, tile_h = page.tilewidth, page.tilelength
        tiles_across = -(-page.imagewidth // tile_w)
        right, bottom = min(left + width, page.imagewidth), min(top + height, page.imagelength)
        for tile_row in range(max(top, 0) // tile_h, -(-bottom // tile_h)):
            for tile_col in range(max(left, 0) // tile_w, -(-right // tile_w)):
                tile = self._tile(level, tile_row * tiles_across + tile_col)
                y0, x0 = tile_row * tile_h, tile_col * tile_w
                ys, xs = max(top, y0), max(left, x0)
                ye, xe = min(bottom, y0 + tile_h), min(right, x0 + tile_w)
                out[ys - top:ye - top, xs - left:xe - left] = tile[ys - y0:ye - y0, xs - x0:xe - x0]
        return out

    def close(self) -> None:
        self.tiles.clear()
        self.tiff.close()


def _decodable(page: tifffile.TiffPage) -> bool:
    return (page.is_tiled and page.compression in DECODED_COMPRESSIONS and page.samplesperpixel == 3
            and page.dtype == np.uint8 and page.planarconfig == 1 and page.imagedepth == 1)
