"""Pixels of TIFF-based slides decoded straight from their tiles (tifffile + imagecodecs).

OpenSlide stays the authority on what a slide is (format, levels, resolution); this only
replaces how pixels are decoded where that is provably the same. OpenSlide hands pixels out as
premultiplied ARGB that openslide-python turns into a PIL RGBA image, which costs about six
times the JPEG decode itself; tifffile decodes the same tiles with libjpeg-turbo into RGB.

A level is served here only when its TIFF page is a tiled, 8-bit, 3-sample page of exactly the
level's size with a codec tifffile decodes, and when its first decoded tile equals OpenSlide's
pixels for the same area (checked once per level, on first use). Anything else - other vendors,
JPEG 2000 colour transforms, odd layouts, a mismatch - goes through OpenSlide as before.

Corrupt tiles. libjpeg recovers from corrupt data with a warning and pixels of its own making
(imagecodecs drops the warning; OpenSlide stops on some, but never finishes a decompression, so
entropy data left over is never noticed). A baseline JPEG tile is therefore decoded with its
frame header claiming one more row of MCUs than it has: a sound tile's entropy data ends at its
last MCU, so that row is libjpeg's zero fill (flat 128) from its second MCU on, while its first
MCU decodes the final byte's padding (never flat 128). Data left over decodes into the row past
its first MCU; data that ran out early leaves even the first MCU flat. Such a tile, and one the
codec rejects, is re-read through OpenSlide; if OpenSlide fails too, or decodes the flawed tile to
the same pixels, the tile is corrupt and the slide fails, naming the tile. A level's directory
must list one tile per grid cell, and tiles past MAX_TILE_PIXELS are never decoded.
"""

from __future__ import annotations

import contextlib
import logging
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import imagecodecs
import numpy as np
import openslide
import tifffile

from pipeline.errors import PipelineError
from pipeline.tiling.failures import MAX_TILE_PIXELS

# Vendors whose levels are plain TIFF pages (NDPI, Philips, Ventana... have their own layouts).
TIFF_VENDORS = {"aperio", "generic-tiff"}
# Codecs whose decoded RGB bytes match OpenSlide's: JPEG, LZW, Deflate, none.
DECODED_COMPRESSIONS = {1, 5, 7, 8, 32946}
# Decoded tiles kept: patches are read in row-major order, and a patch row shares its top and
# bottom tile rows with the rows above and below, so two tile rows of a level are worth keeping.
TILE_CACHE_BYTES = 192 * 2**20
JPEG = 7
BASELINE_FRAMES = {0xC0, 0xC1}  # SOF0, SOF1: sequential Huffman, one scan
JPEG_COLOURS = {2: "RGB", 6: "YCBCR"}  # TIFF photometric -> the JPEG data's colour space
ZERO_FILL = 128  # what libjpeg decodes where the data ran out (all-zero coefficients)


class TileDecodeError(PipelineError):
    """A tile's bytes are missing or corrupt."""


class TiffLayoutError(PipelineError):
    """A level's TIFF directory contradicts itself (tile grid, tile size): no reader can place its pixels."""


class TiffNameFilter(logging.Filter):
    """Prefixes tifffile's log lines with the file they are about (tifffile names only the page)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = f"{self.path}: {record.getMessage()}", None
        return True


@contextlib.contextmanager
def naming_file(path: Path) -> Iterator[None]:
    """tifffile's log lines inside the block name ``path``."""
    logger, name_filter = logging.getLogger("tifffile"), TiffNameFilter(path)
    logger.addFilter(name_filter)
    try:
        yield
    finally:
        logger.removeFilter(name_filter)


def layout_problem(page: tifffile.TiffPage) -> str | None:
    """Why the page's directory cannot place its pixels (segment count or tile size), or None.

    Counts come from the tags as written: tifffile trims a wrong count (and logs it)."""
    tile_tags = {322, 323, 324, 325} & set(page.tags.keys())
    if not page.is_tiled and tile_tags:
        return f"tile tags {sorted(tile_tags)} without a usable tile width and length"
    offsets = page.tags.get(324 if page.is_tiled else 273)
    listed = offsets.count if offsets is not None else 0
    if page.is_tiled:
        if page.tilewidth * page.tilelength > MAX_TILE_PIXELS:
            return f"{page.tilewidth} x {page.tilelength} px tiles, more than {MAX_TILE_PIXELS / 2**20:g} Mpx"
        across, down = -(-page.imagewidth // page.tilewidth), -(-page.imagelength // page.tilelength)
        grid = f"{page.imagewidth} x {page.imagelength} px in {page.tilewidth} x {page.tilelength} px tiles"
    else:
        rows = page.rowsperstrip or page.imagelength
        across, down = 1, -(-page.imagelength // max(rows, 1))
        grid = f"{page.imagelength} rows in strips of {rows}"
    expected = across * down * (page.samplesperpixel if page.planarconfig == 2 else 1)
    if listed != expected or len(page.databytecounts) != expected:
        return f"{grid} need {expected} segments, but the directory lists {listed} offsets"
    return None


def baseline_frame(data: bytes) -> tuple[int, int, int] | None:
    """(offset of the frame height, MCU width, MCU height) of a baseline JPEG stream, else None
    (progressive, lossless, restart intervals, or no frame header before the scan)."""
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker, length = data[pos + 1], int.from_bytes(data[pos + 2:pos + 4], "big")
        if marker in BASELINE_FRAMES:
            components = data[pos + 9]
            factors = data[pos + 11:pos + 10 + 3 * components:3]
            if len(factors) != components or not components:
                return None
            return pos + 5, 8 * max(f >> 4 for f in factors), 8 * max(f & 15 for f in factors)
        if marker in (0xDA, 0xDD) or (0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC)):
            return None  # the scan before a frame, a restart interval, another coding process
        pos += 2 + length
    return None


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
        """A reader for the slide's TIFF-page levels, or None when no level qualifies.

        Raises TiffLayoutError when a level's own directory contradicts itself."""
        if slide.properties.get(openslide.PROPERTY_NAME_VENDOR) not in TIFF_VENDORS:
            return None
        with naming_file(path):
            try:
                tiff = tifffile.TiffFile(path)
            except Exception:  # noqa: BLE001 - OpenSlide opened it: it stays the reader
                return None
            try:
                pages = cls._level_pages(path, slide, tiff)
            except TiffLayoutError:
                tiff.close()
                raise
            except Exception:  # noqa: BLE001 - a directory tifffile cannot parse: OpenSlide reads it
                pages = {}
        if not pages:
            tiff.close()
            return None
        return cls(path, slide, tiff, pages)

    @staticmethod
    def _level_pages(path: Path, slide: openslide.OpenSlide, tiff: tifffile.TiffFile) -> dict[int, tifffile.TiffPage]:
        pages = {}
        for level, (width, height) in enumerate(slide.level_dimensions):
            page = next((p for p in tiff.pages if p.shape[:2] == (height, width) and p.is_tiled), None)
            if page is None:
                continue
            problem = layout_problem(page)
            if problem is not None:
                raise TiffLayoutError(f"{path}: the directory of level {level} contradicts itself: {problem}")
            if _decodable(page):
                pages[level] = page
        return pages

    def serves(self, level: int) -> bool:
        """True when `level` is decoded here (verifying it against OpenSlide on first use)."""
        if level not in self.pages:
            return False
        if level not in self.verified:
            self.verified[level] = self._matches_openslide(level)
        return self.verified[level]

    def _matches_openslide(self, level: int) -> bool:
        page = self.pages[level]
        # The first tile with data, compared over its area inside the level. A corrupt tile raises
        # TileDecodeError: leaving the level to OpenSlide would hide it.
        index = next((i for i, count in enumerate(page.databytecounts) if count), None)
        if index is None:
            return False
        if page.compression == JPEG:
            self.tiff.filehandle.seek(page.dataoffsets[index])
            if baseline_frame(self.tiff.filehandle.read(min(page.databytecounts[index], 4096))) is None:
                return False  # progressive, lossless or restart-interval tiles: OpenSlide's
        left, top, width, height = self._tile_box(page, index)
        ours = self.region(level, left, top, width, height)
        try:
            theirs = self._openslide_area(level, left, top, width, height)
        except openslide.OpenSlideError:
            return False
        return theirs is not None and np.array_equal(ours, theirs)

    @staticmethod
    def _tile_box(page: tifffile.TiffPage, index: int) -> tuple[int, int, int, int]:
        """(left, top, width, height) of tile ``index`` inside its level (edge tiles clipped)."""
        tiles_across = -(-page.imagewidth // page.tilewidth)
        top, left = (index // tiles_across) * page.tilelength, (index % tiles_across) * page.tilewidth
        return left, top, min(page.tilewidth, page.imagewidth - left), min(page.tilelength, page.imagelength - top)

    def _openslide_area(self, level: int, left: int, top: int, width: int, height: int) -> np.ndarray | None:
        """OpenSlide's RGB for a level area; None where it is not fully opaque (not comparable)."""
        downsample = self.slide.level_downsamples[level]
        rgba = np.asarray(self.slide.read_region((round(left * downsample), round(top * downsample)), level,
                                                 (width, height)))
        return rgba[..., :3] if np.all(rgba[..., 3] == 255) else None

    def _decode(self, page: tifffile.TiffPage, index: int, data: bytes) -> np.ndarray:
        """The tile's pixels; TileDecodeError when the codec fails, _Unsound when the JPEG data
        does not end at its last MCU (see the module docstring)."""
        if page.compression != JPEG:
            segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
            if segment is None:
                raise TileDecodeError("no data")
            return segment[0]
        frame = baseline_frame(data)
        if frame is None:
            raise TileDecodeError("not a baseline JPEG with its frame header in the tile")
        at, mcu_width, mcu_height = frame
        rows = int.from_bytes(data[at:at + 2], "big")
        taller = bytearray(data)
        taller[at:at + 2] = (rows + mcu_height).to_bytes(2, "big")
        pixels = imagecodecs.jpeg8_decode(taller, tables=page.jpegtables, colorspace=JPEG_COLOURS[page.photometric],
                                          outcolorspace="RGB")
        tile = pixels[:rows]
        # Bottom half of the extra row: no chroma smoothing reaches it from the real rows above.
        extra = pixels[rows + mcu_height // 2:rows + mcu_height]
        if np.all(extra[:, :mcu_width] == ZERO_FILL):
            raise _Unsound(tile, "its JPEG data ends before its last block")
        if not np.all(extra[:, 2 * mcu_width:] == ZERO_FILL):
            raise _Unsound(tile, "its JPEG data goes on past its last block")
        return tile

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
                if len(data) < count:
                    raise TileDecodeError("truncated")
                tile = self._decode(page, index, data)
            except _Unsound as unsound:
                tile = self._tile_from_openslide(page_level, index, unsound.problem, unsound.tile)
            except Exception as exc:  # noqa: BLE001 - any codec error means corrupt tile data
                tile = self._tile_from_openslide(page_level, index, f"{type(exc).__name__}: {exc}", None)
        self.tiles[key] = tile
        if len(self.tiles) > self.cache_tiles:
            self.tiles.popitem(last=False)
        return tile

    def _tile_from_openslide(self, level: int, index: int, problem: str, ours: np.ndarray | None) -> np.ndarray:
        """The tile as OpenSlide decodes it, after our decode failed; TileDecodeError naming the
        tile when OpenSlide fails too, or reproduces the flawed decode (``ours``)."""
        page = self.pages[level]
        left, top, width, height = self._tile_box(page, index)
        where = (f"{self.path}: tile {index} (column {left // page.tilewidth}, row {top // page.tilelength}, "
                 f"level-{level} px {left},{top}) of level {level}")
        try:
            theirs = self._openslide_area(level, left, top, width, height)
        except openslide.OpenSlideError as exc:
            raise TileDecodeError(f"{where} is corrupt: {problem}; OpenSlide: {exc}") from exc
        if theirs is None:
            raise TileDecodeError(f"{where} is corrupt: {problem}; OpenSlide leaves it transparent")
        if ours is not None and np.array_equal(theirs, ours[:height, :width]):
            raise TileDecodeError(f"{where} is corrupt: {problem} (OpenSlide decodes the same bytes to the "
                                  "same pixels without noticing)")
        tile = np.full((page.tilelength, page.tilewidth, 3), 255, np.uint8)
        tile[:height, :width] = theirs
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


class _Unsound(Exception):
    """A JPEG tile that decoded, but whose data does not end where its last block does."""

    def __init__(self, tile: np.ndarray, problem: str) -> None:
        super().__init__(problem)
        self.tile, self.problem = tile, problem


def _decodable(page: tifffile.TiffPage) -> bool:
    if page.compression == JPEG and (page.photometric not in JPEG_COLOURS or not _tables_without_restarts(page)):
        return False
    return (page.is_tiled and page.compression in DECODED_COMPRESSIONS and page.samplesperpixel == 3
            and page.dtype == np.uint8 and page.planarconfig == 1 and page.imagedepth == 1)


def _tables_without_restarts(page: tifffile.TiffPage) -> bool:
    """JPEGTables (if any) hold no restart interval, which the end-of-data check cannot follow."""
    tables = page.jpegtables or b""
    pos = 2
    while pos + 4 <= len(tables) and tables[pos] == 0xFF:
        if tables[pos + 1] == 0xDD:
            return False
        pos += 2 + int.from_bytes(tables[pos + 2:pos + 4], "big")
    return True
