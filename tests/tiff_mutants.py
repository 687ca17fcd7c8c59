"""Seeded mutants of real TIFFs (the demo SVS, the shared GeoTIFFs), built in memory at test time.

The mutations are those of OpenSlide's reader tests, applied to our inputs: truncations, byte flips
in directory entries, in JPEG tables and in tile data, zeroed ranges, absurd dimensions and tile
sizes, edited Aperio descriptions and broken georeferencing. Every mutant is reproducible from
its name (kind and seed); the offsets come from tifffile's parse of the clean file.
"""

from __future__ import annotations

import dataclasses
import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import tifffile

# TIFF tags (and GeoTIFF's) the mutations aim at.
IMAGE_WIDTH, IMAGE_LENGTH, TILE_WIDTH, TILE_LENGTH = 256, 257, 322, 323
IMAGE_DESCRIPTION, JPEG_TABLES = 270, 347
PIXEL_SCALE, TIEPOINT, GEO_KEYS = 33550, 33922, 34735
PROJECTED_CRS_KEY = 3072


@dataclasses.dataclass(frozen=True)
class Tag:
    code: int
    dtype: int  # TIFF field type
    count: int
    value_offset: int  # file offset of the value (inline or not)
    entry_offset: int  # file offset of the 12-byte directory entry


@dataclasses.dataclass(frozen=True)
class Page:
    tags: dict[int, Tag]
    tiles: list[tuple[int, int]]  # (offset, byte count) of each tile or strip
    entries: tuple[int, int]  # file range of the directory entries


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the parts of a little-endian classic TIFF are (what mutations aim at)."""

    data: bytes
    pages: list[Page]

    @classmethod
    def of(cls, path: Path) -> Layout:
        data = path.read_bytes()
        pages = []
        with tifffile.TiffFile(path) as tiff:
            assert tiff.byteorder == "<" and not tiff.is_bigtiff
            for page in tiff.pages:
                tags = {tag.code: Tag(tag.code, int(tag.dtype), tag.count, tag.valueoffset, tag.offset)
                        for tag in page.tags.values()}
                count = int.from_bytes(data[page.offset:page.offset + 2], "little")
                pages.append(Page(tags, list(zip(page.dataoffsets, page.databytecounts)),
                                  (page.offset + 2, page.offset + 2 + 12 * count)))
        return cls(data, pages)


@dataclasses.dataclass(frozen=True)
class Mutant:
    name: str  # <source>-<kind>-<seed>: which file, which mutation, reproducible
    data: bytes
    what: str  # the exact change, for failure messages
    tile: tuple[int, int] | None = None  # (page, tile index) whose bytes a tile mutation changed


def _set(data: bytearray, offset: int, raw: bytes) -> None:
    data[offset:offset + len(raw)] = raw


def _short_or_long(tag: Tag, value: int) -> bytes:
    return struct.pack("<H" if tag.dtype == 3 else "<I", value)


# Each kind: (layout, rng) -> (bytes, description). Pages 0 is the full-resolution image.

def truncate(layout: Layout, rng: random.Random):
    end = rng.randrange(8, len(layout.data))
    return layout.data[:end], f"truncated to {end} of {len(layout.data)} bytes"


def directory_flip(layout: Layout, rng: random.Random):
    page_index = rng.randrange(len(layout.pages))
    start, end = layout.pages[page_index].entries
    offset, value = rng.randrange(start, end), rng.randrange(256)
    data = bytearray(layout.data)
    data[offset] = value
    return bytes(data), f"directory entry byte {offset} of page {page_index} set to {value:#04x}"


def huffman_segments(tables: bytes) -> list[tuple[int, int]]:
    """(start, end) of the Huffman table definitions (DHT) inside JPEG tables."""
    segments, pos = [], 2
    while pos + 4 <= len(tables) and tables[pos] == 0xFF:
        length = int.from_bytes(tables[pos + 2:pos + 4], "big")
        if tables[pos + 1] == 0xC4:
            segments.append((pos + 4, pos + 2 + length))
        pos += 2 + length
    return segments


def jpeg_tables_flip(layout: Layout, rng: random.Random):
    """A byte of the Huffman tables (quantization tables are only numbers: any value is valid)."""
    tag = layout.pages[0].tags[JPEG_TABLES]
    start, end = rng.choice(huffman_segments(layout.data[tag.value_offset:tag.value_offset + tag.count]))
    offset, value = tag.value_offset + rng.randrange(start, end), rng.randrange(256)
    data = bytearray(layout.data)
    data[offset] = value
    return bytes(data), f"JPEGTables byte {offset - tag.value_offset} set to {value:#04x}"


def _tile_range(layout: Layout, rng: random.Random) -> tuple[int, int, int]:
    page_index = rng.randrange(len(layout.pages))
    tiles = [tile for tile in layout.pages[page_index].tiles if tile[1] > 16]
    offset, count = rng.choice(tiles)
    return page_index, offset, count


def changed_tile(layout: Layout, mutated: bytes) -> tuple[int, int] | None:
    """(page, tile index) holding the first byte ``mutated`` changed."""
    at = next(i for i, (a, b) in enumerate(zip(layout.data, mutated)) if a != b)
    return next(((p, i) for p, page in enumerate(layout.pages) for i, (offset, count) in enumerate(page.tiles)
                 if offset <= at < offset + count), None)


def tile_flip(layout: Layout, rng: random.Random):
    page_index, offset, count = _tile_range(layout, rng)
    at, value = offset + rng.randrange(count), rng.randrange(256)
    data = bytearray(layout.data)
    data[at] = value
    return bytes(data), f"byte {at - offset} of a {count}-byte tile of page {page_index} set to {value:#04x}"


def tile_zero(layout: Layout, rng: random.Random):
    page_index, offset, count = _tile_range(layout, rng)
    length = min(rng.choice([16, 256, 4096]), count - 4)
    at = offset + rng.randrange(count - length)
    data = bytearray(layout.data)
    data[at:at + length] = bytes(length)
    return bytes(data), f"{length} bytes zeroed at {at - offset} of a {count}-byte tile of page {page_index}"


def absurd_dimensions(layout: Layout, rng: random.Random):
    tags = layout.pages[0].tags
    code = rng.choice([IMAGE_WIDTH, IMAGE_LENGTH, TILE_WIDTH, TILE_LENGTH])
    tag = tags[code]
    value = rng.choice([0, 1, 7, 4800, 30000, 65520, 65535]) if code in (IMAGE_WIDTH, IMAGE_LENGTH) else \
        rng.choice([0, 16, 4096, 65520])
    data = bytearray(layout.data)
    _set(data, tag.value_offset, _short_or_long(tag, value))
    return bytes(data), f"tag {code} of page 0 set to {value}"


def description_edit(layout: Layout, rng: random.Random):
    """The Aperio description: a resolution that is still a number, an empty or doubled key."""
    tag = layout.pages[0].tags[IMAGE_DESCRIPTION]
    text = layout.data[tag.value_offset:tag.value_offset + tag.count]
    mpp = text.index(b"MPP = ") + len(b"MPP = ")
    choices = [
        (mpp, bytes([rng.choice(b"123456789")])),  # 0.4990 -> 9.4990 (a later digit gives a plausible value)
        (text.index(b"|MPP") + 1, b"   "),  # "|    = 0.4990": an empty-named property
        (text.index(b"|AppMag") + 1, b"MPP   "),  # a second MPP key
        (mpp, b"-"),
        (mpp, b"e"),
    ]
    at, raw = rng.choice(choices)
    data = bytearray(layout.data)
    _set(data, tag.value_offset + at, raw)
    return bytes(data), f"ImageDescription bytes {at}.. set to {raw!r}"


def georeference(layout: Layout, rng: random.Random):
    """Pixel scale or tiepoint doubles set to absurd values, or the projected CRS code changed."""
    tags = layout.pages[0].tags
    data = bytearray(layout.data)
    target = rng.choice(["scale", "tiepoint", "crs"])
    if target == "crs":
        keys = tags[GEO_KEYS]
        values = struct.unpack_from(f"<{keys.count}H", layout.data, keys.value_offset)
        entry = next(i for i in range(4, len(values), 4) if values[i] == PROJECTED_CRS_KEY)
        code = rng.choice([0, 1, 4326, 9999, 32767, 65535])
        struct.pack_into("<H", data, keys.value_offset + 2 * (entry + 3), code)
        return bytes(data), f"ProjectedCSTypeGeoKey set to {code}"
    tag = tags[PIXEL_SCALE if target == "scale" else TIEPOINT]
    index = rng.randrange(2) if target == "scale" else 3 + rng.randrange(2)
    # Only values no image can have: a plausible tiepoint moves the image (Web Mercator's scale, so
    # its patches, change with latitude); that is a different georeferencing, not a corrupt one.
    value = rng.choice([float("nan"), float("inf"), -float("inf")] +
                       ([-5.0, 0.0, 1e-9, 1e6] if target == "scale" else [1e300]))
    struct.pack_into("<d", data, tag.value_offset + 8 * index, value)
    return bytes(data), f"{'ModelPixelScale' if target == 'scale' else 'ModelTiepoint'}[{index}] set to {value!r}"


KINDS: dict[str, Callable[[Layout, random.Random], tuple[bytes, str]]] = {
    "truncate": truncate, "directory_flip": directory_flip, "jpeg_tables_flip": jpeg_tables_flip,
    "tile_flip": tile_flip, "tile_zero": tile_zero, "absurd_dimensions": absurd_dimensions,
    "description_edit": description_edit, "georeference": georeference,
}


def mutants(source: str, layout: Layout, kind: str, count: int, seed: int = 0) -> Iterator[Mutant]:
    """``count`` mutants of one kind; mutant i uses the seed (seed, kind, i)."""
    for index in range(count):
        rng = random.Random(f"{seed}-{source}-{kind}-{index}")
        data, what = KINDS[kind](layout, rng)
        tile = changed_tile(layout, data) if kind in ("tile_flip", "tile_zero") and data != layout.data else None
        yield Mutant(f"{source}-{kind}-{index:02d}", data, what, tile)
