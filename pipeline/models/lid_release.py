"""Load a LID release folder (`configs/*-project.yaml` + `checkpoints/last.ckpt`) into the
pipeline's one model type, `RLDiffPipeline` (diffusers UNet, VQModel, condition stage, scheduler)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from diffusers import DDPMScheduler

from pipeline.models.compvis_layout import checkpoint_layout
from pipeline.models.convert import build_condition, build_unet, build_vq
from pipeline.models.diffusion_pipeline import PIPELINE_FORMAT, RLDiffPipeline
from pipeline.models.errors import LidFormatError
from pipeline.models.lid_config import LidConfig, read_lid_config
from pipeline.models.lightning_checkpoint import load_lightning_checkpoint
from pipeline.models.presets import compvis_betas, scheduler_config

CHECKPOINT_NAME = Path("checkpoints") / "last.ckpt"
CONFIG_GLOB = "configs/*-project.yaml"


def find_config(folder: Path) -> Path:
    """The folder's project config; Lightning writes one per (re)start, so the newest name wins."""
    configs = sorted(folder.glob(CONFIG_GLOB))
    if not configs:
        raise LidFormatError(f"{folder}: no {CONFIG_GLOB} (not a LID release folder)")
    return configs[-1]


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The `state_dict` of a Lightning checkpoint, loaded without unpickling arbitrary objects.

    Lightning 1.x files (LID's releases) are read by `load_lightning_checkpoint`; everything
    but `state_dict` (optimizer, schedulers, callbacks) is ignored.
    """
    if not path.is_file():
        raise LidFormatError(f"{path}: checkpoint not found")
    checkpoint = load_lightning_checkpoint(path)
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise LidFormatError(f"{path}: not a Lightning checkpoint (no 'state_dict' mapping)")
    state = checkpoint["state_dict"]
    not_tensors = sorted(str(key) for key, value in state.items() if not isinstance(value, torch.Tensor))
    if not_tensors:
        raise LidFormatError(f"{path}: state_dict entries that are not tensors: {not_tensors[:10]}")
    return dict(state)


def check_layout(config: LidConfig, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Every key the config implies is present with its shape, and nothing else is."""
    required, optional = checkpoint_layout(config)
    missing = sorted(set(required) - set(state))
    unexpected = sorted(set(state) - set(required) - set(optional))
    if missing or unexpected:
        raise LidFormatError(
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
        raise LidFormatError(f"{source}: tensors with the wrong shape for {config.source}: {wrong}")


def check_schedule(config: LidConfig, state: Mapping[str, torch.Tensor], source: str) -> float:
    """Compare the stored schedule with the config's; returns the latent scale factor to use."""
    betas = compvis_betas(config.schedule)
    stored = state["betas"].double().numpy()
    # CompVis computes in float64 and stores float32: allow float32 rounding, nothing more.
    if not np.allclose(stored, betas, rtol=1e-6, atol=0):
        worst = float(np.max(np.abs(stored - betas)))
        raise LidFormatError(f"{source}: 'betas' differ from the schedule in {config.source} (max abs {worst:.3g})")
    if "alphas_cumprod" in state:
        expected = np.cumprod(1.0 - betas)
        if not np.allclose(state["alphas_cumprod"].double().numpy(), expected, rtol=1e-5, atol=0):
            raise LidFormatError(f"{source}: 'alphas_cumprod' is not cumprod(1 - betas) of {config.source}")
    if "scale_factor" not in state:
        return config.scale_factor
    stored_scale = float(state["scale_factor"])
    if not config.scale_by_std and stored_scale != config.scale_factor:
        raise LidFormatError(
            f"{source}: 'scale_factor' is {stored_scale}, but {config.source} sets {config.scale_factor}"
        )
    return stored_scale


def build_lid_release(
    config: LidConfig, state: Mapping[str, torch.Tensor], config_path: Path, checkpoint_path: Path
) -> RLDiffPipeline:
    """Check a loaded state dict against its config and build the pipeline from it."""
    source = str(checkpoint_path)
    # Models are float32; `.float()` returns float32 tensors themselves, so nothing is copied.
    state = {key: value.float() if value.is_floating_point() else value for key, value in state.items()}
    check_layout(config, state, source)
    scale_factor = check_schedule(config, state, source)
    vae = build_vq(config.vq, scale_factor, state, source)
    # LID's float64 betas as the scheduler's own (diffusers would recompute them in float32).
    scheduler = DDPMScheduler.from_config(
        {**scheduler_config(config.schedule), "trained_betas": compvis_betas(config.schedule).tolist()})
    autoencoder = {"kind": "vq", "class": "VQModel", "source": source, "random_weights": False,
                   "scaling_factor": scale_factor}
    provenance = {"format": PIPELINE_FORMAT, "lid_release": {"config": str(config_path), "checkpoint": source},
                  "autoencoder": autoencoder, "random_weights": []}
    return RLDiffPipeline(unet=build_unet(config.unet, state, source), vae=vae,
                          condition=build_condition(config.condition, state, source), scheduler=scheduler,
                          provenance=provenance)


def load_lid_release(folder: str | Path) -> RLDiffPipeline:
    """Load a LID release folder on the CPU in float32, in eval mode, without gradients."""
    folder = Path(folder)
    config_path = find_config(folder)
    config = read_lid_config(config_path)
    checkpoint_path = folder / CHECKPOINT_NAME
    return build_lid_release(config, read_state_dict(checkpoint_path), config_path, checkpoint_path)
