"""The real data of the learning benchmark (bench/learning.py) and how it is held out.

* H&E (parts 1-3): the demo slide tiled as the pipeline tiles it, plus the 256 px crops of
  ``../shared/data/he_patches_256``. Held out **by whole source image**: nothing of a held-out
  source is trained on. Part 1 measures on its crops; parts 2-3 need two disjoint real sets, so
  they cut the held-out sources' full images (``he_images/``) into their non-overlapping 256 px
  grid and deal the tiles alternately (a checkerboard) to set A (the conditions) and set B (the
  real reference).
* NAIP (part 4): the two 4-band quarter-quads (2019, 2020: the same ground), tiled by the pipeline
  with all four bands. Held out **by ground**: the patches of the east-most grid columns, in both
  years, are never trained on; the rest (west of them, both years) trains.
"""

from __future__ import annotations

import copy
import csv
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from pipeline.autoencoder.data import read_patches
from pipeline.config import DatasetSpec, prepare_config
from pipeline.tiling.outputs import MANIFEST_FILE
from pipeline.tiling.run import tile_dataset

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "data"
PATCHES = SHARED / "he_patches_256"
HE_IMAGES = SHARED / "he_images"
NAIP = sorted((SHARED / "aerial").glob("m_4709963_se_14_1_20*.tif"))


@dataclass(frozen=True)
class HeldOutPair:
    """Two disjoint held-out real sets of the same size, uint8 (N, C, H, W): A conditions, B reference."""

    conditions: torch.Tensor
    reference: torch.Tensor
    names: tuple[str, ...]  # A's patches: <source>_x<x>_y<y>
    how: str


def as_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def crops(heldout_sources: list[str]) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    """The he_patches_256 crops: (trained-on, held-out, held-out names)."""
    train, held, held_names = [], [], []
    files = sorted(PATCHES.glob("*.png"))
    if not files:
        raise SystemExit(f"no real patches in {PATCHES}")
    for path in files:
        rgb = np.array(Image.open(path).convert("RGB"))
        if any(path.name.startswith(source) for source in heldout_sources):
            held.append(rgb), held_names.append(path.stem)
        else:
            train.append(rgb)
    return train, held, held_names


def slide_patches(spec: DatasetSpec) -> torch.Tensor:
    """Every patch of the demo slide (all of them train: the slide is not a held-out source)."""
    with tempfile.TemporaryDirectory() as tmp:
        tile_dataset(spec, Path(tmp) / "tiles")
        split = read_patches(Path(tmp) / "tiles", (), spec.holdout_fraction)
    return torch.cat([split.train, split.heldout])


def source_images(sources: list[str]) -> dict[str, Path]:
    """Each held-out source's full image in he_images/, found through the crops' MANIFEST.csv."""
    with open(PATCHES / "MANIFEST.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    found = {}
    for source in sources:
        names = {Path(r["source"]).name for r in rows if r["file"].startswith(source)}
        # he_images/ keeps a file's name, or prefixes it with where it came from (tiatoolbox_target_image.png)
        paths = [path for path in HE_IMAGES.glob("*.png") for name in names
                 if path.name == name or path.name.endswith(f"_{name}")]
        if len(paths) != 1:
            raise SystemExit(f"held-out source {source!r}: no single full image in {HE_IMAGES} ({sorted(names)})")
        found[source] = paths[0]
    return found


def grid_tiles(path: Path, side: int) -> list[tuple[str, np.ndarray]]:
    """The image's whole, non-overlapping side x side tiles in raster order, named by their corner."""
    rgb = np.array(Image.open(path).convert("RGB"))
    height, width = rgb.shape[:2]
    return [(f"x{x}_y{y}", rgb[y:y + side, x:x + side]) for y in range(0, height - side + 1, side)
            for x in range(0, width - side + 1, side)]


def heldout_pair(sources: list[str], per_set: int, side: int = 256) -> HeldOutPair:
    """The held-out sources' grid tiles dealt alternately to A and B (at most per_set each)."""
    sets: tuple[list, list] = ([], [])
    number = 0
    for source, path in source_images(sources).items():
        for corner, tile in grid_tiles(path, side):
            sets[number % 2].append((f"{source}_{corner}", tile))
            number += 1
    count = min(per_set, len(sets[0]), len(sets[1]))
    a, b = sets[0][:count], sets[1][:count]
    how = (f"the {number} non-overlapping {side} px grid tiles of the held-out sources' full images "
           f"({', '.join(p.name for p in source_images(sources).values())}), dealt alternately to A and B "
           f"(a checkerboard), {count} each")
    return HeldOutPair(as_tensor([t for _, t in a]), as_tensor([t for _, t in b]), tuple(n for n, _ in a), how)


# --- NAIP ----------------------------------------------------------------------------------------

def naip_spec(config: dict, patch_size: int) -> DatasetSpec:
    """The NAIP dataset as the pipeline's config would declare it: 5 m, bands R, G, B, NIR, lossless tif."""
    if len(NAIP) != 2:
        raise SystemExit(f"expected the two NAIP files under {SHARED / 'aerial'}, found {len(NAIP)}")
    dataset = {"kind": "aerial", "inputs": [str(p) for p in NAIP], "resolution": 5.0, "bands": [1, 2, 3, 4],
               "image_format": "tif", "patch_size": patch_size, "encoders": list(config["encoders"])}
    table = {"datasets": {"naip": dataset}, "encoders": copy.deepcopy(config["encoders"]),
             "autoencoder": copy.deepcopy(config["autoencoder"]),
             "latents": {"autoencoder": {"kind": "trained", "dataset": "naip"}},
             "training": {**copy.deepcopy(config["training"]), "latent_size": patch_size // 16}}
    return prepare_config(table, REPO)["naip"]


@dataclass(frozen=True)
class NaipSplit:
    train: torch.Tensor  # uint8 (N, 4, H, W)
    heldout: HeldOutPair
    heldout_columns: list[int]
    grid_columns: int


def naip_patches(spec: DatasetSpec, heldout_columns: int, per_set: int) -> NaipSplit:
    """Tile both files; the east-most ``heldout_columns`` grid columns (both years) are held out,
    their patches dealt to A and B in a checkerboard of (col + row)."""
    with tempfile.TemporaryDirectory() as tmp:
        tiles = Path(tmp) / "tiles"
        tile_dataset(spec, tiles)
        split = read_patches(tiles, (NAIP[0].stem,))  # every patch, in one of the two halves
        places = pd.read_parquet(tiles / MANIFEST_FILE, columns=["key", "col", "row"]).set_index("key")
    images = torch.cat([split.train, split.heldout])
    keys = split.train_keys + split.heldout_keys
    cols = np.array([int(places.loc[k, "col"]) for k in keys])
    rows = np.array([int(places.loc[k, "row"]) for k in keys])
    held_cols = list(range(int(cols.max()) + 1 - heldout_columns, int(cols.max()) + 1))
    held = np.isin(cols, held_cols)
    a = np.flatnonzero(held & ((cols + rows) % 2 == 0))
    b = np.flatnonzero(held & ((cols + rows) % 2 == 1))
    count = min(per_set, len(a), len(b))
    pair = HeldOutPair(images[a[:count]], images[b[:count]], tuple(keys[i] for i in a[:count]),
                       f"the patches of grid columns {held_cols} (of 0..{int(cols.max())}) of both files, "
                       f"dealt to A and B by (col + row) parity, {count} each")
    return NaipSplit(images[np.flatnonzero(~held)], pair, held_cols, int(cols.max()) + 1)
