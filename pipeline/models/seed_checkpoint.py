"""Load a seed release folder (`configs/*-project.yaml` + `checkpoints/last.ckpt`) into diffusers models."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import UNet2DConditionModel, VQModel

from pipeline.models.compvis_layout import checkpoint_layout
from pipeline.models.condition import PatchEmbeddingCondition
from pipeline.models.convert import build_condition, build_unet, build_vq
from pipeline.models.errors import SeedFormatError
from pipeline.models.lightning_checkpoint import load_lightning_checkpoint
from pipeline.models.presets import compvis_betas, scheduler_config
from pipeline.models.seed_config import SeedConfig, read_seed_config

CHECKPOINT_NAME = Path("checkpoints") / "last.ckpt"
CONFIG_GLOB = "configs/*-project.yaml"


@dataclass
class SeedModel:
    unet: UNet2DConditionModel
    vae: VQModel
    condition: PatchEmbeddingCondition
    betas: np.ndarray  # float64, the seed's training schedule
    scheduler_config: dict[str, Any]  # for diffusers DDPM/DDIM schedulers
    scale_factor: float  # latent scale of the LDM (1.0 for the seed's models)
    config: SeedConfig
    config_path: Path
    checkpoint_path: Path


def find_config(folder: Path) -> Path:
    """The folder's project config; Lightning writes one per (re)start, so the newest name wins."""
    configs = sorted(folder.glob(CONFIG_GLOB))
    if not configs:
        raise SeedFormatError(f"{folder}: no {CONFIG_GLOB} (not a seed release folder)")
    return configs[-1]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The `state_dict` of a Lightning checkpoint, loaded without unpickling arbitrary objects.

    Lightning 1.x files (the seed's releases) are read by `load_lightning_checkpoint`; everything
    but `state_dict` (optimizer, schedulers, callbacks) is ignored.
    """
    if not path.is_file():
        raise SeedFormatError(f"{path}: checkpoint not found")
    checkpoint = load_lightning_checkpoint(path)
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise SeedFormatError(f"{path}: not a Lightning checkpoint (no 'state_dict' mapping)")
    state = checkpoint["state_dict"]
    not_tensors = sorted(str(key) for key, value in state.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise SeedFormatError(f"{path}: state_dict entries that are not tensors: {not_tensors[:10]}")
    return dict(state)


def check_layout(config: SeedConfig, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Every key the config implies is present with its shape, and nothing else is."""
    required, optional = checkpoint_layout(config)
    missing = sorted(set(required) - set(state))
    unexpected = sorted(set(state) - set(required) - set(optional))
    if missing or unexpected:
        raise SeedFormatError(
            f"{source}: state_dict does not match {config.source}; "
            f"missing keys: {missing}, unexpected keys: {unexpected}"
        )
    expected = required | optional
    wrong = [
        f"{key}: {tuple(value.shape)} (expected {expected[key]})"
        for key, value in state.items()
        if tuple(value.shape) != expected[key]
    ]
    if wrong:
        raise SeedFormatError(f"{source}: tensors with the wrong shape for {config.source}: {wrong}")


def check_schedule(config: SeedConfig, state: Mapping[str, torch.Tensor], source: str) -> float:
    """Compare the stored schedule with the config's; returns the latent scale factor to use."""
    betas = compvis_betas(config.schedule)
    stored = state["betas"].double().numpy()
    # CompVis computes in float64 and stores float32: allow float32 rounding, nothing more.
    if not np.allclose(stored, betas, rtol=1e-6, atol=0):
        worst = float(np.max(np.abs(stored - betas)))
        raise SeedFormatError(f"{source}: 'betas' differ from the schedule in {config.source} (max abs {worst:.3g})")
    if "alphas_cumprod" in state:
        expected = np.cumprod(1.0 - betas)
        if not np.allclose(state["alphas_cumprod"].double().numpy(), expected, rtol=1e-5, atol=0):
            raise SeedFormatError(f"{source}: 'alphas_cumprod' is not cumprod(1 - betas) of {config.source}")
    if "scale_factor" not in state:
        return config.scale_factor
    stored_scale = float(state["scale_factor"])
    if not config.scale_by_std and stored_scale != config.scale_factor:
        raise SeedFormatError(
            f"{source}: 'scale_factor' is {stored_scale}, but {config.source} sets {config.scale_factor}"
        )
    return stored_scale


def build_seed_model(
    config: SeedConfig, state: Mapping[str, torch.Tensor], config_path: Path, checkpoint_path: Path
) -> SeedModel:
    """Check a loaded state dict against its config and build the models from it."""
    source = str(checkpoint_path)
    # Models are float32; `.float()` returns float32 tensors themselves, so nothing is copied.
    state = {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
    check_layout(config, state, source)
    scale_factor = check_schedule(config, state, source)
    return SeedModel(
        unet=build_unet(config.unet, state, source),
        vae=build_vq(config.vq, scale_factor, state, source),
        condition=build_condition(config.condition, state, source),
        betas=compvis_betas(config.schedule),
        scheduler_config=scheduler_config(config.schedule),
        scale_factor=scale_factor,
        config=config,
        config_path=config_path,
        checkpoint_path=checkpoint_path,
    )


def load_seed_checkpoint(folder: str | Path) -> SeedModel:
    """Load a seed release folder on the CPU in float32, in eval mode, without gradients."""
    folder = Path(folder)
    config_path = find_config(folder)
    config = read_seed_config(config_path)
    checkpoint_path = folder / CHECKPOINT_NAME
    return build_seed_model(config, read_state_dict(checkpoint_path), config_path, checkpoint_path)
