"""Blended window decoding of a large latent, streamed as finished bands of output rows.

Each window of `window` latents is decoded on its own (a first-stage decoder sees only inputs of
the size it was trained on), weighted (LID: a Gaussian centred on the window), and the weighted
decodes are summed and divided by the summed weights. Windows are decoded one window row at a
time; once a window row is done, every output row above the next window row's top is final, so
it is converted to uint8 and handed out. Only a band one window high stays in float memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from pipeline.models.first_stage import to_uint8
from pipeline.sampling.windows import WindowLayout, cells_under

Decoder = Callable[[torch.Tensor], torch.Tensor]
WHITE = 255


@dataclass(frozen=True, eq=False)
class Glass:
    """The background (glass) cells of an embedding grid, as a canvas sees them: `tissue` is the
    grid's (rows, cols) presence mask, `cell` the latent side of one cell (the model's window) and
    `first_row` the latent row of the canvas's top within the grid (a band of a whole slide)."""

    tissue: np.ndarray
    cell: int
    first_row: int = 0

    def has_tissue(self, row: int, column: int, size: int, width: int | None = None) -> bool:
        """Whether the canvas window at latent (row, column), `size` rows high and `width` (default
        `size`) columns wide, overlaps a tissue cell."""
        rows = [r for r in cells_under(self.first_row + row, size, self.cell) if r < self.tissue.shape[0]]
        columns = [c for c in cells_under(column, size if width is None else width, self.cell)
                   if c < self.tissue.shape[1]]
        return bool(self.tissue[np.ix_(rows, columns)].any()) if rows and columns else False

    def whiten(self, rows: np.ndarray, top: int, factor: int) -> np.ndarray:
        """Output rows (h, W, bands) starting at canvas pixel row `top`, white where the cell is glass."""
        cell_px = self.cell * factor
        first = self.first_row * factor + top
        index = np.arange(first, first + len(rows)) // cell_px
        inside = index < self.tissue.shape[0]
        glass = np.ones((len(rows), self.tissue.shape[1]), dtype=bool)
        glass[inside] = ~self.tissue[index[inside]]
        pixels = np.repeat(glass, cell_px, axis=1)[:, : rows.shape[1]]
        if pixels.shape[1] < rows.shape[1]:  # a canvas wider than the grid: the rest is glass
            pixels = np.pad(pixels, ((0, 0), (0, rows.shape[1] - pixels.shape[1])), constant_values=True)
        rows[pixels] = WHITE
        return rows


def blended_bands(
    decode: Decoder, latent: torch.Tensor, factor: int, window: int, stride: int, batch: int,
    weights: torch.Tensor, glass: Glass | None = None, bands: int = 3,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first output row, uint8 rows (h, W, bands)) top to bottom; the row bands tile the image.

    latent: (1, C, H, W); weights: (window * factor,) * 2, positive everywhere (see weights.py).
    bands: how many the decoder gives (3 for RGB, 4 for R, G, B, NIR); a decode of another count is
    an error. (Known up front: with glass, the first rows may decode nothing.)
    glass: windows over glass cells only are not decoded, and glass pixels are white (a pixel of a
    tissue cell is covered only by windows that overlap that cell, so its value does not change).
    Stopping early decodes only the windows the yielded rows need.
    """
    if latent.shape[0] != 1:
        raise ValueError("decode one canvas at a time")
    layout = WindowLayout(latent.shape[2], latent.shape[3], window, stride)
    tile = window * factor
    width = latent.shape[3] * factor
    if tuple(weights.shape) != (tile, tile):
        raise ValueError(f"decode weights of shape {tuple(weights.shape)} for {tile}x{tile}-pixel windows")
    weights = weights.to(latent.device)
    # Float accumulators for output rows [band_top, band_top + tile): every window still to come
    # starts at or below band_top.
    image_sum = torch.zeros(bands, tile, width, device=latent.device)
    weight_sum = torch.zeros(1, tile, width, device=latent.device)
    row_offsets = layout.row_offsets
    for index, row in enumerate(row_offsets):
        columns = layout.column_offsets
        if glass is not None:
            columns = [c for c in columns if glass.has_tissue(row, c, window)]
        for start in range(0, len(columns), batch):
            chosen = columns[start : start + batch]
            crops = torch.cat([latent[:, :, row : row + window, c : c + window] for c in chosen])
            images = decode(crops).float()
            if images.shape[1] != bands:
                raise ValueError(f"the decoder gave {images.shape[1]} bands, expected {bands}")
            for column, image in zip(chosen, images):
                span = slice(column * factor, column * factor + tile)
                image_sum[:, :, span] += image * weights
                weight_sum[:, :, span] += weights
        next_top = row_offsets[index + 1] * factor if index + 1 < len(row_offsets) else row * factor + tile
        finished = next_top - row * factor
        # Glass pixels may have no window at all: 0 / 1, whitened below.
        weight = weight_sum[:, :finished]
        rows = to_uint8((image_sum[:, :finished] / torch.where(weight > 0, weight, 1.0))[None])[0]
        yield row * factor, rows if glass is None else glass.whiten(rows, row * factor, factor)
        # Move the unfinished rows to the top of the band.
        image_sum = torch.cat([image_sum[:, finished:], torch.zeros_like(image_sum[:, :finished])], dim=1)
        weight_sum = torch.cat([weight_sum[:, finished:], torch.zeros_like(weight_sum[:, :finished])], dim=1)


def decode_large_image(
    decode: Decoder,
    latent: torch.Tensor,
    factor: int,
    window: int,
    stride: int,
    batch: int,
    weights: torch.Tensor,
    out: np.ndarray | None = None,
    bands: int = 3,
    glass: Glass | None = None,
) -> np.ndarray:
    """The whole (H*f, W*f, bands) uint8 image; pass `out` (e.g. an np.memmap) to keep it off the heap;
    glass: see blended_bands."""
    shape = (latent.shape[2] * factor, latent.shape[3] * factor, bands)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 of shape {shape}, got {out.dtype} {out.shape}")
    for top, rows in blended_bands(decode, latent, factor, window, stride, batch, weights, glass, bands):
        out[top : top + len(rows)] = rows
    return out


CPU_DECODE_BATCH = 4
GPU_MEMORY_SHARE = 0.5  # of the free memory a decode batch may take (the canvas and band stay resident)


def fitting_decode_batch(decode: Decoder, latent: torch.Tensor, window: int, device: torch.device) -> int:
    """Windows per decoder call: CPU_DECODE_BATCH on a CPU, else as many as fit in the free GPU
    memory (measured on one window)."""
    if device.type != "cuda":
        return CPU_DECODE_BATCH
    crop = latent[:, :, :window, :window].to(device)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    decode(crop)
    per_window = max(1.0, torch.cuda.max_memory_allocated(device) - before)
    free, _ = torch.cuda.mem_get_info(device)
    return max(1, int(free * GPU_MEMORY_SHARE / per_window))
