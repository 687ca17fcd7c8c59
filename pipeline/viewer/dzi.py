"""Deep Zoom (DZI) pyramids of the large images, the tiles OpenSeadragon shows.

Tiles come from OpenSlide's `DeepZoomGenerator`, which reads each tile from the best level of its
source: a pyramidal TIFF through OpenSlide (the large-image stage's ``generated.tif``), so memory
stays at a few tiles whatever the image's size, or a PNG through OpenSlide's `ImageSlide` (Pillow
holds it whole, which is bounded: the stage writes PNGs only up to 4096², 48 MiB). Tiles are RGB:
an alpha channel is composited on white, as OpenSlide does.

Layout (Microsoft's Deep Zoom format): ``NAME.dzi`` (the XML) and ``NAME_files/<level>/<col>_<row>.jpeg``;
level 0 is 1x1 px and each level doubles up to the full image.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError
from pipeline.viewer.settings import ViewerSettings

DZI_XMLNS = "http://schemas.microsoft.com/deepzoom/2008"
TILE_FORMAT = "jpeg"


@dataclass(frozen=True)
class DeepZoomImage:
    """A written DZI pyramid: what a page needs to show it."""

    name: str
    width: int
    height: int
    tile_size: int
    overlap: int
    levels: int
    pixel_size_um: float | None  # recorded in the source (a TIFF's resolution), None when it has none

    def tile_source(self) -> dict[str, Any]:
        """OpenSeadragon's inline form of the .dzi XML (so no XHR is needed: file:// pages work);
        the tile URL is relative to the page, which sits next to the pyramid."""
        return {"Image": {"xmlns": DZI_XMLNS, "Url": f"{self.name}_files/", "Format": TILE_FORMAT,
                          "Overlap": str(self.overlap), "TileSize": str(self.tile_size),
                          "Size": {"Width": str(self.width), "Height": str(self.height)}}}

    def xml(self) -> str:
        return (f'<?xml version="1.0" encoding="UTF-8"?>\n<Image xmlns="{DZI_XMLNS}" Format="{TILE_FORMAT}" '
                f'Overlap="{self.overlap}" TileSize="{self.tile_size}">\n'
                f'  <Size Width="{self.width}" Height="{self.height}"/>\n</Image>\n')


def open_image(path: Path):
    """An OpenSlide object for a pyramidal TIFF, an ImageSlide for a PNG; a clear error otherwise."""
    import openslide
    from PIL import UnidentifiedImageError

    if not path.is_file():
        raise FileNotFoundError(f"{path}: image not found")
    try:
        return openslide.open_slide(path)
    except (openslide.OpenSlideError, UnidentifiedImageError, OSError) as exc:
        raise PipelineError(f"{path}: cannot be read as an image ({exc})") from exc


def recorded_pixel_size_um(image) -> float | None:
    import openslide

    value = image.properties.get(openslide.PROPERTY_NAME_MPP_X)
    try:
        size = float(value) if value is not None else None
    except ValueError:
        return None
    return size if size and size > 0 else None


def write_dzi(source: Path, folder: Path, name: str, settings: ViewerSettings) -> DeepZoomImage:
    """Write ``folder/NAME.dzi`` and ``folder/NAME_files/`` from the image at ``source``."""
    from openslide import OpenSlideError
    from openslide.deepzoom import DeepZoomGenerator

    with open_image(source) as image:
        zoom = DeepZoomGenerator(image, tile_size=settings.tile_size, overlap=settings.overlap, limit_bounds=False)
        width, height = zoom.level_dimensions[-1]
        written = DeepZoomImage(name, width, height, settings.tile_size, settings.overlap, zoom.level_count,
                                recorded_pixel_size_um(image))
        for level in range(zoom.level_count):
            level_dir = folder / f"{name}_files" / str(level)
            level_dir.mkdir(parents=True)
            columns, rows = zoom.level_tiles[level]
            for row in range(rows):
                for column in range(columns):
                    try:
                        tile = zoom.get_tile(level, (column, row))
                    except (OpenSlideError, OSError) as exc:
                        raise PipelineError(f"{source}: tile ({column}, {row}) of level {level} "
                                            f"cannot be read ({exc})") from exc
                    tile.convert("RGB").save(level_dir / f"{column}_{row}.{TILE_FORMAT}", "JPEG",
                                             quality=settings.jpeg_quality, subsampling=0)
    (folder / f"{name}.dzi").write_text(written.xml())
    return written


def thumbnail(source: Path, size: int):
    """An RGB thumbnail of at most ``size`` px a side, read from the source's smallest fitting level."""
    with open_image(source) as image:
        return image.get_thumbnail((size, size)).convert("RGB")
