"""Per-window conditions: SLERP of the four nearest grid embeddings, then the condition stage.

Grid cell (r, c) of a [rows, cols, D] embedding grid describes the latent square whose top-left
corner is (r * cell, c * cell), cell being the window side. A window with origin (y, x) sits at
fractional grid position (y / cell, x / cell); its embedding interpolates, as in LID's
`get_conditioning`, the cells (i, j), (i, j+1), (i+1, j), (i+1, j+1) with i, j the integer parts:
first along the columns (top pair, bottom pair) by the column fraction, then between those two
by the row fraction. The grid is edge-padded by replication so that i+1, j+1 always exist.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# Above this cosine LID interpolates linearly (SLERP is ill-conditioned for parallel vectors).
SLERP_DOT_THRESHOLD = 0.9995


def slerp(fraction: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of row vectors (N, D) by fractions (N,), computed in float64."""
    start64, end64, t = start.double(), end.double(), fraction.double()[:, None]
    cosine = (start64 * end64 / (start64.norm(dim=1, keepdim=True) * end64.norm(dim=1, keepdim=True))).sum(1)
    cosine = cosine[:, None]
    linear = (1 - t) * start64 + t * end64
    angle = torch.arccos(cosine.clamp(-1.0, 1.0))
    # Where the linear branch is taken, sin(angle) may be 0: divide by 1 there instead.
    near_parallel = cosine.abs() > SLERP_DOT_THRESHOLD
    sine = torch.where(near_parallel, torch.ones_like(angle), torch.sin(angle))
    spherical = (torch.sin(angle - angle * t) * start64 + torch.sin(angle * t) * end64) / sine
    return torch.where(near_parallel, linear, spherical).to(start.dtype)


def window_embeddings(grid: torch.Tensor, origins: Sequence[tuple[int, int]], cell: int) -> torch.Tensor:
    """Embedding grid (rows, cols, D) and window origins in latent pixels -> (N, D) embeddings."""
    if grid.ndim != 3:
        raise ValueError(f"embedding grid must be (rows, cols, D), got shape {tuple(grid.shape)}")
    if not origins:  # every window over glass
        return grid.new_zeros((0, grid.shape[2]))
    # Replicate the last row and column: (rows + 1, cols + 1, D).
    padded = F.pad(grid.permute(2, 0, 1)[None], (0, 1, 0, 1), mode="replicate")[0].permute(1, 2, 0)
    position = torch.tensor(origins, dtype=torch.float64) / cell
    top_left = position.floor().long()
    row, column = top_left[:, 0], top_left[:, 1]
    if (row >= grid.shape[0]).any() or (column >= grid.shape[1]).any():
        raise ValueError(f"window origins beyond the {grid.shape[0]}x{grid.shape[1]} grid of {cell}-pixel cells")
    row_fraction, column_fraction = (position - top_left).unbind(1)
    top = slerp(column_fraction, padded[row, column], padded[row, column + 1])
    bottom = slerp(column_fraction, padded[row + 1, column], padded[row + 1, column + 1])
    return slerp(row_fraction, top, bottom)


def fill_background(grid: torch.Tensor, tissue: np.ndarray) -> torch.Tensor:
    """The grid with every background cell (tissue False) given the embedding of its nearest tissue
    cell, so that a window at the edge of the tissue is conditioned on tissue only (a background
    cell has no embedding of its own: tiling keeps tissue patches only)."""
    from scipy.ndimage import distance_transform_edt

    tissue = np.asarray(tissue, dtype=bool)
    if tissue.shape != tuple(grid.shape[:2]):
        raise ValueError(f"tissue mask of shape {tissue.shape} for a {tuple(grid.shape[:2])} grid")
    if tissue.all() or not tissue.any():
        return grid
    _, (rows, columns) = distance_transform_edt(~tissue, return_indices=True)
    return grid[torch.from_numpy(rows), torch.from_numpy(columns)]


@torch.no_grad()
def window_contexts(
    condition: nn.Module, grid: torch.Tensor, origins: Sequence[tuple[int, int]], cell: int
) -> torch.Tensor:
    """(N, tokens, context_dim): the cross-attention context of every window."""
    weight = next(condition.parameters())
    return condition(window_embeddings(grid, origins, cell).to(weight.device, weight.dtype))
