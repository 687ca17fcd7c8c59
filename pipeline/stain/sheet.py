"""The report's before | after contact sheet of one stain-normalised input (`pipeline stain-sheet`).

Patches are chosen evenly over the input (by manifest order); each pair shows the tiled patch and
the normalised one, and a patch that passed through unchanged says why. Needs only PIL and numpy,
so it runs in the main environment, not tiatoolbox's.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw, ImageFont

from pipeline.io.atomic import atomic_file
from pipeline.io.shards import decode_image, image_field, iter_shard

GAP = 6
LABEL_HEIGHT = 18


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def chosen_patches(stain_dir: Path, count: int) -> pd.DataFrame:
    """``count`` rows of the stain manifest, evenly spread over the input."""
    manifest = pd.read_parquet(stain_dir / "manifest.parquet")
    if len(manifest) <= count:
        return manifest
    return manifest.iloc[np.linspace(0, len(manifest) - 1, count).round().astype(int)]


def read_images(folder: Path, rows: pd.DataFrame) -> dict[str, np.ndarray]:
    keys, images = set(rows.key), {}
    for shard in sorted(set(rows.shard)):
        for sample in iter_shard(folder / shard):
            if sample["__key__"] in keys:
                images[sample["__key__"]] = decode_image(sample[image_field(sample)])
    return images


def before_after_sheet(tiles_dir: str | Path, stain_dir: str | Path | None, out: str | Path, dataset: str,
                       pairs: int = 8, columns: int = 4, cell: int = 160) -> int:
    """Write the JPEG sheet; returns how many pairs it shows (0: a sheet that says why none)."""
    title_font, label_font = _font(15), _font(12)
    if not stain_dir:
        sheet = Image.new("RGB", (2 * columns * cell, 60), "white")
        ImageDraw.Draw(sheet).text((GAP, GAP), f"{dataset}: no input kept patches, nothing was stain-normalised",
                                   fill="black", font=title_font)
        _save(sheet, out)
        return 0
    tiles_dir, stain_dir = Path(tiles_dir), Path(stain_dir)
    status = json.loads((stain_dir / "stain.json").read_text())
    rows = chosen_patches(stain_dir, pairs)
    before, after = read_images(tiles_dir, rows), read_images(stain_dir, rows)
    passed = status["passed_through"]
    title = [f"{dataset} / {stain_dir.name}: before | after stain normalisation ({status['method']}, target "
             f"{Path(status['target']).name})",
             f"{status['normalized']} of {status['patch_count']} patches normalised; unchanged: "
             f"{passed['background']} background, {passed['estimation_failed']} where estimation failed"]
    grid_rows = -(-len(rows) // columns)
    pair_width = 2 * cell + GAP
    top = 8 + 20 * len(title)
    sheet = Image.new("RGB", (columns * (pair_width + 2 * GAP), top + grid_rows * (cell + LABEL_HEIGHT + GAP)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((GAP, 6), "\n".join(title), fill="black", font=title_font, spacing=5)
    for index, row in enumerate(rows.itertuples()):
        x = GAP + (index % columns) * (pair_width + 2 * GAP)
        y = top + (index // columns) * (cell + LABEL_HEIGHT + GAP)
        for offset, image in ((0, before[row.key]), (cell + GAP, after[row.key])):
            sheet.paste(Image.fromarray(image).resize((cell, cell), Image.Resampling.BOX), (x + offset, y))
        label = "before | after" if row.stain_normalized else f"unchanged: {row.stain_skipped}"
        draw.text((x, y + cell + 2), f"{label}  (c{row.col}, r{row.row})", fill="black", font=label_font)
    _save(sheet, out)
    return len(rows)


def _save(sheet: Image.Image, out: str | Path) -> None:
    with atomic_file(out) as temp:
        sheet.save(temp, format="JPEG", quality=90)
