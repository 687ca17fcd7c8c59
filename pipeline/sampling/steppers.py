"""Step rules for the canvas: LID's quirk-faithful DDIM loop, or a diffusers scheduler.

Both take the fused canvas x0 (see fusion.py) and return the next canvas, drawing all their noise
from the one generator they are given.
"""

from __future__ import annotations

import inspect
from typing import Any, Protocol

import numpy as np
import torch

from pipeline.errors import PipelineError
from pipeline.models.schedulers import build_scheduler
from pipeline.sampling.config import LID_SAMPLER, LargeImageConfig


class Stepper(Protocol):
    timesteps: list[int]

    def initial_canvas(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor: ...

    def model_timestep(self, t: int) -> float: ...

    def alpha_bar(self, t: int) -> float: ...

    def step(self, t: int, canvas: torch.Tensor, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor: ...


def gaussian(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 draw on the generator's device, moved to `like`'s device."""
    noise = torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device)
    return noise if like is None else noise.to(like.device, like.dtype)


class LidDDIMStepper:
    """LID's `get_panorama` loop, quirks included.

    - timesteps T, T - s, ..., s with s = T / steps; the UNet is called with t while the schedule is
      read at t - 1;
    - alpha-bar is the float32 cumulative product of the float32 betas;
    - the noise variance is the single-step beta[t-1] (1 - abar_prev) / (1 - abar), times eta,
      not the strided DDIM sigma^2; the last step returns x0;
    - the start is sqrt(abar[T-1]) L + sqrt(1 - abar[T-1]) eps0, two draws.
    """

    def __init__(self, betas: np.ndarray, steps: int, eta: float) -> None:
        total = len(betas)
        if total % steps:
            raise PipelineError(f"lid_ddim needs steps dividing {total} timesteps, got {steps}")
        self.stride = total // steps
        self.timesteps = list(range(total, 0, -self.stride))
        self.betas = np.asarray(betas, dtype=np.float32)
        self.alpha_bars = np.cumprod(np.float32(1) - self.betas, dtype=np.float32)
        self.eta = np.float32(eta)

    def initial_canvas(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        latent = gaussian(shape, generator)
        noise = gaussian(shape, generator)
        alpha_bar = torch.tensor(self.alpha_bars[-1])
        return torch.sqrt(alpha_bar) * latent + torch.sqrt(1 - alpha_bar) * noise

    def model_timestep(self, t: int) -> float:
        return float(t)

    def alpha_bar(self, t: int) -> float:
        return self.alpha_bars[t - 1]

    def step(self, t: int, canvas: torch.Tensor, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        alpha_bar = self.alpha_bars[t - 1]
        # The noise that the fused x0 implies for the canvas.
        epsilon = (canvas - float(np.sqrt(alpha_bar)) * x0) / float(np.sqrt(1 - alpha_bar))
        if t <= self.stride:
            return x0
        alpha_bar_prev = self.alpha_bars[t - 1 - self.stride]
        variance = self.betas[t - 1] * (1 - alpha_bar_prev) / (1 - alpha_bar) * self.eta
        noise = gaussian(tuple(canvas.shape), generator, like=canvas)
        return (
            float(np.sqrt(alpha_bar_prev)) * x0
            + float(np.sqrt(1 - alpha_bar_prev - variance)) * epsilon
            + float(np.sqrt(variance)) * noise
        )


class DiffusersStepper:
    """A diffusers scheduler on the model's own schedule, fed the fused x0 (prediction_type "sample")."""

    def __init__(self, name: str, scheduler_config: dict[str, Any], steps: int, eta: float, spacing: str) -> None:
        # The last step lands on alpha-bar 1: the fused x0 itself, as LID's loop ends.
        self.scheduler = build_scheduler(name, scheduler_config, steps, prediction_type="sample",
                                         timestep_spacing=spacing, final_alpha_is_one=True)
        self.timesteps = [int(t) for t in self.scheduler.timesteps]
        accepted = inspect.signature(self.scheduler.step).parameters
        self.step_options: dict[str, Any] = {"eta": eta} if "eta" in accepted else {}
        self.takes_generator = "generator" in accepted

    def initial_canvas(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
        return gaussian(shape, generator) * float(self.scheduler.init_noise_sigma)

    def model_timestep(self, t: int) -> float:
        return float(t)

    def alpha_bar(self, t: int) -> float:
        return float(self.scheduler.alphas_cumprod[t])

    def step(self, t: int, canvas: torch.Tensor, x0: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        options = dict(self.step_options, generator=generator) if self.takes_generator else self.step_options
        return self.scheduler.step(x0, t, canvas, **options).prev_sample


def make_stepper(config: LargeImageConfig, betas: np.ndarray, scheduler_config: dict[str, Any]) -> Stepper:
    if config.sampler == LID_SAMPLER:
        return LidDDIMStepper(betas, config.steps, config.eta)
    return DiffusersStepper(config.sampler, scheduler_config, config.steps, config.eta, config.timestep_spacing)
