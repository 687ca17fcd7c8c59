"""The report's before | after contact sheet of one stain-normalised input (`pipeline stain-sheet`):
patches chosen evenly over the input, each as tiled and as normalised, on the shared pair sheet; a
patch that passed through unchanged says why. PIL and numpy only: it runs in the main environment.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from pipeline.io.sheets import font, pair_sheet, write_jpeg
from pipeline.io.shards import decode_image, image_field, iter_shard
from pipeline.stain.outputs import read_stain_manifest, read_stain_status

TITLE_HEIGHT = 52


def chosen_patches(manifest: pd.DataFrame, count: int) -> pd.DataFrame:
    """``count`` rows of a manifest, evenly spread over the input."""
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


def with_title(sheet: Image.Image, lines: list[str]) -> Image.Image:
    out = Image.new("RGB", (sheet.width, TITLE_HEIGHT + sheet.height), "white")
    ImageDraw.Draw(out).multiline_text((12, 8), "\n".join(lines), fill=(20, 20, 20), font=font(15), spacing=6)
    out.paste(sheet, (0, TITLE_HEIGHT))
    return out


def before_after_sheet(tiles_dir: str | Path, stain_dir: str | Path | None, out: str | Path, dataset: str,
                       pairs: int = 8, side: int = 192) -> int:
    """Write the JPEG sheet; returns how many pairs it shows (0: a sheet that says why there are none)."""
    if not stain_dir:
        write_jpeg(with_title(Image.new("RGB", (4 * (2 * side + 16), 40), "white"),
                              [f"{dataset}: no input kept patches, so nothing was stain-normalised"]), out)
        return 0
    tiles_dir, stain_dir = Path(tiles_dir), Path(stain_dir)
    status = read_stain_status(stain_dir)
    rows = chosen_patches(read_stain_manifest(stain_dir), pairs)
    before, after = read_images(tiles_dir, rows), read_images(stain_dir, rows)
    shown = [(before[row.key], after[row.key],
              row.key if row.stain_normalized else f"{row.key}: unchanged ({row.stain_skipped})")
             for row in rows.itertuples()]
    passed = status["passed_through"]
    title = [f"{dataset} / {stain_dir.name}: before | after stain normalisation ({status['method']}, target "
             f"{Path(status['target']).name})",
             f"{status['normalized']} of {status['patch_count']} patches normalised; passed through unchanged: "
             f"{passed['background']} background, {passed['estimation_failed']} where estimation failed"]
    write_jpeg(with_title(pair_sheet(shown, side=side, labels=("before", "after")), title), out)
    return len(shown)
