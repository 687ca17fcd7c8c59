"""What a sampler needs from a trained model, whichever form the model came in.

Two forms exist: a seed release folder (``configs/*-project.yaml`` + ``checkpoints/last.ckpt``,
converted by :mod:`pipeline.models`) and this project's export folder (``rldiff.json`` + diffusers
``save_pretrained`` parts, :mod:`pipeline.training.export`). Both become a :class:`DiffusionModel`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from pipeline.latents.autoencoder import Autoencoder
from pipeline.models.condition import PatchEmbeddingCondition
from pipeline.models.seed_checkpoint import CONFIG_GLOB, SeedModel, load_seed_checkpoint
from pipeline.training.export import ExportedModel, load_exported


@dataclass
class DiffusionModel:
    unet: UNet2DConditionModel
    condition: PatchEmbeddingCondition
    autoencoder: Autoencoder
    betas: np.ndarray  # the training schedule (float64 values)
    scheduler_config: dict[str, Any]  # diffusers scheduler config of that schedule (epsilon prediction)
    source: str
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def latent_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def embedding_dim(self) -> int:
        return int(self.condition.patch_fc.in_features)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def random_weights(self) -> bool:
        """True when the first stage has random weights (demo models): its images mean nothing."""
        return bool(self.autoencoder.random_weights)

    def to(self, device: torch.device | str) -> DiffusionModel:
        self.unet.to(device)
        self.condition.to(device)
        self.autoencoder.to(device)
        return self

    @classmethod
    def from_seed(cls, seed: SeedModel) -> DiffusionModel:
        autoencoder = Autoencoder(seed.vae, "vq", str(seed.checkpoint_path))
        return cls(seed.unet, seed.condition, autoencoder, np.asarray(seed.betas, dtype=np.float64),
                   dict(seed.scheduler_config), str(seed.checkpoint_path.parent.parent),
                   {"format": "seed-release", "config": str(seed.config_path)})

    @classmethod
    def from_export(cls, exported: ExportedModel, source: str = "") -> DiffusionModel:
        scheduler: DDPMScheduler = exported.scheduler
        config = {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")}
        return cls(exported.unet, exported.condition, exported.autoencoder,
                   scheduler.betas.double().numpy(), config, source, dict(exported.info))


def as_diffusion_model(model: DiffusionModel | SeedModel | ExportedModel) -> DiffusionModel:
    if isinstance(model, DiffusionModel):
        return model
    if isinstance(model, SeedModel):
        return DiffusionModel.from_seed(model)
    if isinstance(model, ExportedModel):
        return DiffusionModel.from_export(model)
    raise TypeError(f"not a diffusion model: {type(model).__name__}")


def load_diffusion_model(folder: str | Path) -> DiffusionModel:
    """An export folder (``rldiff.json``) or a seed release folder, on the CPU in float32, eval mode."""
    folder = Path(folder)
    if (folder / "rldiff.json").is_file():
        return DiffusionModel.from_export(load_exported(folder), str(folder))
    if any(folder.glob(CONFIG_GLOB)):
        return DiffusionModel.from_seed(load_seed_checkpoint(folder))
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: model folder not found")
    raise ValueError(f"{folder}: neither an exported model (rldiff.json) nor a seed release folder ({CONFIG_GLOB})")
