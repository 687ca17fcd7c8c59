"""JPEG contact sheets drawn with PIL: captions, stacked parts, placeholders, and the one
real | generated pair sheet (the sampling stage's grid.jpg and the report's sample_pairs.jpg)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from pipeline.io.atomic import atomic_file
from pipeline.reporting.notices import random_notice

RED = (176, 0, 32)
BLUE = (31, 95, 191)
GREY = (80, 80, 80)


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


def wrap_to_width(text: str, typeface: ImageFont.ImageFont, width: float) -> list[str]:
    """Greedy word wrap of `text` so that each line is at most `width` pixels wide."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and typeface.getlength(candidate) > width:
            lines.append(line)
            line = word
        else:
            line = candidate
    return [*lines, line]


def placeholder(size: tuple[int, int], text: str) -> Image.Image:
    """A grey box saying why there is no image."""
    image = Image.new("RGB", size, (225, 225, 225))
    typeface = font(14)
    lines = wrap_to_width(text, typeface, size[0] - 20)
    ImageDraw.Draw(image).multiline_text((10, 10), "\n".join(lines), fill=(90, 90, 90), font=typeface)
    return image


@dataclass
class Caption:
    """A line of text over an image in a sheet."""
    text: str
    color: tuple[int, int, int] = (30, 30, 30)


def random_lines(what: Sequence[str]) -> list[Caption]:
    """The RANDOM WEIGHTS caption, in red, when anything was randomly initialised."""
    return [Caption(random_notice(what), RED)] if what else []


def title_bar(width: int, lines: Sequence[Caption], size: int = 16) -> Image.Image:
    """Text lines over a sheet, wrapped to its width."""
    typeface = font(size)
    wrapped = [(piece, line.color) for line in lines for piece in wrap_to_width(line.text, typeface, width - 16)]
    bar = Image.new("RGB", (width, 8 + len(wrapped) * (size + 6)), (255, 255, 255))
    draw = ImageDraw.Draw(bar)
    for number, (text, color) in enumerate(wrapped):
        draw.text((8, 6 + number * (size + 6)), text, fill=color, font=typeface)
    return bar


def stack(parts: Sequence[Image.Image], background=(255, 255, 255), min_width: int = 0) -> Image.Image:
    """Parts one under the other, left-aligned."""
    width = max(min_width, *(p.width for p in parts))
    sheet = Image.new("RGB", (width, sum(p.height for p in parts)), background)
    top = 0
    for part in parts:
        sheet.paste(part, (0, top))
        top += part.height
    return sheet


def pair_sheet(pairs: Sequence[tuple[np.ndarray, np.ndarray, str]], per_row: int = 4, side: int = 256) -> Image.Image:
    """(real, generated, name) triples as real | generated pairs side by side, `per_row` pairs to a
    row, labelled "real" and "generated" above and with the name below; images fitted to `side`."""
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
        draw.text((left + 2, top + 2), "real", fill=(20, 20, 20), font=small)
        draw.text((left + side + 6, top + 2), "generated", fill=BLUE, font=small)
        for offset, image in ((0, real), (side + 4, generated)):
            grid.paste(fit(Image.fromarray(image), side), (left + offset, top + label_height))
        draw.text((left + 2, top + label_height + side + 3), name[:60], fill=(90, 90, 90), font=small)
    return grid
