"""The tiling stage in the report: the inputs table (slides.html) and the sheet of QC thumbnails
(thumbnails.jpg), from `pipeline.tiling.status.read_tiling_status`."""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd
from PIL import Image, ImageDraw

from pipeline.io.atomic import write_text_atomic
from pipeline.reporting.pages import html_page, table_html
from pipeline.io.sheets import fit, font, write_jpeg
from pipeline.reporting.sheets import GREY, RED, Caption, placeholder, stack, title_bar
from pipeline.tiling.status import InputStatus, read_tiling_status

TABLE_COLUMNS = ["input", "file", "status", "reason", "patches", "size (px)", "source px size", "pixel size from",
                 "message"]


def tiling_summary(inputs: Sequence[InputStatus]) -> str:
    done = sum(status.done for status in inputs)
    patches = sum(status.patch_count for status in inputs)
    return (f"{len(inputs)} input{'s' if len(inputs) != 1 else ''}: {done} tiled, {len(inputs) - done} failed; "
            f"{patches} patches in total")


def _table_row(status: InputStatus) -> dict[str, object]:
    reason = status.reason
    return {
        "input": status.input_id, "file": status.source,
        "status": "done" if status.done else "FAILED",
        "reason": f"{reason.value}: {reason.description}" if reason and not status.done else "",
        "patches": status.patch_count,
        "size (px)": f"{status.width} × {status.height}" if status.width is not None and status.height is not None
                     else "",
        "source px size": f"{status.pixel_size:.4g} {'m' if status.kind == 'aerial' else 'µm'}"
                          if status.pixel_size is not None else "",
        "pixel size from": status.pixel_size_from or "",
        "message": status.message or "",
    }


def slides_table(tiles_dir: str | Path, out: str | Path, dataset: str) -> pd.DataFrame:
    """HTML table: one row per input (slide or GeoTIFF) with its outcome, patch count and, for a failed
    input, the reason in plain words; the dataset's totals above it."""
    inputs = read_tiling_status(tiles_dir)
    table = pd.DataFrame([_table_row(status) for status in inputs], columns=TABLE_COLUMNS)
    text = table_html(table, numeric=["patches"]).replace("<td>FAILED</td>", '<td class="failed">FAILED</td>')
    body = (f"<p><b>{html.escape(tiling_summary(inputs))}</b>.</p>\n"
            '<p class="note">One row per input file. A failed input is recorded with its reason and '
            "the rest of the dataset is processed; its patches are missing from every later stage.</p>\n"
            + text)
    write_text_atomic(out, html_page(f"{dataset}: inputs, patch counts and failures", body))
    return table


def _thumbnail_cell(status: InputStatus, cell: int) -> Image.Image:
    """The input's QC image over its name and patch count (or failure reason)."""
    if status.thumbnail is not None:
        with Image.open(status.thumbnail) as image:
            image.draft("RGB", (cell, cell))
            picture = fit(image, cell)
    else:
        why = status.reason.value if status.reason and not status.done else "none was written"
        picture = placeholder((cell, cell * 2 // 3), f"no thumbnail: {why}")
    second = f"FAILED: {status.reason.value if status.reason else ''}" if not status.done else \
        f"{status.patch_count} patches kept"
    typeface = font(14)
    framed = Image.new("RGB", (cell, cell + 44), (255, 255, 255))
    framed.paste(picture, ((cell - picture.width) // 2, 0))
    draw = ImageDraw.Draw(framed)
    draw.text((4, cell + 3), status.input_id[:48], fill=(20, 20, 20), font=typeface)
    draw.text((4, cell + 22), second, fill=RED if not status.done else (40, 40, 40), font=typeface)
    return framed


def thumbnail_sheet(tiles_dir: str | Path, out: str | Path, dataset: str, cell: int = 360,
                    per_row: int = 4) -> int:
    """JPEG contact sheet of every input's QC thumbnail (tissue mask tinted green, kept patches
    outlined in blue), each labelled with the input's name and patch count, or its failure reason.
    Returns the number of inputs shown."""
    inputs = read_tiling_status(tiles_dir)
    tiles = [_thumbnail_cell(status, cell) for status in inputs] or [
        placeholder((cell, cell), "the dataset has no inputs")]
    columns = min(per_row, len(tiles))
    rows = math.ceil(len(tiles) / columns)
    gap = 10
    grid = Image.new("RGB", (columns * (cell + gap) + gap, rows * (cell + 44 + gap) + gap), (255, 255, 255))
    for number, tile in enumerate(tiles):
        grid.paste(tile, (gap + (number % columns) * (cell + gap), gap + (number // columns) * (cell + 44 + gap)))
    header = title_bar(grid.width, [
        Caption(f"{dataset}: tissue detection per input ({tiling_summary(inputs)})"),
        Caption("green tint = tissue mask (slides), blue squares = patches kept", GREY)])
    write_jpeg(stack([header, grid]), out)
    return len(inputs)
