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


def boundary_gradient_ratio(
    image: np.ndarray, row_boundaries: Iterable[int], column_boundaries: Iterable[int], band: int = SEAM_BAND
) -> float:
    """Mean gradient magnitude at the boundaries divided by the mean everywhere else.

    The image (H, W) or (H, W, C) is averaged over channels. A gradient is the absolute
    difference of two neighbouring pixels (i, i+1); it is at a column boundary b when it runs
    along the rows and |i + 1 - b| < band (band 1: only the pair straddling b), and likewise at
    a row boundary. Above 1: jumps at the boundaries; below 1: flattened texture there.
    """
    grey = np.asarray(image, dtype=np.float64)
    if grey.ndim == 3:
        grey = grey.mean(axis=2)
    along_rows = np.abs(np.diff(grey, axis=1))  # column i holds the pair (i, i+1)
    along_columns = np.abs(np.diff(grey, axis=0))
    at_columns = near_boundaries(along_rows.shape[1], column_boundaries, band)
    at_rows = near_boundaries(along_columns.shape[0], row_boundaries, band)
    at_seam = np.concatenate([along_rows[:, at_columns].ravel(), along_columns[at_rows].ravel()])
    elsewhere = np.concatenate([along_rows[:, ~at_columns].ravel(), along_columns[~at_rows].ravel()])
    if at_seam.size == 0 or elsewhere.size == 0:
        raise ValueError("seam score needs pixel pairs both at and away from the boundaries")
    if elsewhere.mean() == 0:
        return 1.0 if at_seam.mean() == 0 else float("inf")
    return float(at_seam.mean() / elsewhere.mean())


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
