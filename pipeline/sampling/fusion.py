"""One denoising prediction for a whole canvas: every window's x0, averaged per pixel.

Windows go through the UNet in chunks; with guidance, a chunk holds the conditional and the
unconditional copies of its windows, so one call serves both. The chunk size is given, or sized
from the free GPU memory. Under torch.distributed the chunks are dealt out to the ranks and the
per-pixel sums all-reduced: every rank then holds the same canvas x0 (the fusion is a sum).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist
from diffusers import UNet2DConditionModel

from pipeline.models.guidance import guided_epsilon, needs_unconditional
from pipeline.sampling.denoiser import WindowDenoiser
from pipeline.sampling.windows import WindowLayout, WindowSubset

CPU_WINDOW_BATCH = 32  # on a CPU larger calls are no faster, only larger
GPU_MEMORY_SHARE = 0.7  # of the free memory a chunk may take (the rest: allocator slack, decode)


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of the process group, (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class WindowFusion:
    """Predicts the canvas x0 from per-window UNet predictions, counting UNet evaluations."""

    def __init__(
        self,
        unet: UNet2DConditionModel | WindowDenoiser,
        layout: WindowLayout | WindowSubset,
        contexts: torch.Tensor,
        unconditional: torch.Tensor | None,
        guidance_scale: float,
        window_batch: int | None,
        window_weights: torch.Tensor | None = None,
    ) -> None:
        self.denoiser = unet if isinstance(unet, WindowDenoiser) else WindowDenoiser(unet)
        # None: every window counts alike (LID). Else (window, window) weights that fade a
        # window's x0 out towards its edges, so no window's border shows as a step in the mean.
        self.window_weights = window_weights
        self.unconditional = unconditional
        self.guidance_scale = guidance_scale
        self.window_batch = window_batch  # None: sized from free memory at the first prediction
        self.evaluations = 0  # UNet evaluations of one 64x64 window (conditional and unconditional count apart)
        self.calls = 0
        self.set_layout(layout, contexts)

    def set_layout(self, layout: WindowLayout | WindowSubset, contexts: torch.Tensor) -> None:
        """Use these windows (and their contexts) from the next prediction on."""
        if len(contexts) != len(layout):
            raise ValueError(f"{len(contexts)} contexts for {len(layout)} windows")
        self.layout = layout
        self.origins = layout.origins
        self.contexts = contexts
        coverage = layout.coverage() if self.window_weights is None else self._weight_sum(layout)
        # Pixels no window covers (a subset's glass) get x0 0 instead of 0 / 0.
        self.coverage = torch.where(coverage > 0, coverage, torch.ones_like(coverage))

    def _weight_sum(self, layout: WindowLayout | WindowSubset) -> torch.Tensor:
        total = torch.zeros(layout.height, layout.width)
        size = layout.window
        for r, c in layout.origins:
            total[r : r + size, c : c + size] += self.window_weights
        return total

    def window_epsilon(self, windows: torch.Tensor, contexts: torch.Tensor, model_timestep: float,
                       key: int = 0) -> torch.Tensor:
        """Guided noise predictions for a chunk of window crops (`key`: the chunk's first window)."""
        guided = needs_unconditional(self.guidance_scale)
        if guided:
            windows = torch.cat([windows, windows])
            contexts = torch.cat([contexts, self.unconditional.expand(len(contexts), -1, -1)])
        timesteps = torch.full((len(windows),), float(model_timestep), device=windows.device)
        epsilon = self.denoiser(windows, timesteps, contexts, key)
        self.evaluations += len(windows)
        self.calls += 1
        if not guided:
            return epsilon
        conditional, unconditional = epsilon.chunk(2)
        return guided_epsilon(conditional, unconditional, self.guidance_scale)

    def chunk_size(self, canvas: torch.Tensor) -> int:
        """Windows per UNet call: as configured, else as many as fit in the free GPU memory (all of
        them, CPU_WINDOW_BATCH at most, on a CPU)."""
        if self.window_batch is None:
            self.window_batch = self._fitting_windows(canvas)
        return self.window_batch

    def _fitting_windows(self, canvas: torch.Tensor) -> int:
        count = len(self.origins)
        if canvas.device.type != "cuda":
            return min(count, CPU_WINDOW_BATCH)
        # The peak memory of a full pass over a few windows, as the first step makes, scaled.
        probed, size = min(2, count), self.layout.window
        windows = canvas[0, :, :size, :size].expand(probed, -1, -1, -1).contiguous()
        evaluations, calls = self.evaluations, self.calls
        torch.cuda.synchronize(canvas.device)
        torch.cuda.reset_peak_memory_stats(canvas.device)
        before = torch.cuda.memory_allocated(canvas.device)
        self.window_epsilon(windows, self.contexts[:probed], 999.0, key=-1)
        per_window = max(1.0, (torch.cuda.max_memory_allocated(canvas.device) - before) / probed)
        self.evaluations, self.calls = evaluations, calls  # the probe is not part of the sample
        self.denoiser.cache.pop(-1, None)
        free, _ = torch.cuda.mem_get_info(canvas.device)
        return max(1, min(count, int(free * GPU_MEMORY_SHARE / per_window)))

    @torch.no_grad()
    def predict_x0(self, canvas: torch.Tensor, model_timestep: float, alpha_bar: float) -> torch.Tensor:
        """(1, C, H, W) canvas at the noise level alpha_bar -> the per-pixel mean of the windows' x0."""
        if canvas.shape[0] != 1 or tuple(canvas.shape[2:]) != (self.layout.height, self.layout.width):
            raise ValueError(f"canvas of shape {tuple(canvas.shape)} does not match the window layout")
        # Scalars in float32, as LID computed them from its float32 schedule.
        alpha_bar = np.float32(alpha_bar)
        root = float(np.sqrt(alpha_bar))
        noise_ratio = float(np.sqrt((1 - alpha_bar) / alpha_bar))
        size = self.layout.window
        x0_sum = torch.zeros_like(canvas[0])
        if not self.origins:  # a canvas of glass only: nothing to predict
            return x0_sum[None]
        chunk = self.chunk_size(canvas)
        rank, world = distributed_rank()
        for start in list(range(0, len(self.origins), chunk))[rank::world]:
            origins = self.origins[start : start + chunk]
            windows = torch.stack([canvas[0, :, r : r + size, c : c + size] for r, c in origins])
            epsilon = self.window_epsilon(windows, self.contexts[start : start + len(origins)], model_timestep, start)
            x0 = windows / root - epsilon * noise_ratio
            if self.window_weights is not None:
                x0 = x0 * self.window_weights.to(x0.device, x0.dtype)
            for (r, c), window_x0 in zip(origins, x0):
                x0_sum[:, r : r + size, c : c + size] += window_x0
        if world > 1:
            dist.all_reduce(x0_sum)
        return (x0_sum / self.coverage.to(canvas.device, canvas.dtype))[None]
