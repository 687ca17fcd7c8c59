"""JPEG sheets of images drawn with PIL, shared by the stages' previews and the report: the one
real | generated pair sheet (the sampling stage's grid.jpg, the report's sample_pairs.jpg)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.io.atomic import atomic_file

BLUE = (31, 95, 191)


def write_jpeg(image: Image.Image, out: str | Path, quality: int = 90) -> None:
    with atomic_file(out) as temp:
        image.convert("RGB").save(temp, format="JPEG", quality=quality)


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)  # FreeType build of Pillow >= 10.1: scalable
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()


def fit(image: Image.Image, max_side: int) -> Image.Image:
    image = image.convert("RGB")
    if max(image.size) > max_side:
        image = image.copy()
        image.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
    return image


def pair_sheet(pairs: Sequence[tuple[np.ndarray, np.ndarray, str]], per_row: int = 4, side: int = 256,
               labels: tuple[str, str] = ("real", "generated")) -> Image.Image:
    """(real, generated, name) triples as real | generated pairs side by side, `per_row` pairs to a
    row, labelled `labels` above and with the name below; images fitted to `side`."""
    gap, label_height = 12, 22
    cell = 2 * side + 4
    columns = max(1, min(per_row, len(pairs)))
    rows = max(1, math.ceil(len(pairs) / columns))
    grid = Image.new("RGB", (columns * (cell + gap) + gap, rows * (side + 2 * label_height + gap) + gap),
                     (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    small = font(13)
    for number, (real, generated, name) in enumerate(pairs):
        left = gap + (number % columns) * (cell + gap)
        top = gap + (number // columns) * (side + 2 * label_height + gap)
        draw.text((left + 2, top + 2), labels[0], fill=(20, 20, 20), font=small)
        draw.text((left + side + 6, top + 2), labels[1], fill=BLUE, font=small)
        for offset, image in ((0, real), (side + 4, generated)):
            grid.paste(fit(Image.fromarray(image), side), (left + offset, top + label_height))
        draw.text((left + 2, top + label_height + side + 3), name[:60], fill=(90, 90, 90), font=small)
    return grid
