"""Trained model -> a folder of diffusers ``save_pretrained`` parts, and back.

Layout (written atomically as a whole)::

    <folder>/unet/            UNet2DConditionModel.save_pretrained (config.json + safetensors)
    <folder>/vae/             VQModel or AutoencoderKL.save_pretrained (the first stage used for the latents)
    <folder>/condition/       model.safetensors (patch_fc.weight, patch_fc.bias) + config.json
    <folder>/scheduler/       DDPMScheduler.save_pretrained (scheduler_config.json)
    <folder>/rldiff.json      what was exported: step, EMA or not, embedding key, training config,
                              the autoencoder record (including random_weights)

:func:`load_exported` loads it back on the CPU in float32, eval mode (what a sampler needs).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file

from pipeline.io.atomic import atomic_dir
from pipeline.latents.autoencoder import Autoencoder, from_pretrained_folder
from pipeline.models.condition import PatchEmbeddingCondition
from pipeline.models.seed_config import ConditionSpec

FORMAT = "rldiff-ldm-export/1"
CONDITION_WEIGHTS = "model.safetensors"


def save_condition(condition: PatchEmbeddingCondition, folder: Path, embedding_key: str | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().float().cpu().contiguous() for name, t in condition.state_dict().items()}
    save_file(tensors, str(folder / CONDITION_WEIGHTS))
    config = {
        "_class_name": "PatchEmbeddingCondition",
        "patch_embed_dim": condition.patch_fc.in_features,
        "target_dim": condition.patch_fc.out_features,
        "normalize_ssl": bool(condition.normalize),
        "embedding_key": embedding_key,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_condition(folder: str | Path) -> tuple[PatchEmbeddingCondition, dict[str, Any]]:
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    spec = ConditionSpec(patch_embed_dim=int(config["patch_embed_dim"]), target_dim=int(config["target_dim"]),
                         normalize_ssl=bool(config["normalize_ssl"]))
    condition = PatchEmbeddingCondition(spec)
    condition.load_state_dict(load_file(str(folder / CONDITION_WEIGHTS)), strict=True)
    return condition.eval().requires_grad_(False), config


def export_models(folder: str | Path, unet: UNet2DConditionModel, condition: PatchEmbeddingCondition,
                  autoencoder: Autoencoder, scheduler_config: dict[str, Any],
                  info: dict[str, Any] | None = None, embedding_key: str | None = None) -> Path:
    """Write the export folder (replacing an older one as a whole)."""
    folder = Path(folder)
    with atomic_dir(folder) as temp:
        unet.save_pretrained(temp / "unet", safe_serialization=True)
        autoencoder.model.save_pretrained(temp / "vae", safe_serialization=True)
        save_condition(condition, temp / "condition", embedding_key)
        DDPMScheduler.from_config(scheduler_config).save_pretrained(temp / "scheduler")
        record = {"format": FORMAT, "embedding_key": embedding_key, "autoencoder": autoencoder.record(),
                  **(info or {})}
        (temp / "rldiff.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return folder


def export_module(module, folder: str | Path, autoencoder: Autoencoder, use_ema: bool = True) -> Path:
    """Export a trained :class:`~pipeline.training.module.LatentDiffusion` (EMA weights if it has them)."""
    unet, condition = module.export_models(use_ema)
    config = module.config
    step = getattr(module, "_exported_step", None)
    info = {"global_step": int(module.global_step if step is None else step),
            "ema": bool(use_ema and module.ema is not None), "train_config": config.to_dict()}
    if autoencoder.latent_channels != config.latent_channels:
        raise ValueError(f"the autoencoder has {autoencoder.latent_channels} latent channels, the model was "
                         f"trained on {config.latent_channels}")
    return export_models(folder, unet, condition, autoencoder, config.scheduler_config(), info, config.embedding_key)


def export_checkpoint(checkpoint: str | Path, folder: str | Path, autoencoder: Autoencoder,
                      use_ema: bool = True) -> Path:
    """Export from a training checkpoint (``last.ckpt`` or ``step-NNNNNN.ckpt``)."""
    from pipeline.training.run import module_from_checkpoint

    module = module_from_checkpoint(checkpoint)
    return export_module(module, folder, autoencoder, use_ema)


@dataclass
class ExportedModel:
    unet: UNet2DConditionModel
    condition: PatchEmbeddingCondition
    autoencoder: Autoencoder
    scheduler: DDPMScheduler
    info: dict[str, Any]

    @torch.no_grad()
    def context(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.condition(embeddings)

    @torch.no_grad()
    def null_context(self, batch_size: int = 1) -> torch.Tensor:
        """The unconditional context the model was trained with: the condition stage of zeros."""
        return self.condition(torch.zeros(batch_size, self.condition.patch_fc.in_features))


def load_exported(folder: str | Path) -> ExportedModel:
    folder = Path(folder)
    info_path = folder / "rldiff.json"
    if not info_path.is_file():
        raise FileNotFoundError(f"{folder}: not an exported model (no rldiff.json)")
    info = json.loads(info_path.read_text())
    if info.get("format") != FORMAT:
        raise ValueError(f"{info_path}: format {info.get('format')!r}, expected {FORMAT!r}")
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", local_files_only=True).eval().requires_grad_(False)
    condition, _ = load_condition(folder / "condition")
    record = info.get("autoencoder", {})
    autoencoder = from_pretrained_folder(folder / "vae", random_weights=bool(record.get("random_weights")),
                                         source=record.get("source"))
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    return ExportedModel(unet, condition, autoencoder, scheduler, info)
