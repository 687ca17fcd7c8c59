"""Aerial GeoTIFFs through rasterio: georeferencing checks, a ground-distance grid, strip reads.

The grid is laid out in target pixels from the image's top-left corner: tile ``(col, row)``
covers ``patch_size`` target pixels of ``target_mpp`` ground metres each, i.e. ``read_size``
source pixels per side (fractional in general).

Ground metres, not map units: a CRS unit is a ground metre (or foot) only where the projection's
scale is close to 1. The scale is measured at the image's centre (two points 100 pixels apart,
converted to Earth-centred XYZ on the WGS 84 ellipsoid). Within ``GROUND_UNIT_TOLERANCE`` of the
declared unit (UTM, state planes: well under 1 % inside their zones) the declared unit is used;
a Mercator-family CRS (EPSG:3857, 3395: about 1 / cos(latitude) map units per ground metre) is
scaled by the measured factor; any other CRS that far from ground units is refused.

Tiles are resampled by GDAL while reading (average when shrinking, so overviews are used;
bilinear when enlarging) and copied exactly when the source already has the target ground
sample distance. Only whole tiles are cut.

Nodata, internal masks and alpha all reach us as GDAL band masks; a tile whose masked share
exceeds ``max_nodata_fraction`` is dropped, and masked pixels of kept tiles are set to 0.
"""

from __future__ import annotations

import contextlib
import logging
import math
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from PIL import Image, ImageDraw
from rasterio._err import CPLE_BaseError  # GDAL errors rasterio does not always wrap
from rasterio.enums import MaskFlags, Resampling
from rasterio.errors import CRSError, NodataShadowWarning, NotGeoreferencedWarning, RasterioError
from rasterio.io import DatasetReader
from rasterio.warp import transform as transform_points
from rasterio.windows import Window

from pipeline.config import RGB_BANDS, DatasetSpec
from pipeline.tiling.failures import (MAX_READ_PIXELS, Reason, TilingError, check_claimed_pixels, check_readable_file,
                                      check_upsampling)
from pipeline.tiling.outputs import Patch
from pipeline.tiling.tiff_tiles import layout_problem, naming_file

QC_MAX_SIDE = 1024
# A read size this close to a whole number of source pixels is that number: float noise in
# the geotransform must not turn an exact copy into a resampling.
SNAP_TOLERANCE = 1e-6
GDAL_ERRORS = (RasterioError, CPLE_BaseError)
# The tiler's scale promise: map units taken as ground units must be within 1 % of them.
GROUND_UNIT_TOLERANCE = 0.01
# PROJ projections corrected by the centre's factor: Mercator's scale (1 / cos(latitude), up to
# the ellipsoid) depends on latitude alone, so it holds across an image spanning little latitude
# (it drifts by tan(latitude) x the span in radians: 0.03 % over 2 km at 47 N, 1.7 % over 100 km).
MERCATOR_PROJECTIONS = {"merc", "webmerc"}
EARTH_CENTRED = "EPSG:4978"  # WGS 84 geocentric X, Y, Z in metres
SCALE_BASELINE_PX = 100  # distance between the points whose ground distance gives the scale
# Plausible source ground sample distances: from a drone's millimetres to a coarse satellite
# product's 10 km; a pixel size outside is a corrupt geotransform, not a resolution.
GSD_RANGE = (1e-3, 1e4)
DEFLATE = {8, 32946}
# Where rasterio logs GDAL's warnings (libjpeg's "Corrupt JPEG data" among them): during a pixel
# read, each one is an error of that read.
GDAL_LOGGERS = ("rasterio._err", "rasterio._env")


def gdal_message(exc: BaseException) -> str:
    """The GDAL error rasterio chains, when there is one: it says what broke, rasterio's does not."""
    return str(exc.__cause__ or exc)


class _WarningCollector(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def gdal_warnings_fail(path: Path, what: str) -> Iterator[None]:
    """Raise READ_FAILED for a GDAL warning logged inside the block (GDAL recovers from corrupt
    data with pixels of its own making and only a warning in the log)."""
    collector = _WarningCollector()
    loggers = [logging.getLogger(name) for name in GDAL_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(collector)
        if logger.getEffectiveLevel() > logging.WARNING:
            logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.removeHandler(collector)
            logger.setLevel(level)
    if collector.messages:
        raise TilingError(path, Reason.READ_FAILED, f"{what}: GDAL: {'; '.join(dict.fromkeys(collector.messages))}")


def check_segments(path: Path) -> None:
    """What GDAL would not notice in the file's TIFF structure: directories whose segment lists
    contradict their image and tile sizes (GDAL reads missing tiles as empty), and Deflate tiles
    that do not inflate completely to their Adler-32 checksum (GDAL stops once it has the bytes)."""
    import tifffile

    with naming_file(path):
        try:
            tiff = tifffile.TiffFile(path)
        except Exception:  # noqa: BLE001 - not a TIFF tifffile parses: GDAL's reading decides
            return
        with tiff:
            try:
                pages = list(tiff.pages)
                problems = [(page, layout_problem(page)) for page in pages]
            except Exception:  # noqa: BLE001 - tags tifffile cannot interpret: GDAL's reading decides
                return
            for page, problem in problems:
                if problem is not None:
                    raise TilingError(path, Reason.OPEN_FAILED, f"the directory of image {page.index} contradicts "
                                                                f"itself: {problem}")
                if page.compression in DEFLATE:
                    _inflate_segments(path, tiff, page)


def _inflate_segments(path: Path, tiff, page) -> None:
    handle = tiff.filehandle
    for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
        if not count:
            continue
        handle.seek(offset)
        try:
            zlib.decompress(handle.read(count))
        except zlib.error as exc:
            raise TilingError(path, Reason.READ_FAILED,
                              f"segment {index} of image {page.index} (Deflate) is corrupt: {exc}") from exc


def open_dataset(path: Path) -> DatasetReader:
    check_segments(path)
    try:
        with warnings.catch_warnings():
            # Missing georeferencing is reported as a typed failure below, not as a warning.
            warnings.simplefilter("ignore", NotGeoreferencedWarning)
            return rasterio.open(path)
    except GDAL_ERRORS as exc:
        raise TilingError(path, Reason.OPEN_FAILED, f"rasterio cannot open it: {gdal_message(exc)}") from exc


def pixel_size(transform: Affine) -> tuple[float, float]:
    """Ground size of one source pixel along its columns and rows, in CRS units (rotation allowed)."""
    return math.hypot(transform.a, transform.d), math.hypot(transform.b, transform.e)


def ground_metres_per_unit(dataset: DatasetReader, axis: tuple[float, float]) -> float | None:
    """Ground metres per CRS unit at the image's centre along ``axis`` (a step in pixels), or
    None when the CRS cannot be placed on the Earth (an engineering CRS, a point outside it).

    The two points are converted to Earth-centred coordinates on the WGS 84 ellipsoid (height 0):
    their straight-line distance is the ground distance (the chord is shorter than the arc by
    ~1e-10 over 100 pixels). A datum shift moves both points alike.
    """
    source = tuple(float(v) for v in tuple(dataset.transform)[:6])
    centre_col, centre_row = dataset.width / 2, dataset.height / 2
    half = (axis[0] * SCALE_BASELINE_PX / 2, axis[1] * SCALE_BASELINE_PX / 2)
    ends = [pixel_to_crs(source, centre_col - half[0], centre_row - half[1]),
            pixel_to_crs(source, centre_col + half[0], centre_row + half[1])]
    try:
        xs, ys, zs = transform_points(dataset.crs, EARTH_CENTRED, [e[0] for e in ends], [e[1] for e in ends],
                                      zs=[0.0, 0.0])
    except GDAL_ERRORS:
        return None
    ground = math.dist((xs[0], ys[0], zs[0]), (xs[1], ys[1], zs[1]))
    mapped = math.dist(ends[0], ends[1])
    return ground / mapped if math.isfinite(ground) and ground > 0 else None


def ground_scale(dataset: DatasetReader, path: Path, unit: float) -> tuple[float, float]:
    """Ground metres per CRS unit along the pixel columns and rows (see the module docstring)."""
    measured = (ground_metres_per_unit(dataset, (1.0, 0.0)), ground_metres_per_unit(dataset, (0.0, 1.0)))
    crs = dataset.crs.to_string()
    if dataset.crs.to_dict().get("proj") in MERCATOR_PROJECTIONS:
        if None in measured:
            raise TilingError(path, Reason.CRS_NOT_GROUND_METRES,
                              f"{crs} is a Mercator projection, whose map units are not ground metres, and "
                              "its scale at the image centre cannot be computed: reproject to a local CRS in metres")
        return measured
    if None in measured or all(abs(value / unit - 1) <= GROUND_UNIT_TOLERANCE for value in measured):
        # None: an engineering (local) CRS has no ellipsoid to check against; its unit is all there is.
        return unit, unit
    raise TilingError(path, Reason.CRS_NOT_GROUND_METRES,
                      f"in {crs}, one map unit ({unit:g} m) is {measured[0]:.4g} x {measured[1]:.4g} ground metres "
                      f"at the image centre, more than {GROUND_UNIT_TOLERANCE:.0%} off, and no correction is known "
                      "for its projection: reproject to a local projected CRS in metres (e.g. UTM)")


def metres_per_crs_unit(dataset: DatasetReader, path: Path) -> float:
    """Check the georeferencing and return the CRS's linear unit in metres (1 for metres, 0.3048 for feet)."""
    try:
        crs = dataset.crs
        if crs is not None and crs.to_wkt():
            crs.is_geographic, crs.to_string(), crs.to_dict()  # what the checks below use
    except CRSError as exc:
        raise TilingError(path, Reason.BAD_GEOREFERENCE, f"its CRS cannot be used: {exc}") from exc
    if crs is None or not crs.to_wkt():
        hint = "; it has ground control points only: warp it first (gdalwarp)" if dataset.gcps[0] else ""
        raise TilingError(path, Reason.NO_CRS, f"no coordinate reference system{hint}")
    if crs.is_geographic:
        raise TilingError(path, Reason.CRS_IN_DEGREES,
                          f"{crs.to_string()} is geographic (degrees): reproject to a projected CRS in metres")
    if dataset.transform.is_identity:
        raise TilingError(path, Reason.NO_CRS, f"a CRS ({crs.to_string()}) but no geotransform")
    check_transform(dataset.transform, path)
    try:
        _unit, factor = crs.linear_units_factor
    except RasterioError as exc:
        raise TilingError(path, Reason.NO_CRS, f"{crs.to_string()} has no linear unit: {exc}") from exc
    except CRSError as exc:
        raise TilingError(path, Reason.BAD_GEOREFERENCE, f"its CRS ({crs.to_string()}) cannot be used: {exc}") from exc
    return float(factor)


def check_transform(transform: Affine, path: Path) -> None:
    """A geotransform that places pixels: finite, not degenerate, not mirrored (columns run east,
    rows south of them, as GeoTIFF's positive pixel scales say), pixels of a plausible size."""
    coefficients = tuple(transform)[:6]
    if not all(math.isfinite(value) for value in coefficients):
        raise TilingError(path, Reason.BAD_GEOREFERENCE, f"the geotransform {coefficients} is not finite")
    determinant = transform.a * transform.e - transform.b * transform.d
    if determinant >= 0:
        shape = "degenerate (zero-area pixels)" if determinant == 0 else "mirrored (a negative pixel scale)"
        raise TilingError(path, Reason.BAD_GEOREFERENCE, f"the geotransform {coefficients} is {shape}: "
                                                         "fix the georeferencing (e.g. gdalwarp it)")
    sizes = pixel_size(transform)
    if not all(GSD_RANGE[0] <= size <= GSD_RANGE[1] for size in sizes):
        raise TilingError(path, Reason.BAD_GEOREFERENCE,
                          f"pixels of {sizes[0]:.4g} x {sizes[1]:.4g} map units are outside the plausible "
                          f"{GSD_RANGE[0]:g}-{GSD_RANGE[1]:g}: the geotransform is corrupt")


def check_bands(dataset: DatasetReader, path: Path, bands: tuple[int, ...]) -> None:
    missing = [band for band in bands if not 1 <= band <= dataset.count]
    if missing:
        raise TilingError(path, Reason.UNSUPPORTED_BANDS,
                          f"bands {list(bands)} configured, but the image has {dataset.count} band(s)")
    dtypes = {dataset.dtypes[band - 1] for band in bands}
    if dtypes != {"uint8"}:
        raise TilingError(path, Reason.UNSUPPORTED_DTYPE,
                          f"bands {list(bands)} are {sorted(dtypes)}; only 8-bit (uint8) imagery is tiled")


def snap(value: float) -> float:
    nearest = round(value)
    return float(nearest) if abs(value - nearest) <= SNAP_TOLERANCE * max(1.0, value) else value


def resampling_for(read_size: float, patch_size: int) -> Resampling:
    # Area interpolation when shrinking (GDAL picks a suitable overview first); smooth when enlarging.
    return Resampling.average if read_size > patch_size else Resampling.bilinear


def has_mask(dataset: DatasetReader, bands: tuple[int, ...]) -> bool:
    """Whether GDAL masks any pixel of the configured bands (nodata, internal mask or alpha)."""
    return any(MaskFlags.all_valid not in dataset.mask_flag_enums[band - 1] for band in bands)


def tile_transform(source: Affine, x: float, y: float, scale_x: float, scale_y: float) -> tuple[float, ...]:
    """[a, b, c, d, e, f] of a tile starting at source pixel (x, y), with target pixels of
    ``scale`` source pixels (written out: affine's ``*`` is deprecated, its ``@`` is recent)."""
    a, b, c, d, e, f = (float(v) for v in tuple(source)[:6])
    return (a * scale_x, b * scale_y, c + a * x + b * y, d * scale_x, e * scale_y, f + d * x + e * y)


def pixel_to_crs(transform: tuple[float, ...], col: float, row: float) -> tuple[float, float]:
    a, b, c, d, e, f = transform
    return a * col + b * row + c, d * col + e * row + f


class AerialSource:
    """A GeoTIFF opened for tiling: checks and plans the grid at construction."""

    def __init__(self, path: Path, spec: DatasetSpec):
        check_readable_file(path)
        self.path = path
        self.spec = spec
        self.dataset = open_dataset(path)
        # Facts about the input, recorded in its status; filled as they are learnt, so that a
        # failure records everything known when it happened.
        self.info: dict[str, Any] = {}
        try:
            self._plan()
        except BaseException as exc:
            if isinstance(exc, TilingError):
                exc.facts.update(self.info)
            self.dataset.close()
            raise

    def _plan(self) -> None:
        dataset, spec, path = self.dataset, self.spec, self.path
        self.info.update({
            "crs": (dataset.crs.to_string() or None) if dataset.crs else None,
            "width": dataset.width, "height": dataset.height, "band_count": dataset.count,
            "dtype": ",".join(sorted(set(dataset.dtypes))), "bands": list(spec.bands), "gsd": spec.target_mpp,
        })
        unit = metres_per_crs_unit(dataset, path)
        check_bands(dataset, path, spec.bands)
        self.bands = tuple(spec.bands)
        size_x, size_y = pixel_size(dataset.transform)
        self.info["map_units_per_px"] = size_x
        scale_x, scale_y = ground_scale(dataset, path, unit)
        self.source_gsd = size_x * scale_x
        self.info.update(source_gsd=self.source_gsd, ground_scale=scale_x)
        check_upsampling(path, max(self.source_gsd, size_y * scale_y), spec.target_mpp, spec.max_upsample, "m")
        # Source pixels per tile side; x and y differ for non-square source pixels (and, by a few
        # tenths of a percent, for Web Mercator, which is not conformal on the ellipsoid).
        self.read_w = snap(spec.patch_size * spec.target_mpp / (size_x * scale_x))
        self.read_h = snap(spec.patch_size * spec.target_mpp / (size_y * scale_y))
        self.exact_copy = self.read_w == self.read_h == spec.patch_size
        self.resampling = resampling_for(max(self.read_w, self.read_h), spec.patch_size)
        self.masked = has_mask(dataset, self.bands)
        # Whole tiles only: a partial edge tile is dropped, never stretched.
        self.cols = math.floor(dataset.width / self.read_w + SNAP_TOLERANCE)
        self.rows = math.floor(dataset.height / self.read_h + SNAP_TOLERANCE)
        self.crs = self.info["crs"]
        # The source's own affine, so that a region of tiles can be placed without reopening the file.
        self.info["source_transform"] = [float(v) for v in tuple(dataset.transform)[:6]]
        self.info.update(read_size=self.read_w, grid_cols=self.cols, grid_rows=self.rows)
        check_claimed_pixels(path, "one row of tiles", self.cols * spec.patch_size, spec.patch_size, MAX_READ_PIXELS)
        if self.cols == 0 or self.rows == 0:
            raise TilingError(path, Reason.TOO_SMALL,
                              f"{dataset.width}x{dataset.height} px at {self.source_gsd:.4g} m/px is smaller than "
                              f"one {spec.patch_size}px tile at {spec.target_mpp:g} m/px")
        self.kept: list[tuple[int, int]] = []

    def _read_strip(self, row: int) -> tuple[np.ndarray, np.ndarray | None]:
        """One row of tiles as (bands x patch x cols*patch uint8, valid-pixel mask or None).

        One read per tile row rather than per tile, so each internal (compressed) block is
        decoded about once: the tiles of a row share its blocks, and a block that also reaches
        into the next tile row is normally still in GDAL's block cache.
        """
        patch = self.spec.patch_size
        if self.exact_copy:  # whole-pixel window at the target resolution: plain copy
            window = Window(0, row * patch, self.cols * patch, patch)
            shape = None
        else:
            window = Window(0, row * self.read_h, self.cols * self.read_w, self.read_h)
            shape = (len(self.bands), patch, self.cols * patch)
        try:
            with gdal_warnings_fail(self.path, f"reading tile row {row}"):
                pixels, valid = self._read_window(window, shape)
        except GDAL_ERRORS as exc:
            raise TilingError(self.path, Reason.READ_FAILED,
                              f"reading tile row {row} failed: {gdal_message(exc)}") from exc
        return pixels, valid

    def _read_window(self, window: Window, shape: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray | None]:
        pixels = self.dataset.read(self.bands, window=window, out_shape=shape, resampling=self.resampling)
        valid = None
        if self.masked:
            with warnings.catch_warnings():
                # GDAL lets a nodata value win over an alpha band; that is the order we document.
                warnings.simplefilter("ignore", NodataShadowWarning)
                masks = self.dataset.read_masks(self.bands, window=window, out_shape=shape,
                                                resampling=Resampling.nearest)
            # Like GDAL's dataset mask: a pixel is nodata only when all bands used say so.
            # An alpha band's own mask is all-valid, so configuring a band tagged alpha as a
            # colour (an RGBN file written as RGBA) turns the alpha masking off, as it should.
            valid = masks.any(axis=0)
        return pixels, valid

    def patches(self) -> Iterator[Patch]:
        patch = self.spec.patch_size
        for row in range(self.rows):
            pixels, valid = self._read_strip(row)
            for col in range(self.cols):
                columns = slice(col * patch, (col + 1) * patch)
                tile = np.ascontiguousarray(pixels[:, :, columns].transpose(1, 2, 0))
                nodata_fraction = 0.0
                if valid is not None:
                    tile_valid = valid[:, columns]
                    nodata_fraction = 1.0 - float(tile_valid.mean())
                    if nodata_fraction > self.spec.max_nodata_fraction:
                        continue
                    tile[~tile_valid] = 0  # no stray nodata fill values inside kept tiles
                self.kept.append((row, col))
                yield Patch(col=col, row=row, pixels=tile, meta=self._tile_meta(col, row, nodata_fraction))

    def _tile_meta(self, col: int, row: int, nodata_fraction: float) -> dict[str, Any]:
        patch = self.spec.patch_size
        x, y = col * self.read_w, row * self.read_h
        affine = tile_transform(self.dataset.transform, x, y, self.read_w / patch, self.read_h / patch)
        corners = [pixel_to_crs(affine, col_px, row_px) for col_px, row_px in
                   ((0, 0), (patch, 0), (0, patch), (patch, patch))]
        xs, ys = [corner[0] for corner in corners], [corner[1] for corner in corners]
        return {
            "x": float(x), "y": float(y), "read_size": float(self.read_w),
            "gsd": self.spec.target_mpp, "source_gsd": self.source_gsd,
            "map_units_per_px": self.info["map_units_per_px"], "ground_scale": self.info["ground_scale"],
            "crs": self.crs,
            "transform": list(affine),
            "bounds": [min(xs), min(ys), max(xs), max(ys)], "bands": list(self.bands),
            "nodata_fraction": round(nodata_fraction, 6),
        }

    def qc_thumbnail(self) -> Image.Image:
        """The first three configured bands as RGB (longest side at most QC_MAX_SIDE), kept tiles outlined in blue."""
        width, height = self.dataset.width, self.dataset.height
        scale = max(1.0, max(width, height) / QC_MAX_SIDE)
        size = (max(1, round(width / scale)), max(1, round(height / scale)))
        try:  # an out_shape read lets GDAL use the overviews instead of decoding full resolution
            with gdal_warnings_fail(self.path, "reading the overview"):
                pixels = self.dataset.read(self.bands[:RGB_BANDS], out_shape=(RGB_BANDS, size[1], size[0]),
                                           resampling=Resampling.average)
        except GDAL_ERRORS as exc:
            raise TilingError(self.path, Reason.READ_FAILED,
                              f"reading the overview failed: {gdal_message(exc)}") from exc
        overview = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), "RGB")
        draw = ImageDraw.Draw(overview)
        sx, sy = width / size[0], height / size[1]
        for row, col in self.kept:
            x0, y0 = col * self.read_w / sx, row * self.read_h / sy
            draw.rectangle([x0, y0, x0 + self.read_w / sx, y0 + self.read_h / sy], outline=(0, 0, 255))
        return overview

    def close(self) -> None:
        self.dataset.close()


def open_aerial_source(path: str | Path, spec: DatasetSpec) -> AerialSource:
    return AerialSource(Path(path), spec)
