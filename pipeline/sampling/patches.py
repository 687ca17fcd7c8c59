"""Patches from embeddings, in batches, through the pipeline's own classifier-free-guided sampler.

Each patch's noise comes from its own generator, seeded by (seed, patch number), so a patch does
not change with the batch size or with the other patches of its batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch

from pipeline.models.diffusion_pipeline import PATCH_SAMPLERS, RLDiffPipeline


@dataclass(frozen=True)
class PatchSamplingConfig:
    """The config's `sampling:` table (plus the run seed). The defaults are LID's patch sampling:
    PLMS, 50 steps, s = 2.

    guidance_scale: s in eps_u + s (eps_c - eps_u); 1 is the conditional model alone.
    timestep_spacing: "leading" with steps_offset 1 gives CompVis' timesteps 1, 21, ..., 981.
    max_samples: at most this many held-out patches condition a sample.
    """

    sampler: str = "plms"
    steps: int = 50
    guidance_scale: float = 2.0
    eta: float = 0.0  # DDIM only
    batch_size: int = 16
    max_samples: int = 2048
    timestep_spacing: str = "leading"
    steps_offset: int = 1
    precision: str = "auto"  # bfloat16 autocast on CUDA, float32 on a CPU
    device: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.sampler not in PATCH_SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r}: expected one of {sorted(PATCH_SAMPLERS)}")
        if self.steps < 1 or self.batch_size < 1 or self.max_samples < 1:
            raise ValueError("steps, batch_size and max_samples must be positive")
        if self.eta < 0 or self.guidance_scale < 0:
            raise ValueError("eta and guidance_scale must be >= 0")
        if self.eta and self.sampler != "ddim":
            raise ValueError(f"eta is a DDIM setting; {self.sampler} is deterministic")

    def with_(self, **changes: object) -> PatchSamplingConfig:
        return replace(self, **changes)


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

    def __init__(self, model: RLDiffPipeline, config: PatchSamplingConfig) -> None:
        self.model = model
        self.config = config

    def sample(self, embeddings: torch.Tensor | np.ndarray, first_index: int = 0, output_type: str = "np"):
        """One batch: the pipeline's PatchOutput for (B, D) embeddings, patch numbers from first_index."""
        config = self.config
        generators = [patch_generator(config.seed, first_index + i) for i in range(len(embeddings))]
        return self.model(embeddings, num_inference_steps=config.steps, guidance_scale=config.guidance_scale,
                          sampler=config.sampler, eta=config.eta, generator=generators,
                          timestep_spacing=config.timestep_spacing, steps_offset=config.steps_offset,
                          precision=config.precision, output_type=output_type)

    def batches(self, embeddings: np.ndarray | torch.Tensor) -> Iterator[PatchBatch]:
        embeddings = np.asarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or embeddings.shape[1] != self.model.embedding_dim:
            raise ValueError(f"embeddings of shape {tuple(embeddings.shape)}: the model's condition stage "
                             f"takes ({self.model.embedding_dim},) vectors")
        for start in range(0, len(embeddings), self.config.batch_size):
            output = self.sample(embeddings[start : start + self.config.batch_size], start)
            yield PatchBatch(start, output.images, output.latents, output.unet_evaluations)
