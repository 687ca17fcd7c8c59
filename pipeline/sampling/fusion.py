"""One denoising prediction for a whole canvas: every window's x0, averaged per pixel.

Windows go through the UNet in batches; with guidance, a batch holds the conditional and the
unconditional copies of its windows, so one call serves both.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import UNet2DConditionModel

from pipeline.models.guidance import guided_epsilon, needs_unconditional
from pipeline.sampling.windows import WindowLayout


class WindowFusion:
    """Predicts the canvas x0 from per-window UNet predictions, counting UNet evaluations."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        layout: WindowLayout,
        contexts: torch.Tensor,
        unconditional: torch.Tensor,
        guidance_scale: float,
        window_batch: int,
        window_weights: torch.Tensor | None = None,
    ) -> None:
        self.unet = unet
        # None: every window counts alike (LID). Else (window, window) weights that fade a
        # window's x0 out towards its edges, so no window's border shows as a step in the mean.
        self.window_weights = window_weights
        self.unconditional = unconditional
        self.guidance_scale = guidance_scale
        self.window_batch = window_batch
        self.evaluations = 0  # UNet evaluations of one 64x64 window (conditional and unconditional count apart)
        self.calls = 0
        self.set_layout(layout, contexts)

    def set_layout(self, layout: WindowLayout, contexts: torch.Tensor) -> None:
        """Use these windows (and their contexts) from the next prediction on."""
        if len(contexts) != len(layout):
            raise ValueError(f"{len(contexts)} contexts for {len(layout)} windows")
        self.layout = layout
        self.origins = layout.origins
        self.contexts = contexts
        self.coverage = layout.coverage() if self.window_weights is None else self._weight_sum(layout)

    def _weight_sum(self, layout: WindowLayout) -> torch.Tensor:
        total = torch.zeros(layout.height, layout.width)
        size = layout.window
        for r, c in layout.origins:
            total[r : r + size, c : c + size] += self.window_weights
        return total

    def window_epsilon(self, windows: torch.Tensor, contexts: torch.Tensor, model_timestep: float) -> torch.Tensor:
        """Guided noise predictions for a batch of window crops."""
        guided = needs_unconditional(self.guidance_scale)
        if guided:
            windows = torch.cat([windows, windows])
            contexts = torch.cat([contexts, self.unconditional.expand(len(contexts), -1, -1)])
        timesteps = torch.full((len(windows),), float(model_timestep), device=windows.device)
        with torch.no_grad():
            epsilon = self.unet(windows, timesteps, encoder_hidden_states=contexts).sample
        self.evaluations += len(windows)
        self.calls += 1
        if not guided:
            return epsilon
        conditional, unconditional = epsilon.chunk(2)
        return guided_epsilon(conditional, unconditional, self.guidance_scale)

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
        for start in range(0, len(self.origins), self.window_batch):
            origins = self.origins[start : start + self.window_batch]
            windows = torch.stack([canvas[0, :, r : r + size, c : c + size] for r, c in origins])
            epsilon = self.window_epsilon(windows, self.contexts[start : start + len(origins)], model_timestep)
            x0 = windows / root - epsilon * noise_ratio
            if self.window_weights is not None:
                x0 = x0 * self.window_weights.to(x0.device, x0.dtype)
            for (r, c), window_x0 in zip(origins, x0):
                x0_sum[:, r : r + size, c : c + size] += window_x0
        return (x0_sum / self.coverage.to(canvas.device, canvas.dtype))[None]
