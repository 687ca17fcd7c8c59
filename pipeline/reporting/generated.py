"""The reference-free images in the report (generated.jpg): each image the `generate` stage made
from a grid its prior sampled, beside that grid's tissue mask, from
`pipeline.sampling.outputs.read_generated_images`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from pipeline.io.images import read_image
from pipeline.io.sheets import BLUE, font, write_jpeg
from pipeline.reporting.sheets import GREY, Caption, stack, title_bar
from pipeline.sampling.outputs import ReferenceFreeImage, read_generated_images


def _image_row(image: ReferenceFreeImage, max_side: int) -> Image.Image:
    picture = Image.fromarray(read_image(image.generated, max_side))
    mask = Image.fromarray(np.where(image.tissue, 90, 235).astype(np.uint8)).resize(picture.size, Image.NEAREST)
    row = Image.new("RGB", (picture.width * 2 + 30, picture.height + 48), (255, 255, 255))
    draw = ImageDraw.Draw(row)
    typeface = font(14)
    settings = image.settings
    draw.text((10, 4), f"{image.name}: {settings.get('rows')}x{settings.get('cols')} grid sampled by the prior "
                       f"(seed {settings.get('grid_seed')}), {settings.get('tissue_fraction', 0):.0%} tissue; "
                       f"{settings.get('width')}x{settings.get('height')} px", fill=(20, 20, 20), font=typeface)
    draw.text((10, 24), "sampled tissue mask (dark: tissue)", fill=(20, 20, 20), font=typeface)
    draw.text((picture.width + 20, 24), "generated, no reference", fill=BLUE, font=typeface)
    row.paste(mask.convert("RGB"), (10, 46))
    row.paste(picture, (picture.width + 20, 46))
    return row


def generated_sheet(generated_dir: str | Path, out: str | Path, dataset: str, max_side: int = 768,
                    max_images: int = 8) -> int:
    """JPEG sheet: per reference-free image, its sampled tissue mask (left) and the image (right)."""
    generated = read_generated_images(generated_dir)
    shown = generated.images[:max_images]
    rows = [_image_row(image, max_side) for image in shown]
    first = shown[0].settings
    lines = [Caption(f"{dataset}: {len(shown)} of {len(generated.images)} reference-free images, each from an "
                     "embedding grid sampled by the dataset's prior (no real region behind it)"),
             Caption(f"mode {first.get('mode', '?')}, {first.get('steps', '?')} steps; prior {first.get('prior_steps')} "
                     f"DDIM steps; background positions are glass; shown downscaled to at most {max_side} px", GREY)]
    write_jpeg(stack([title_bar(max(r.width for r in rows), lines), *rows]), out)
    return len(shown)
