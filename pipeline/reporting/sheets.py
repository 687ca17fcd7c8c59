"""The report's JPEG sheets, drawn with PIL: captions, stacked parts, placeholders (the image
helpers and the pair sheet are `pipeline.io.sheets`, which the sampling stage shares)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

from pipeline.io.sheets import font
from pipeline.reporting.notices import random_notice

RED = (176, 0, 32)
GREY = (80, 80, 80)


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


