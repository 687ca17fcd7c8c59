"""Whole-slide images through OpenSlide: resolution, tissue grid and patch reading.

Resolution is always physical (um/px), never a pyramid level index: a patch covers
``round(patch_size * target_mpp / level0_mpp)`` level-0 pixels, read from the coarsest level
that still has at least the target resolution, then area-resized to ``patch_size``.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import openslide
from PIL import Image, ImageDraw

from pipeline.config import DatasetSpec
from pipeline.tiling.failures import (MAX_READ_PIXELS, MAX_TILE_PIXELS, Reason, TilingError, check_claimed_pixels,
                                      check_readable_file, check_upsampling)
from pipeline.tiling.outputs import Patch
from pipeline.tiling.tiff_tiles import TiffLayoutError, TiffLevelReader, TileDecodeError
from pipeline.tiling.tissue import box_fractions, is_background_patch, tissue_mask

# Plausible level-0 resolutions: 0.05 um/px is beyond any light microscope, 100 um/px is a
# photo of the slide. Anything outside is a metadata error, not a resolution.
MPP_RANGE = (0.05, 100.0)
THUMBNAIL_PIXELS_PER_PATCH = 16  # mask resolution: each patch covers about 16x16 mask pixels
THUMBNAIL_MAX_SIDE = 8192
QC_MAX_SIDE = 1024
TIFF_UNIT_MICRONS = {"centimeter": 1e4, "inch": 25400.0}


@lru_cache(maxsize=8)
def _read_overrides(csv_path: str) -> dict[str, float]:
    table: dict[str, float] = {}
    with open(csv_path, newline="") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None or not {"slide", "mpp"} <= set(reader.fieldnames):
            raise ValueError("it needs columns 'slide' and 'mpp'")
        for line_no, row in enumerate(reader, start=2):
            try:
                table[row["slide"]] = float(row["mpp"])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"line {line_no}: mpp {row['mpp']!r} is not a number") from exc
    return table


def override_mpp(path: Path, csv_path: str) -> float | None:
    """The override table's um/px for this slide (None: no row); a table that cannot be used
    fails the slide by name, since it might have corrected the slide's own metadata."""
    try:
        return _read_overrides(csv_path).get(path.name)
    except FileNotFoundError as exc:
        raise TilingError(path, Reason.BAD_MPP_OVERRIDES, f"the mpp_overrides table {csv_path} does not exist") from exc
    except (OSError, UnicodeDecodeError, csv.Error, ValueError) as exc:
        raise TilingError(path, Reason.BAD_MPP_OVERRIDES,
                          f"the mpp_overrides table {csv_path} cannot be used: {exc}") from exc


def level0_mpp(properties: dict[str, str], path: Path, spec: DatasetSpec) -> tuple[float, str]:
    """Level-0 um/px and where it came from.

    An override table row wins (it exists to correct slides whose metadata is missing or
    wrong); then OpenSlide's normalised property, then the TIFF resolution tags, then, only if
    the config opts in, the objective power.
    """
    candidates: list[tuple[str, float | None]] = []
    if spec.mpp_overrides:
        candidates.append(("override_table", override_mpp(path, spec.mpp_overrides)))
    candidates.append(("openslide_mpp", _as_float(properties.get(openslide.PROPERTY_NAME_MPP_X))))
    unit = TIFF_UNIT_MICRONS.get(properties.get("tiff.ResolutionUnit", ""))
    x_res = _as_float(properties.get("tiff.XResolution"))
    candidates.append(("tiff_resolution", unit / x_res if unit and x_res else None))
    power = _as_float(properties.get(openslide.PROPERTY_NAME_OBJECTIVE_POWER))
    if spec.mpp_from_objective:
        candidates.append(("objective_power", 10.0 / power if power else None))
    for source, value in candidates:
        if value is None:
            continue
        if not (MPP_RANGE[0] <= value <= MPP_RANGE[1]):
            raise TilingError(path, Reason.ABSURD_MPP,
                              f"level-0 resolution {value!r} um/px from {source} is outside {MPP_RANGE}")
        return value, source
    raise TilingError(path, Reason.NO_MPP, no_mpp_advice(properties, path, spec, power))


def no_mpp_advice(properties: dict[str, str], path: Path, spec: DatasetSpec, power: float | None) -> str:
    """What was looked at, and the fix that works for this slide."""
    looked_at = [openslide.PROPERTY_NAME_MPP_X, "tiff.XResolution/tiff.ResolutionUnit"]
    if "tiff.XResolution" in properties:  # present, but not a length: say what was found
        looked_at[-1] += (f" (found {properties['tiff.XResolution']} per "
                          f"{properties.get('tiff.ResolutionUnit', 'no unit')})")
    if spec.mpp_from_objective:
        looked_at.append(f"{openslide.PROPERTY_NAME_OBJECTIVE_POWER} (absent)")
    if spec.mpp_overrides:
        looked_at.append(f"the mpp_overrides table {spec.mpp_overrides} (no row for {path.name!r})")
    example = 10.0 / power if power else 0.25
    row = f"'{path.name},{example:g}' (this file's name and its level-0 um/px)"
    fix = (f"add a row {row} to {spec.mpp_overrides}" if spec.mpp_overrides else
           f"set the dataset's mpp_overrides to a CSV with the header 'slide,mpp' and a row {row}")
    advice = f"no level-0 um/px in {', '.join(looked_at)}. Fix: {fix}"
    if power and not spec.mpp_from_objective:
        advice += (f"; or set mpp_from_objective: true to take 10 / its objective power {power:g}x = {example:g} um/px "
                   "(scanners differ: check it)")
    return advice


def _as_float(text: str | None) -> float | None:
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) and value > 0 else None


def slide_properties(slide: openslide.OpenSlide) -> dict[str, str]:
    """The slide's properties as a dict. OpenSlide lists a property whose name is empty (an Aperio
    description with ``| = value``) but cannot look it up: such names are left out."""
    names = slide.properties.keys()
    return {name: slide.properties[name] for name in names if name}


def check_level_claims(slide: openslide.OpenSlide, path: Path) -> None:
    """Refuse levels whose claimed tiles are too large to allocate (OpenSlide allocates a whole tile)."""
    for level, (width, height) in enumerate(slide.level_dimensions):
        if width <= 0 or height <= 0:
            raise TilingError(path, Reason.OPEN_FAILED, f"level {level} claims {width} x {height} px")
        tile_w = _as_float(slide.properties.get(f"openslide.level[{level}].tile-width")) or 1
        tile_h = _as_float(slide.properties.get(f"openslide.level[{level}].tile-height")) or 1
        check_claimed_pixels(path, f"one tile of level {level}", tile_w, tile_h, MAX_TILE_PIXELS)


def best_level(downsamples: tuple[float, ...], wanted: float) -> int:
    """Coarsest level whose downsample does not exceed ``wanted`` (never read below target resolution)."""
    level = 0
    for index, downsample in enumerate(downsamples):
        if downsample <= wanted * (1 + 1e-6):
            level = index
    return level


def resize_area(image: Image.Image, size: int) -> Image.Image:
    """Area (box) interpolation when shrinking, bicubic when enlarging; no-op at size."""
    if image.size == (size, size):
        return image
    shrinking = image.size[0] > size
    return image.resize((size, size), Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC)


def rgba_to_rgb_on_white(image: Image.Image) -> Image.Image:
    """OpenSlide returns premultiplied-free RGBA with alpha 0 outside scanned areas: show white there."""
    if image.mode != "RGBA" or image.getchannel("A").getextrema() == (255, 255):
        return image.convert("RGB")
    background = Image.new("RGB", image.size, (255, 255, 255))
    background.paste(image, mask=image.getchannel("A"))
    return background


def read_level(slide: openslide.OpenSlide, level: int) -> Image.Image:
    """A whole pyramid level as RGB (OpenSlide's get_thumbnail reads the same level whole)."""
    return rgba_to_rgb_on_white(slide.read_region((0, 0), level, slide.level_dimensions[level]))


def read_patch(slide: openslide.OpenSlide, x: int, y: int, read_size: int, level: int,
               patch_size: int) -> np.ndarray:
    """The patch whose level-0 box is (x, y, read_size), as patch_size^2 RGB uint8."""
    level_size = max(1, round(read_size / slide.level_downsamples[level]))
    region = slide.read_region((x, y), level, (level_size, level_size))
    return np.asarray(resize_area(rgba_to_rgb_on_white(region), patch_size))


def reduced(image: Image.Image, factor: int) -> Image.Image:
    """Means of whole factor x factor blocks (the last row/column of blocks may be partial)."""
    return image.reduce(factor) if factor > 1 else image


def integral_level_origin(x: int, y: int, downsample: float) -> tuple[int, int] | None:
    """(x, y) level-0 in level pixels when they fall on whole pixels; else None (OpenSlide then
    paints the region at a sub-pixel offset that only its own reader reproduces)."""
    lx, ly = x / downsample, y / downsample
    if abs(lx - round(lx)) > 1e-6 or abs(ly - round(ly)) > 1e-6:
        return None
    return round(lx), round(ly)


class SlideSource:
    """A slide opened for tiling: plans the tissue grid at construction."""

    def __init__(self, path: Path, spec: DatasetSpec):
        check_readable_file(path)
        self.path = path
        self.spec = spec
        try:
            self.slide = openslide.OpenSlide(path)
        except (openslide.OpenSlideError, OSError) as exc:
            raise TilingError(path, Reason.OPEN_FAILED, f"OpenSlide cannot open it: {exc}") from exc
        self.tiles: TiffLevelReader | None = None
        self.level_image: np.ndarray | None = None
        # Facts about the slide, recorded in its status; filled as they are learnt, so that a
        # failure records everything known when it happened.
        self.info: dict[str, Any] = {}
        try:
            check_level_claims(self.slide, path)
            try:
                self.tiles = TiffLevelReader.open(path, self.slide)
            except TiffLayoutError as exc:
                raise TilingError(path, Reason.OPEN_FAILED, str(exc).removeprefix(f"{path}: ")) from exc
            self._plan()
        except BaseException as exc:
            if isinstance(exc, TilingError):
                exc.facts.update(self.info)
            self.close()
            raise

    def _from_tiles(self, level: int) -> bool:
        return self.tiles is not None and self.tiles.serves(level)

    def _read_level(self, level: int) -> np.ndarray:
        """A whole level as (height, width, 3) uint8."""
        if self._from_tiles(level):
            width, height = self.slide.level_dimensions[level]
            return self.tiles.region(level, 0, 0, width, height)
        return np.asarray(read_level(self.slide, level))

    def _read_patch(self, x: int, y: int) -> np.ndarray:
        level, patch_size = self.level, self.spec.patch_size
        if self._from_tiles(level):
            origin = integral_level_origin(x, y, self.slide.level_downsamples[level])
            if origin is not None:
                level_size = max(1, round(self.read_size / self.slide.level_downsamples[level]))
                region = self.tiles.region(level, origin[0], origin[1], level_size, level_size)
                return np.asarray(resize_area(Image.fromarray(region), patch_size))
        return read_patch(self.slide, x, y, self.read_size, level, patch_size)

    def _plan(self) -> None:
        slide, spec, path = self.slide, self.spec, self.path
        width, height = slide.dimensions
        self.info.update(width=width, height=height, vendor=slide.properties.get(openslide.PROPERTY_NAME_VENDOR),
                         target_mpp=spec.target_mpp)
        self.mpp, mpp_source = level0_mpp(slide_properties(slide), path, spec)
        self.info.update(level0_mpp=self.mpp, mpp_source=mpp_source)
        check_upsampling(path, self.mpp, spec.target_mpp, spec.max_upsample, "um")
        self.read_size = round(spec.patch_size * spec.target_mpp / self.mpp)
        self.level = best_level(slide.level_downsamples, self.read_size / spec.patch_size)
        level_read = self.read_size / slide.level_downsamples[self.level]
        check_claimed_pixels(path, f"one patch's read at level {self.level}", level_read, level_read, MAX_READ_PIXELS)
        # Whole patches only: edge tiles are dropped, never stretched.
        self.cols, self.rows = width // self.read_size, height // self.read_size
        self.info.update(read_size=self.read_size, read_level=self.level, grid_cols=self.cols, grid_rows=self.rows)
        if self.cols == 0 or self.rows == 0:
            raise TilingError(path, Reason.TOO_SMALL,
                              f"{width}x{height} px is smaller than one {self.read_size}px patch")
        downsample = max(1.0, self.read_size / THUMBNAIL_PIXELS_PER_PATCH, max(width, height) / THUMBNAIL_MAX_SIDE)
        qc_scale = max(1.0, max(width, height) / QC_MAX_SIDE)
        # One read serves the mask and the QC image (and, below, the patches).
        overview_level = slide.get_best_level_for_downsample(min(downsample, qc_scale))
        check_claimed_pixels(path, f"level {overview_level}, read whole for the tissue mask",
                             *slide.level_dimensions[overview_level], MAX_READ_PIXELS)
        try:
            overview = self._read_level(overview_level)
            self.info["pixel_reader"] = "tifffile" if self._from_tiles(self.level) else "openslide"
        except (openslide.OpenSlideError, TileDecodeError) as exc:
            raise TilingError(path, Reason.READ_FAILED, f"cannot read pixels for the thumbnail: {exc}") from exc
        level_scale = width / overview.shape[1], height / overview.shape[0]
        mask_factor = max(1, int(downsample / level_scale[0]))  # rounded down: at least the wanted detail
        qc_factor = max(1, math.ceil(qc_scale / level_scale[0]))  # rounded up: at most QC_MAX_SIDE
        # Both are box means over whole blocks (PIL's reduce): the same area average as a resize,
        # at a fraction of a fractional resize's cost; the coarser one is reduced from the finer.
        level_view = Image.frombuffer("RGB", (overview.shape[1], overview.shape[0]), np.ascontiguousarray(overview),
                                      "raw", "RGB", 0, 1)
        finer = min(mask_factor, qc_factor)
        # The coarser factor becomes a multiple of the finer, rounded the way it was rounded above.
        mask_factor = finer * max(1, mask_factor // finer)
        qc_factor = finer * math.ceil(qc_factor / finer)
        base = reduced(level_view, finer)
        self.qc_base = reduced(base, qc_factor // finer)
        self.thumbnail = np.asarray(reduced(base, mask_factor // finer))
        # Level-0 pixels per mask pixel (the last mask pixel of a row or column may cover fewer).
        self.mask_scale = level_scale[0] * mask_factor, level_scale[1] * mask_factor
        # A small single-level slide is read whole for the thumbnail anyway: cut the patches
        # from that image instead of decoding every tile a second time.
        self.level_image = overview if overview_level == self.level == 0 else None
        del overview, level_view, base
        self.mask = tissue_mask(self.thumbnail)
        rows, cols = np.mgrid[0:self.rows, 0:self.cols]
        fractions = box_fractions(self.mask, cols.ravel() * self.read_size / self.mask_scale[0],
                                  rows.ravel() * self.read_size / self.mask_scale[1],
                                  self.read_size / self.mask_scale[0])
        keep = fractions >= self.spec.tissue_threshold
        # Row-major: rows outer, columns inner (np.mgrid order).
        self.candidates = [(int(r), int(c), float(f)) for r, c, f, k in
                           zip(rows.ravel(), cols.ravel(), fractions, keep) if k]
        self.kept: list[tuple[int, int]] = []

    def patches(self) -> Iterator[Patch]:
        for row, col, fraction in self.candidates:
            x, y = col * self.read_size, row * self.read_size
            try:
                if self.level_image is not None:
                    crop = self.level_image[y:y + self.read_size, x:x + self.read_size]
                    rgb = np.asarray(resize_area(Image.fromarray(crop), self.spec.patch_size))
                else:
                    rgb = self._read_patch(x, y)
            except (openslide.OpenSlideError, TileDecodeError) as exc:
                raise TilingError(self.path, Reason.READ_FAILED,
                                  f"reading the patch at level-0 ({x}, {y}) failed: {exc}") from exc
            if is_background_patch(rgb):
                continue
            self.kept.append((row, col))
            yield Patch(col=col, row=row, pixels=rgb, meta={
                "slide": self.path.name, "x": x, "y": y, "read_size": self.read_size,
                "read_level": self.level, "level0_mpp": self.mpp, "mpp": self.spec.target_mpp,
                "tissue_fraction": round(fraction, 4),
            })

    def qc_thumbnail(self) -> Image.Image:
        """The overview (at most QC_MAX_SIDE px) with the tissue mask tinted and kept patches outlined."""
        base = self.qc_base
        mask = Image.fromarray(self.mask).resize(base.size, Image.Resampling.NEAREST)
        tint = Image.blend(base, Image.new("RGB", base.size, (0, 200, 0)), 0.35)
        overlay = Image.composite(tint, base, mask)
        draw = ImageDraw.Draw(overlay)
        width, height = self.slide.dimensions
        sx, sy = width / base.size[0], height / base.size[1]
        for row, col in self.kept:
            x0, y0 = col * self.read_size / sx, row * self.read_size / sy
            draw.rectangle([x0, y0, x0 + self.read_size / sx, y0 + self.read_size / sy], outline=(0, 0, 255))
        return overlay

    def close(self) -> None:
        self.level_image = None
        if self.tiles is not None:
            self.tiles.close()
        self.slide.close()


def open_slide_source(path: str | Path, spec: DatasetSpec) -> SlideSource:
    return SlideSource(Path(path), spec)
