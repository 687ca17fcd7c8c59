"""Patches from embeddings: classifier-free-guided sampling with diffusers schedulers.

Each patch's noise comes from its own generator, seeded by (seed, patch number), so a patch does
not change with the batch size or with the other patches of its batch.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, PNDMScheduler

from pipeline.sampling.decode import to_uint8
from pipeline.sampling.fusion import guided_epsilon, needs_unconditional
from pipeline.sampling.model import DiffusionModel

# name -> (scheduler class, settings on top of the model's own training schedule)
PATCH_SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {"set_alpha_to_one": False}),
    # PLMS is PNDM without its Runge-Kutta warm-up steps, as in CompVis' PLMSSampler.
    "plms": (PNDMScheduler, {"skip_prk_steps": True, "set_alpha_to_one": False}),
    "dpmsolver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}


@dataclass(frozen=True)
class PatchSamplingConfig:
    """How to sample patches. The defaults are the seed's patch sampling: PLMS, 50 steps, s = 2.

    guidance_scale: s in eps_u + s (eps_c - eps_u); 1 is the conditional model alone.
    timestep_spacing: "leading" with steps_offset 1 gives CompVis' timesteps 1, 21, ..., 981.
    """

    sampler: str = "plms"
    steps: int = 50
    guidance_scale: float = 2.0
    eta: float = 0.0  # DDIM only
    batch_size: int = 16
    seed: int = 0
    timestep_spacing: str = "leading"
    steps_offset: int = 1

    def __post_init__(self) -> None:
        if self.sampler not in PATCH_SCHEDULERS:
            raise ValueError(f"sampler {self.sampler!r}: expected one of {sorted(PATCH_SCHEDULERS)}")
        if self.steps < 1 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be positive")
        if self.eta < 0 or self.guidance_scale < 0:
            raise ValueError("eta and guidance_scale must be >= 0")
        if self.eta and self.sampler != "ddim":
            raise ValueError(f"eta is a DDIM setting; {self.sampler} is deterministic")

    def with_(self, **changes: object) -> PatchSamplingConfig:
        return replace(self, **changes)


def make_scheduler(config: PatchSamplingConfig, scheduler_config: dict[str, Any]):
    scheduler_class, settings = PATCH_SCHEDULERS[config.sampler]
    scheduler = scheduler_class.from_config({
        **scheduler_config, **settings, "prediction_type": "epsilon",
        "timestep_spacing": config.timestep_spacing, "steps_offset": config.steps_offset,
    })
    scheduler.set_timesteps(config.steps)
    return scheduler


def patch_generator(seed: int, index: int) -> torch.Generator:
    """The generator of patch number `index` (SeedSequence mixes the two numbers)."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 32) | int(state[1]))


@dataclass
class PatchBatch:
    first_index: int
    images: np.ndarray  # (B, H, W, 3) uint8
    latents: torch.Tensor  # (B, C, h, w) float32, on the CPU
    unet_evaluations: int


class PatchSampler:
    """Sample patches for rows of an (N, D) embedding array, in batches."""

    def __init__(self, model: DiffusionModel, config: PatchSamplingConfig) -> None:
        self.model = model
        self.config = config
        self.guided = needs_unconditional(config.guidance_scale, "standard")
        with torch.no_grad():
            self.null_context = model.condition(torch.zeros(1, model.embedding_dim, device=model.device))

    def latent_shape(self) -> tuple[int, int, int]:
        return (self.model.latent_channels, self.model.latent_size, self.model.latent_size)

    @torch.no_grad()
    def sample_latents(self, embeddings: torch.Tensor, first_index: int = 0) -> tuple[torch.Tensor, int]:
        """(B, D) embeddings -> (B, C, h, w) latents, and the UNet evaluations it took."""
        model, config = self.model, self.config
        device = model.device
        generators = [patch_generator(config.seed, first_index + i) for i in range(len(embeddings))]
        scheduler = make_scheduler(config, model.scheduler_config)
        latents = torch.stack([torch.randn(self.latent_shape(), generator=g) for g in generators])
        latents = (latents * scheduler.init_noise_sigma).to(device)
        context = model.condition(embeddings.to(device, torch.float32))
        if self.guided:
            context = torch.cat([context, self.null_context.expand(len(embeddings), -1, -1)])
        step_options: dict[str, Any] = {}
        accepted = inspect.signature(scheduler.step).parameters
        if "eta" in accepted:
            step_options["eta"] = config.eta
        if "generator" in accepted and config.eta > 0:
            # One noise stream per patch; diffusers draws from CPU generators on the CPU, then moves.
            step_options["generator"] = generators
        evaluations = 0
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            if self.guided:
                model_input = torch.cat([model_input, model_input])
            timesteps = torch.full((len(model_input),), int(t), device=device)
            epsilon = model.unet(model_input, timesteps, encoder_hidden_states=context).sample
            evaluations += len(model_input)
            if self.guided:
                conditional, unconditional = epsilon.chunk(2)
                epsilon = guided_epsilon(conditional, unconditional, config.guidance_scale, "standard")
            latents = scheduler.step(epsilon, t, latents, **step_options).prev_sample
        return latents.float().cpu(), evaluations

    def batches(self, embeddings: np.ndarray | torch.Tensor) -> Iterator[PatchBatch]:
        embeddings = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        if embeddings.ndim != 2 or embeddings.shape[1] != self.model.embedding_dim:
            raise ValueError(f"embeddings of shape {tuple(embeddings.shape)}: the model's condition stage "
                             f"takes ({self.model.embedding_dim},) vectors")
        for start in range(0, len(embeddings), self.config.batch_size):
            latents, evaluations = self.sample_latents(embeddings[start : start + self.config.batch_size], start)
            images = to_uint8(self.model.autoencoder.decode(latents))
            yield PatchBatch(start, images, latents, evaluations)

