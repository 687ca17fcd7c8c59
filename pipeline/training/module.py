"""The latent diffusion model as a LightningModule: LID's UNet + condition stage, ε-prediction.

One training step (as LID's LatentDiffusion with conditioning_key=crossattn, l_simple only):
    embeddings -> zeros for the dropped ~10% (classifier-free guidance) -> condition stage
    (L2-normalise, Linear, one token; a zero vector normalises to zero, so the null condition is
    the projection's bias) -> context;
    x_t = DDPMScheduler.add_noise(latents, noise, t);  loss = MSE(UNet(x_t, t, context), noise).
Noise, t and the dropout mask come with the batch (drawn from (seed, rank, step) by the data
stream), so a resumed run repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn

from pipeline.models.condition import PatchEmbeddingCondition
from pipeline.models.presets import unet_kwargs
from pipeline.training.config import TrainConfig


def warmup_factor(step: int, warmup_steps: int) -> float:
    """Linear warm-up from 0 to 1 over ``warmup_steps`` optimizer steps, then 1 (constant rate)."""
    if warmup_steps <= 0:
        return 1.0
    return min(1.0, (step + 1) / warmup_steps)


def null_condition_input(embeddings: torch.Tensor, drop: torch.Tensor) -> torch.Tensor:
    """Embeddings with the rows in ``drop`` replaced by zeros (before the condition stage)."""
    return torch.where(drop[:, None].to(embeddings.device), torch.zeros_like(embeddings), embeddings)


class EMA(nn.Module):
    """Exponential moving average of named modules (the LDM: unet and condition), as CompVis LitEma.

    decay_t = min(decay, (1 + t) / (10 + t)) for update number t, so early averages are not
    dominated by the random initialisation. The copies (state-dict keys ``<name>.*``) and the
    update counter are in the module's state dict (so in every checkpoint); never trained.
    """

    def __init__(self, decay: float, **modules: nn.Module) -> None:
        super().__init__()
        self.decay = decay
        self.names = tuple(modules)
        for name, module in modules.items():
            self.add_module(name, copy.deepcopy(module).requires_grad_(False).eval())
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.int64))

    def train(self, mode: bool = True) -> EMA:  # always in eval mode
        return super().train(False)

    @torch.no_grad()
    def update(self, **modules: nn.Module) -> None:
        step = int(self.num_updates)
        decay = min(self.decay, (1 + step) / (10 + step))
        for name in self.names:
            ema_params = list(getattr(self, name).parameters())
            params = [p.detach().to(e.dtype) for p, e in zip(modules[name].parameters(), ema_params, strict=True)]
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        self.num_updates += 1


class DiffusionTrainingModule(L.LightningModule):
    """What every diffusion model trained here shares: the logged loss, the EMA update right after
    each optimizer step, AdamW with LID's linear warm-up. A subclass sets ``self.config`` (with
    learning_rate, adam_betas, weight_decay, warmup_steps), ``self.ema`` (an EMA or None) and
    defines ``diffusion_loss(batch)`` and ``trained_modules()``; its batches hold ``noise``."""

    config: Any
    ema: EMA | None

    def trained_modules(self) -> dict[str, nn.Module]:
        """The modules the optimizer trains and the EMA averages, by name."""
        raise NotImplementedError

    def diffusion_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.diffusion_loss(batch)
        size = len(batch["noise"])
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False, batch_size=size)
        self.log("train/lr", self.optimizers().param_groups[0]["lr"], on_step=True, on_epoch=False, batch_size=size)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        # Right after each optimizer step, before any callback (e.g. a checkpoint) sees the step.
        if self.ema is not None:
            self.ema.update(**self.trained_modules())

    def configure_optimizers(self) -> dict[str, Any]:
        config = self.config
        params = [p for module in self.trained_modules().values() for p in module.parameters()]
        optimizer = torch.optim.AdamW(params, lr=config.learning_rate, betas=config.adam_betas,
                                      weight_decay=config.weight_decay)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_factor(step, config.warmup_steps))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}


class LatentDiffusion(DiffusionTrainingModule):
    def __init__(self, config: TrainConfig, unet: UNet2DConditionModel | None = None,
                 condition: PatchEmbeddingCondition | None = None) -> None:
        super().__init__()
        self.config = config
        self.save_hyperparameters({"train_config": config.to_dict()})
        unet_spec, condition_spec = config.specs()
        # A fresh model's initial weights depend on the run seed only (not on the global RNG state).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.seed)
            if unet is None:
                unet = UNet2DConditionModel(**unet_kwargs(unet_spec))
            if condition is None:
                condition = PatchEmbeddingCondition.from_spec(condition_spec)
        self.unet = unet.train().requires_grad_(True)
        self.condition = condition.train().requires_grad_(True)
        width = self.condition.patch_fc.in_features
        if width != config.patch_embed_dim:
            raise ValueError(f"the condition stage takes {width}-d embeddings, but patch_embed_dim is "
                             f"{config.patch_embed_dim}")
        if self.condition.patch_fc.out_features != self.unet.config.cross_attention_dim:
            raise ValueError("condition stage output width differs from the UNet's cross_attention_dim")
        if config.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.noise_scheduler = DDPMScheduler.from_config(config.scheduler_config())
        self.ema = EMA(config.ema_decay, **self.trained_modules()) if config.ema_decay else None

    # --- model -------------------------------------------------------------------------------------
    def context(self, embeddings: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        if drop is not None:
            embeddings = null_condition_input(embeddings, drop)
        return self.condition(embeddings)

    def diffusion_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        latents, noise, timesteps = batch["latents"], batch["noise"], batch["timesteps"]
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        context = self.context(batch["embeddings"], batch["drop"])
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=context).sample
        return F.mse_loss(prediction.float(), noise.float())

    def trained_modules(self) -> dict[str, nn.Module]:
        return {"unet": self.unet, "condition": self.condition}

    # --- for export ---------------------------------------------------------------------------------
    def export_models(self, use_ema: bool = True) -> tuple[UNet2DConditionModel, PatchEmbeddingCondition]:
        if use_ema and self.ema is not None:
            return self.ema.unet, self.ema.condition
        return self.unet, self.condition
