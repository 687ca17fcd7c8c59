"""The Lightning module that trains a first-stage autoencoder: L1 + (1 - SSIM) reconstruction
loss, plus the VQ commitment loss (vq) or a small KL term (kl), AdamW, optional EMA of the weights
(kept in every checkpoint, and what is exported when set)."""

from __future__ import annotations

import copy

import lightning as L
import torch
from diffusers import VQModel
from torch import nn
from torchmetrics.functional.image import structural_similarity_index_measure

from pipeline.autoencoder.data import step_generator
from pipeline.autoencoder.settings import AutoencoderTrainSettings

NOISE_STREAM = 0x4E015E  # the KL posterior samples' stream (the batches have their own)
# Adam betas of the taming/LDM autoencoder recipe.
ADAM_BETAS = (0.5, 0.9)


class WeightsEMA(nn.Module):
    """Exponential moving average of a model's parameters; decay_t = min(decay, (1 + t) / (10 + t))."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        super().__init__()
        self.decay = decay
        self.model = copy.deepcopy(model).requires_grad_(False).eval()
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int64))

    def train(self, mode: bool = True) -> WeightsEMA:  # always in eval mode
        return super().train(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        step = int(self.num_updates)
        decay = min(self.decay, (1 + step) / (10 + step))
        ema = list(self.model.parameters())
        torch._foreach_lerp_(ema, [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema, strict=True)],
                             1.0 - decay)
        self.num_updates += 1


class AutoencoderModule(L.LightningModule):
    def __init__(self, settings: AutoencoderTrainSettings, sample_size: int) -> None:
        super().__init__()
        self.settings = settings
        self.save_hyperparameters({"autoencoder_settings": settings.to_dict(), "sample_size": sample_size})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            self.model = settings.build_model(sample_size)
        self.ema = WeightsEMA(self.model, settings.ema_decay) if settings.ema_decay else None

    def losses(self, images: torch.Tensor, step: int = 0) -> dict[str, torch.Tensor]:
        """The loss of one batch; the KL posterior's sample is drawn from (seed, step) alone, so
        that a resumed run draws what an uninterrupted one would have."""
        s = self.settings
        if isinstance(self.model, VQModel):
            latents = self.model.encode(images).latents
            decoded = self.model.decode(latents)
            reconstruction, extra = decoded.sample, decoded.commit_loss.mean()
        else:
            posterior = self.model.encode(images).latent_dist
            reconstruction = self.model.decode(posterior.sample(generator=step_generator(s.seed, step, NOISE_STREAM))).sample
            extra = s.kl_weight * posterior.kl().mean() / images[0].numel()
        reconstruction = reconstruction.float()
        l1 = (reconstruction - images).abs().mean()
        ssim = structural_similarity_index_measure((reconstruction.clamp(-1, 1) + 1) / 2, (images + 1) / 2,
                                                   data_range=1.0)
        loss = s.l1_weight * l1 + s.ssim_weight * (1 - ssim) + extra
        return {"loss": loss, "l1": l1.detach(), "ssim": ssim.detach(), "regulariser": extra.detach()}

    def training_step(self, batch, batch_idx):
        parts = self.losses(batch["images"], int(batch["step"]))
        self.log_dict({f"train/{k}": v for k, v in parts.items()}, prog_bar=False)
        return parts["loss"]

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        if self.ema is not None:
            self.ema.update(self.model)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.model.parameters(), lr=self.settings.learning_rate, betas=ADAM_BETAS,
                                 weight_decay=0.0)

    def export_model(self, use_ema: bool = True) -> nn.Module:
        return self.ema.model if use_ema and self.ema is not None else self.model
