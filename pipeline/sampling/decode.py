"""Blended window decoding of a large latent, streamed as finished bands of output rows.

Each window of `window` latents is decoded on its own (a first-stage decoder sees only inputs of
the size it was trained on), weighted (LID: a Gaussian centred on the window), and the weighted
decodes are summed and divided by the summed weights. Windows are decoded one window row at a
time; once a window row is done, every output row above the next window row's top is final, so
it is converted to uint8 and handed out. Only a band one window high stays in float memory.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
import torch

from pipeline.models.first_stage import to_uint8
from pipeline.sampling.windows import WindowLayout

Decoder = Callable[[torch.Tensor], torch.Tensor]


def blended_bands(
    decode: Decoder, latent: torch.Tensor, factor: int, window: int, stride: int, batch: int,
    weights: torch.Tensor,
) -> Iterator[tuple[int, np.ndarray]]:
    """Yield (first output row, uint8 rows (h, W, bands)) top to bottom; the row bands tile the image.

    latent: (1, C, H, W); weights: (window * factor,) * 2, positive everywhere (see weights.py).
    The image has as many bands as the decoder gives (3 for RGB, 4 for R, G, B, NIR).
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
    image_sum = None  # (bands, tile, width), allocated once the first decode says how many bands
    weight_sum = torch.zeros(1, tile, width, device=latent.device)
    row_offsets = layout.row_offsets
    for index, row in enumerate(row_offsets):
        columns = layout.column_offsets
        for start in range(0, len(columns), batch):
            chosen = columns[start : start + batch]
            crops = torch.cat([latent[:, :, row : row + window, c : c + window] for c in chosen])
            images = decode(crops).float()
            if image_sum is None:
                image_sum = torch.zeros(images.shape[1], tile, width, device=latent.device)
            for column, image in zip(chosen, images):
                span = slice(column * factor, column * factor + tile)
                image_sum[:, :, span] += image * weights
                weight_sum[:, :, span] += weights
        next_top = row_offsets[index + 1] * factor if index + 1 < len(row_offsets) else row * factor + tile
        finished = next_top - row * factor
        yield row * factor, to_uint8((image_sum[:, :finished] / weight_sum[:, :finished])[None])[0]
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
) -> np.ndarray:
    """The whole (H*f, W*f, bands) uint8 image; pass `out` (e.g. an np.memmap) to keep it off the heap."""
    shape = (latent.shape[2] * factor, latent.shape[3] * factor, bands)
    if out is None:
        out = np.empty(shape, dtype=np.uint8)
    elif out.shape != shape or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 of shape {shape}, got {out.dtype} {out.shape}")
    for top, rows in blended_bands(decode, latent, factor, window, stride, batch, weights):
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
