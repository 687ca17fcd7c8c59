"""Write very large generated RGB images to disk with bounded memory.

* :func:`write_pyramid_tiff` writes a tiled, pyramidal TIFF that OpenSlide (``generic-tiff``
  vendor) and QuPath open, with its pixel size recorded, from a uint8 ``(H, W, 3)`` array-like
  (usually an ``np.memmap``) read band by band. Peak memory is a few bands of ``tile`` rows
  (about ``4 * tile * W * 3`` bytes: 24 MiB for an 8192-wide image at 256-pixel tiles), whatever
  the image height; the source is never copied whole and never converted to float.
* :func:`write_png` writes a PNG of an image of at most 4096 x 4096 pixels (Pillow needs it in
  memory: 48 MiB at 4096 x 4096).
* :class:`FirstBands` shows the first three bands of an (H, W, bands) image (R, G, B, NIR) to these
  RGB writers; :mod:`pipeline.io.geotiff` writes all of its bands, georeferenced.

Both write under a temporary name in the destination folder and rename at the end
(:mod:`pipeline.io.atomic`), so a failed or killed write never leaves a file at the final path.

TIFF layout (checked against OpenSlide 4.0):

* level 0 is the first IFD; each further level is the next IFD (``NewSubfileType`` = reduced
  resolution), half the previous level's size rounded down, until the level fits in one tile.
  OpenSlide 4 ignores SubIFD pyramids, so the levels are successive IFDs (as libvips writes them).
* every level is tiled (``tile`` x ``tile``, edge tiles padded by repeating the last row/column),
  JPEG (YCbCr without chroma subsampling, 4:4:4, ``jpeg_quality``, default 95: as the patches
  are written) or deflate with the horizontal predictor (lossless). 4:2:0 halves the colour
  resolution, which on H&E costs about as much as going from quality 95 to below 90.
* level ``k + 1`` is the 2x2 box average of level ``k``, rounded half up:
  ``(a + b + c + d + 2) // 4`` in integers; an odd last row or column of level ``k`` is dropped.
  Levels are built one band at a time while the previous level is written, through raw
  temporary files next to the output (read with ``readinto``, so they never sit in the
  process's memory).
* ``XResolution``/``YResolution`` are in pixels per centimetre (``ResolutionUnit`` = cm), which
  OpenSlide reports as ``openslide.mpp-x``/``openslide.mpp-y`` in micrometres per pixel.
* BigTIFF is used when the uncompressed pyramid exceeds 2 GiB (OpenSlide and QuPath read both).
"""

from __future__ import annotations

import mmap
from collections.abc import Generator
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.io.atomic import atomic_file, remove_path, temp_sibling

MAX_PNG_SIDE = 4096
UM_PER_M = 1e6
"""Aerial images: ``pixel_size_um = metres_per_pixel * UM_PER_M`` (1 m/px is 1e6 um/px)."""

Compression = Literal["jpeg", "deflate"]


def write_pyramid_tiff(
    path: str | Path,
    image: Any,
    pixel_size_um: float,
    *,
    compression: Compression = "jpeg",
    jpeg_quality: int = 95,
    tile: int = 256,
    description: str | None = None,
    workers: int = 1,
) -> list[tuple[int, int]]:
    """Write ``image`` as a tiled pyramidal TIFF at ``path``; return each level's (width, height).

    ``image``: uint8 array-like of shape (H, W, 3) that supports ``image[y0:y1]`` (an np.memmap,
    a NumPy array, a zarr or h5py array). It is read ``tile`` rows at a time; pages of an
    np.memmap source are released from this process after each band, so the resident size does
    not grow with the image.
    ``pixel_size_um``: size of one level-0 pixel in micrometres (slides: um/px, e.g. 0.5 at 20x;
    aerial images: metres/px * 1e6, e.g. 1 m/px -> 1e6). OpenSlide reports it as
    ``openslide.mpp-x`` and ``openslide.mpp-y``.
    ``compression``: "jpeg" (lossy, 4:4:4, ``jpeg_quality``) or "deflate" (lossless).
    ``tile``: tile side in pixels, a multiple of 16 (256 or 512 are usual).
    ``description``: the ImageDescription text (OpenSlide's ``openslide.comment``).
    ``workers``: threads that compress tiles.

    The returned sizes are OpenSlide's ``level_dimensions``. Temporary files (the TIFF being
    written, raw files of the levels being built: at most a third of the image's bytes) are
    dot-files next to ``path``, removed on success and on error.
    """
    import imagecodecs  # noqa: F401  tifffile's JPEG and deflate encoders: fail here if missing
    import tifffile

    path = Path(path)
    height, width = _check_image(image)
    if not (pixel_size_um > 0 and np.isfinite(pixel_size_um)):
        raise ValueError(f"pixel_size_um must be a positive number, got {pixel_size_um!r}")
    if tile <= 0 or tile % 16:
        raise ValueError(f"tile must be a positive multiple of 16, got {tile}")
    if compression == "jpeg":
        if not 1 <= jpeg_quality <= 100:
            raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
        # tifffile subsamples RGB JPEG 2x2 unless told; (1, 1) keeps full colour (photometric YCbCr).
        codec: dict[str, Any] = {"compression": "jpeg", "compressionargs": {"level": int(jpeg_quality)},
                                 "subsampling": (1, 1)}
    elif compression == "deflate":
        codec = {"compression": "zlib", "predictor": True}
    else:
        raise ValueError(f"compression must be 'jpeg' or 'deflate', got {compression!r}")
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")

    sizes = pyramid_sizes(height, width, tile)
    bigtiff = sum(h * w * 3 for h, w in sizes) > 2**31
    tile_bytes = tile * tile * 3
    level_files = [temp_sibling(path.with_name(f"{path.name}.level{k}")) for k in range(len(sizes))]
    try:
        with atomic_file(path) as temp, tifffile.TiffWriter(temp, bigtiff=bigtiff) as tiff:
            for k, (h, w) in enumerate(sizes):
                if k == 0:
                    bands = _array_bands(image, tile)
                else:
                    bands = _file_bands(level_files[k], h, w, tile)
                sink = level_files[k + 1] if k + 1 < len(sizes) else None
                # Resolution of this level's own pixels (level 0's is the one readers use).
                xres = 1e4 / (pixel_size_um * width / w)
                yres = 1e4 / (pixel_size_um * height / h)
                tiles = _tiles(bands, w, tile, sink)
                tiff.write(
                    tiles,
                    shape=(h, w, 3),
                    dtype=np.uint8,
                    photometric="rgb",
                    tile=(tile, tile),
                    resolution=(xres, yres),
                    resolutionunit="CENTIMETER",
                    subfiletype=1 if k else 0,
                    description=description if k == 0 else None,
                    software="rldiff-pipeline",
                    metadata=None,
                    maxworkers=workers,
                    buffersize=tile_bytes * 4 * workers,
                    **codec,
                )
                tiles.close()  # tifffile stops at the last tile: finish the generator, close sink
                if sink is not None and sink.stat().st_size != sizes[k + 1][0] * sizes[k + 1][1] * 3:
                    raise RuntimeError(f"pyramid level {k + 1} of {path} came out short")
                remove_path(level_files[k])
    finally:
        for file in level_files:
            remove_path(file)
    return [(w, h) for h, w in sizes]


def pyramid_sizes(height: int, width: int, tile: int = 256) -> list[tuple[int, int]]:
    """(height, width) of each level: halved (rounded down) until the level fits in one tile."""
    sizes = [(height, width)]
    while max(sizes[-1]) > tile and min(sizes[-1]) >= 2:
        h, w = sizes[-1]
        sizes.append((h // 2, w // 2))
    return sizes


def downsample_2x(band: np.ndarray) -> np.ndarray:
    """2x2 box average of a uint8 (h, w, 3) array, rounded half up; odd last row/column dropped."""
    h, w = band.shape[0] // 2 * 2, band.shape[1] // 2 * 2
    out = band[0:h:2, 0:w:2].astype(np.uint16)
    out += band[1:h:2, 0:w:2]
    out += band[0:h:2, 1:w:2]
    out += band[1:h:2, 1:w:2]
    out += 2
    out >>= 2
    return out.astype(np.uint8)


def write_png(path: str | Path, image: Any, *, compress_level: int = 6) -> None:
    """Write a uint8 (H, W, 3) array-like of at most 4096 x 4096 pixels as a PNG, atomically."""
    from PIL import Image

    height, width = _check_image(image)
    if max(height, width) > MAX_PNG_SIDE:
        raise ValueError(
            f"image is {width}x{height} pixels; write_png takes at most {MAX_PNG_SIDE}x{MAX_PNG_SIDE} "
            "(Pillow holds the whole image in memory): use write_pyramid_tiff for larger images"
        )
    pixels = Image.fromarray(np.array(image[:height], dtype=np.uint8, copy=True))
    release_mapped_pages(image)
    with atomic_file(path) as temp:
        pixels.save(temp, format="PNG", compress_level=compress_level)


def _check_image(image: Any) -> tuple[int, int]:
    shape = tuple(getattr(image, "shape", ()))
    dtype = np.dtype(getattr(image, "dtype", None))
    if len(shape) != 3 or shape[2] != 3 or dtype != np.uint8:
        raise ValueError(f"expected a uint8 (H, W, 3) image, got shape {shape} and dtype {dtype}")
    if shape[0] < 1 or shape[1] < 1:
        raise ValueError(f"image is empty: shape {shape}")
    return int(shape[0]), int(shape[1])


def _array_bands(image: Any, rows: int) -> Generator[np.ndarray, None, None]:
    """Copies of ``rows``-row bands of ``image``, top to bottom."""
    for y in range(0, image.shape[0], rows):
        band = np.array(image[y : y + rows], dtype=np.uint8, copy=True)
        release_mapped_pages(image)
        yield band


def _file_bands(file: Path, height: int, width: int, rows: int) -> Generator[np.ndarray, None, None]:
    """Bands of a raw (height, width, 3) uint8 file, read with readinto (never mapped)."""
    with open(file, "rb") as f:
        for y in range(0, height, rows):
            band = np.empty((min(rows, height - y), width, 3), np.uint8)
            if f.readinto(memoryview(band).cast("B")) != band.nbytes:
                raise OSError(f"{file}: temporary pyramid level is shorter than expected")
            yield band


def _tiles(
    bands: Generator[np.ndarray, None, None], width: int, tile: int, sink: Path | None
) -> Generator[np.ndarray, None, None]:
    """The tiles of each band in row-major order; the next level's rows are appended to ``sink``."""
    f = open(sink, "wb") if sink is not None else None
    try:
        for band in bands:
            if f is not None:
                f.write(downsample_2x(band).data)
            for x in range(0, width, tile):
                piece = band[:, x : x + tile]
                if piece.shape[:2] == (tile, tile):
                    yield np.ascontiguousarray(piece)
                else:
                    # Edge padding (not zeros) keeps JPEG blocks at the border free of ringing.
                    pad = ((0, tile - piece.shape[0]), (0, tile - piece.shape[1]), (0, 0))
                    yield np.pad(piece, pad, mode="edge")
    finally:
        bands.close()
        if f is not None:
            f.close()


class FirstBands:
    """The first three bands of a uint8 (H, W, bands) array-like as an (H, W, 3) one (the RGB preview
    of an R, G, B, NIR image): row slices are copies, and ``base`` lets the writers release an
    np.memmap source's pages after each read."""

    def __init__(self, image: Any) -> None:
        self.base = image
        self.shape = (image.shape[0], image.shape[1], 3)
        self.dtype = image.dtype

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.ascontiguousarray(self.base[rows][..., :3])


def rgb_view(image: Any) -> Any:
    """``image`` itself when it has three bands, else its first three (:class:`FirstBands`)."""
    return image if image.shape[2] == 3 else FirstBands(image)


class StreamedRows:
    """Row slices of a memmap image as copies, dropping the mapped pages after each read, so that
    a pass over an image larger than memory (e.g. a seam score) keeps none of it resident."""

    def __init__(self, image: Any) -> None:
        self.image = image
        self.shape = image.shape

    def __getitem__(self, rows: slice) -> np.ndarray:
        block = np.array(self.image[rows])
        release_mapped_pages(self.image)
        return block


def release_mapped_pages(image: Any) -> None:
    """Drop this process's mapping of an np.memmap source's pages (they stay in the page cache).

    Only for shared mappings (modes r, r+, w+): their data lives in the file, so a later access
    just maps the page again. A copy-on-write memmap (mode c) is left alone.
    """
    base = image
    while base is not None and not isinstance(base, np.memmap):
        base = getattr(base, "base", None)
    mapping = getattr(base, "_mmap", None)
    if not isinstance(mapping, mmap.mmap) or getattr(base, "mode", "c") == "c":
        return
    if hasattr(mapping, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mapping.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass
