"""Seam score: how visible the window boundaries are in a generated image."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

from pipeline.sampling.windows import window_offsets

# Output pixels either side of a boundary that count as "at the boundary": a VQ decoder's border
# effects (flattened texture) reach a few pixels into each window, not only the pair across the edge.
SEAM_BAND = 4


def window_boundaries(size: int, window: int, stride: int, factor: int) -> list[int]:
    """Interior output-pixel coordinates where a window (latent `size`, upsampled by `factor`) starts or ends."""
    offsets = window_offsets(size, window, stride)
    edges = {offset * factor for offset in offsets} | {(offset + window) * factor for offset in offsets}
    return sorted(edge for edge in edges if 0 < edge < size * factor)


def near_boundaries(pairs: int, boundaries: Iterable[int], band: int) -> np.ndarray:
    """Mask over the neighbour pairs (i, i+1) of one axis: True where |i + 1 - b| < band for some b."""
    positions = np.arange(1, pairs + 1)
    mask = np.zeros(pairs, dtype=bool)
    for boundary in boundaries:
        mask |= np.abs(positions - boundary) < band
    return mask


# Rows of the image held as float64 at once: the image itself may be a memmap far larger than memory.
SEAM_BLOCK_ROWS = 256


def boundary_gradient_ratio(
    image: np.ndarray, row_boundaries: Iterable[int], column_boundaries: Iterable[int], band: int = SEAM_BAND
) -> float:
    """Mean gradient magnitude at the boundaries divided by the mean everywhere else.

    The image (H, W) or (H, W, C) is averaged over channels. A gradient is the absolute
    difference of two neighbouring pixels (i, i+1); it is at a column boundary b when it runs
    along the rows and |i + 1 - b| < band (band 1: only the pair straddling b), and likewise at
    a row boundary. Above 1: jumps at the boundaries; below 1: flattened texture there.
    Computed in blocks of rows, so the image may be a memmap of any size.
    """
    height, width = image.shape[:2]
    at_columns = near_boundaries(width - 1, column_boundaries, band)
    at_rows = near_boundaries(height - 1, row_boundaries, band)
    seam_sum = other_sum = 0.0
    seam_count = other_count = 0
    for top in range(0, height, SEAM_BLOCK_ROWS):
        # One extra row below the block gives the vertical pairs (i, i+1) of its last row.
        grey = np.asarray(image[top : top + SEAM_BLOCK_ROWS + 1], dtype=np.float64)
        if grey.ndim == 3:
            grey = grey.mean(axis=2)
        along_rows = np.abs(np.diff(grey[:SEAM_BLOCK_ROWS], axis=1))  # column i holds the pair (i, i+1)
        along_columns = np.abs(np.diff(grey, axis=0))  # row j holds the pair (top + j, top + j + 1)
        rows_here = at_rows[top : top + len(along_columns)]
        seam_sum += along_rows[:, at_columns].sum() + along_columns[rows_here].sum()
        other_sum += along_rows[:, ~at_columns].sum() + along_columns[~rows_here].sum()
        seam_count += along_rows[:, at_columns].size + along_columns[rows_here].size
        other_count += along_rows[:, ~at_columns].size + along_columns[~rows_here].size
    if seam_count == 0 or other_count == 0:
        raise ValueError("seam score needs pixel pairs both at and away from the boundaries")
    at_seam, elsewhere = seam_sum / seam_count, other_sum / other_count
    if elsewhere == 0:
        return 1.0 if at_seam == 0 else float("inf")
    return float(at_seam / elsewhere)


def seam_score(
    image: np.ndarray, row_boundaries: Iterable[int], column_boundaries: Iterable[int], band: int = SEAM_BAND
) -> float:
    """max(r, 1/r) for r = boundary_gradient_ratio: 1.0 means invisible seams, larger means more visible.

    Both directions count: a seam shows as a jump (r > 1) or as a line of flattened texture (r < 1).
    """
    ratio = boundary_gradient_ratio(image, row_boundaries, column_boundaries, band)
    if ratio == 0:
        return float("inf")
    return max(ratio, 1 / ratio)
