"""The grid prior as a LightningModule: a DiT over [d + 1, k, k] crops, epsilon prediction,
conditioned on the dataset label (dropped to the null label for classifier-free guidance by the
data stream, not inside the model, so that resuming repeats an uninterrupted run)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from pipeline.models.prior import build_transformer, without_label_dropout
from pipeline.prior.settings import PriorSettings
from pipeline.training.module import EMA, DiffusionTrainingModule


class GridPriorModule(DiffusionTrainingModule):
    def __init__(self, settings: PriorSettings, channels: int, datasets: int) -> None:
        super().__init__()
        self.config = settings
        self.save_hyperparameters({"train_config": settings.to_dict(), "channels": channels, "datasets": datasets})
        with torch.random.fork_rng(devices=[]):  # initial weights depend on the run seed only
            torch.manual_seed(settings.seed)
            transformer = build_transformer(channels, settings.crop, datasets, settings.layers, settings.heads,
                                            settings.head_dim)
        self.transformer = without_label_dropout(transformer).train().requires_grad_(True)
        self.noise_scheduler = DDPMScheduler.from_config(settings.scheduler_config())
        self.ema = EMA(settings.ema_decay, **self.trained_modules()) if settings.ema_decay else None

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"transformer": self.transformer}

    def diffusion_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        grids, noise, timesteps = batch["grids"], batch["noise"], batch["timesteps"]
        noisy = self.noise_scheduler.add_noise(grids, noise, timesteps)
        prediction = self.transformer(noisy, timesteps, class_labels=batch["labels"]).sample
        return F.mse_loss(prediction.float(), noise.float())

    def export_transformer(self, use_ema: bool = True) -> nn.Module:
        if use_ema and self.ema is not None:
            return self.ema.transformer
        return self.transformer
