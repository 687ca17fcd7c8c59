"""Sampling embedding grids of any size from the grid prior (pipeline.models.prior).

A grid larger than the prior's k x k training crops is sampled as the large-image sampler samples
a large latent canvas: overlapping k x k windows over grid positions (stride k / 2 unless given),
every window denoised by the prior at each DDIM step and the windows' noise predictions averaged
where they overlap (a DDIM step is linear in the prediction, so this is also the average of their
x0), with the interior window edges moved at random every step so that no edge stays in place.
Position (r, c) of the result is tissue where the mask channel ends above 0; its embedding is then
unit-norm (what the LDM's condition stage sees), and background positions are zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers import DDIMScheduler

from pipeline.models.guidance import guided_epsilon, needs_unconditional
from pipeline.models.prior import EmbeddingGridPrior
from pipeline.sampling.windows import WindowLayout, max_shift


@dataclass(frozen=True, eq=False)
class SampledGrids:
    embeddings: np.ndarray  # (count, rows, cols, D) float32, unit rows at tissue, zeros elsewhere
    tissue: np.ndarray  # (count, rows, cols) bool
    evaluations: int  # k x k windows through the prior (conditional and unconditional apart)


def _layouts(rows: int, cols: int, crop: int, stride: int, steps: int, shift: bool,
             generator: torch.Generator) -> list[WindowLayout]:
    row_room, col_room = (max_shift(crop, stride) if shift and size > crop else 0 for size in (rows, cols))
    layouts = []
    for _ in range(steps):
        dy = int(torch.randint(0, row_room + 1, (1,), generator=generator)) if row_room else 0
        dx = int(torch.randint(0, col_room + 1, (1,), generator=generator)) if col_room else 0
        layouts.append(WindowLayout(rows, cols, crop, stride, dy, dx))
    return layouts


@torch.no_grad()
def sample_grids(prior: EmbeddingGridPrior, rows: int, cols: int, count: int = 1, dataset: str | None = None,
                 steps: int = 50, guidance_scale: float = 1.0, stride: int | None = None, seed: int = 0,
                 window_batch: int = 256, shift_windows: bool = True) -> SampledGrids:
    """`count` grids of rows x cols positions for `dataset` (None: unconditional)."""
    crop = prior.crop
    height, width = max(rows, crop), max(cols, crop)  # smaller grids: the top-left of one crop
    stride = stride or max(1, crop // 2)
    generator = torch.Generator().manual_seed(seed)
    channels = prior.channels
    scheduler = DDIMScheduler.from_config(prior.scheduler.config)
    scheduler.set_timesteps(steps)
    canvas = torch.randn((count, channels, height, width), generator=generator)
    layouts = _layouts(height, width, crop, stride, len(scheduler.timesteps), shift_windows, generator)
    label = prior.label(dataset)
    guided = needs_unconditional(guidance_scale)
    evaluations = 0
    for t, layout in zip(scheduler.timesteps, layouts):
        origins = layout.origins
        windows = torch.stack([canvas[:, :, r : r + crop, c : c + crop] for r, c in origins], 1)
        windows = windows.reshape(-1, channels, crop, crop)  # window-major within each grid
        epsilon = torch.empty_like(windows)
        for start in range(0, len(windows), window_batch):
            chunk = windows[start : start + window_batch]
            labels = torch.full((len(chunk),), label)
            if guided:
                both = prior.predict_noise(torch.cat([chunk, chunk]), torch.full((2 * len(chunk),), int(t)),
                                           torch.cat([labels, torch.full_like(labels, prior.label(None))]))
                conditional, unconditional = both.chunk(2)
                epsilon[start : start + len(chunk)] = guided_epsilon(conditional, unconditional, guidance_scale)
            else:
                epsilon[start : start + len(chunk)] = prior.predict_noise(chunk, torch.full((len(chunk),), int(t)),
                                                                          labels)
            evaluations += len(chunk) * (2 if guided else 1)
        epsilon = epsilon.reshape(count, len(origins), channels, crop, crop)
        fused = torch.zeros_like(canvas)
        for i, (r, c) in enumerate(origins):
            fused[:, :, r : r + crop, c : c + crop] += epsilon[:, i]
        fused /= layout.coverage()
        canvas = scheduler.step(fused, t, canvas).prev_sample
    canvas = canvas[:, :, :rows, :cols].permute(0, 2, 3, 1).numpy()
    tissue = canvas[..., -1] > 0
    embeddings = np.where(tissue[..., None], prior.to_embeddings(canvas[..., :-1]), 0.0).astype(np.float32)
    return SampledGrids(embeddings, tissue, evaluations)
