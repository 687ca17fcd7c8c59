"""Real patches that condition the samplers: held-out patches, and k x k regions of adjacent ones.

Both choose rows of the embedding stage's index (`pipeline.embedding.outputs.read_embedding_index`:
input, grid col/row and shard of each patch); `read_patches` there reads their images and embeddings.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import pandas as pd

from pipeline.embedding.outputs import RealPatch
from pipeline.splits import is_held_out


def held_out_rows(index: pd.DataFrame, holdout_inputs: Iterable[str], fraction: float,
                  limit: int | None = None) -> pd.DataFrame:
    """Rows of held-out patches (whole held-out inputs, then hashed keys), in index order.

    With a limit, every held-out input and every other input contributes in turn (round robin),
    so a few large slides do not crowd out the rest.
    """
    whole = set(holdout_inputs)
    chosen = index[[ident in whole or is_held_out(key, fraction) for ident, key in zip(index.input_id, index.key)]]
    if limit is None or len(chosen) <= limit:
        return chosen.reset_index(drop=True)
    turn = chosen.groupby("input_id", sort=False).cumcount()
    return chosen.assign(_turn=turn.values).sort_values(["_turn"], kind="stable").head(limit) \
        .sort_index().drop(columns="_turn").reset_index(drop=True)


@dataclass(frozen=True)
class Region:
    """k x k adjacent patches of one input; keys[r][c] is the patch at grid (col + c, row + r)."""

    input_id: str
    col: int
    row: int
    k: int
    keys: tuple[tuple[str, ...], ...]
    held_out: bool  # the whole region comes from a held-out input


def find_regions(index: pd.DataFrame, k: int, count: int, prefer_inputs: Iterable[str] = ()) -> list[Region]:
    """Up to `count` non-overlapping k x k blocks whose patches are all present, row-major per input.

    Inputs in `prefer_inputs` (the held-out slides) are searched first; the other inputs follow in
    index order, and take turns so that regions come from as many inputs as possible.
    """
    if k < 1 or count < 1:
        raise ValueError("region side k and region count must be positive")
    preferred = list(dict.fromkeys(prefer_inputs))
    order = preferred + [ident for ident in dict.fromkeys(index.input_id) if ident not in preferred]
    candidates: dict[str, list[Region]] = {}
    for ident in order:
        rows = index[index.input_id == ident]
        at = {(int(c), int(r)): key for c, r, key in zip(rows.col, rows.row, rows.key)}
        taken: set[tuple[int, int]] = set()
        found = []
        for top in sorted({r for _, r in at}):
            for left in sorted({c for c, _ in at}):
                cells = [(left + dc, top + dr) for dr in range(k) for dc in range(k)]
                if all(cell in at and cell not in taken for cell in cells):
                    taken.update(cells)
                    keys = tuple(tuple(at[(left + dc, top + dr)] for dc in range(k)) for dr in range(k))
                    found.append(Region(ident, left, top, k, keys, ident in preferred))
        candidates[ident] = found
    chosen: list[Region] = []
    for ident in preferred:  # held-out inputs first, in full
        chosen.extend(candidates.get(ident, [])[: count - len(chosen)])
    others = [candidates[i] for i in order if i not in preferred]
    turn = 0
    while len(chosen) < count and any(turn < len(c) for c in others):
        chosen.extend(c[turn] for c in others if turn < len(c))
        turn += 1
    return chosen[:count]


def region_rows(index: pd.DataFrame, region: Region) -> pd.DataFrame:
    keys = {key for row in region.keys for key in row}
    return index[index.key.isin(keys)]


def region_grid(region: Region, patches: dict[str, RealPatch],
                all_bands: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """([k, k, D] embeddings, rows then columns; the real (k*P, k*P, 3) region stitched from its
    patches, or with all_bands (k*P, k*P, bands): every band they carry)."""
    grid = np.stack([np.stack([patches[key].embedding for key in row]) for row in region.keys])

    def pixels(patch: RealPatch) -> np.ndarray:
        return patch.bands if all_bands and patch.bands is not None else patch.image

    image = np.concatenate([np.concatenate([pixels(patches[key]) for key in row], axis=1) for row in region.keys])
    return grid.astype(np.float32), image


@dataclass(frozen=True)
class Georeference:
    """Where a region's pixels lie: its CRS and the affine [a, b, c, d, e, f] (rasterio order) of
    its pixel (0, 0), at the patches' ground resolution. A reference-free image has a ground
    resolution but no place: no CRS, and an affine that only scales (see `unplaced`)."""

    crs: str | None
    transform: tuple[float, ...]

    @classmethod
    def unplaced(cls, metres_per_pixel: float) -> Georeference:
        """Pixel (0, 0) at the origin, `metres_per_pixel` square pixels, no CRS."""
        return cls(None, (float(metres_per_pixel), 0.0, 0.0, 0.0, -float(metres_per_pixel), 0.0))


GEO_COLUMNS = ("crs", "transform")


def region_georeference(index: pd.DataFrame, region: Region) -> Georeference | None:
    """An aerial region's georeference: its top-left patch's (tiling records each tile's CRS and
    affine, the source's affine moved to the tile's top-left source pixel and scaled by the tile's
    source pixels per target pixel); the region's image continues that patch's pixel grid. None for
    slides (no such columns)."""
    if not set(GEO_COLUMNS) <= set(index.columns):
        return None
    rows = index[index.key == region.keys[0][0]]
    if rows.empty:
        raise ValueError(f"region at col {region.col}, row {region.row} of {region.input_id}: its top-left patch "
                         f"{region.keys[0][0]!r} is not in the index")
    crs, transform = rows["crs"].iloc[0], rows["transform"].iloc[0]
    if not isinstance(crs, str) or transform is None or len(transform) != 6:
        return None
    return Georeference(crs, tuple(float(v) for v in transform))
