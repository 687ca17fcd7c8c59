"""Train the first-stage autoencoder of a dataset on its tiled patches (never on the held-out
ones), then measure it on the held-out patches against the bicubic baseline and write the
diffusers folder and ``metrics.json`` (see :mod:`pipeline.autoencoder.outputs`).

A re-run with the same output folder continues from ``checkpoints/last.ckpt`` (weights, optimiser,
EMA, step; the batch stream restarts at the restored step), so a killed run ends with the weights
of an uninterrupted one (exactly on a CPU). Only ``max_steps``, ``checkpoint_every`` and
``log_every`` may change between the two.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader

from pipeline.autoencoder.data import PatchBatches, PatchSplit, read_patches
from pipeline.autoencoder.metrics import baseline_side, bicubic_metrics, latent_std, reconstruction_metrics
from pipeline.autoencoder.module import AutoencoderModule
from pipeline.autoencoder.outputs import (CHECKPOINT_DIR, LOGS_DIR, METRICS_FILE, MODEL_DIR, PROVENANCE_FILE,
                                          write_metrics)
from pipeline.autoencoder.settings import AutoencoderTrainSettings
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_dir
from pipeline.io.lightning_run import AtomicCheckpointIO, remove_stale_temporaries
from pipeline.io.precision import lightning_precision
from pipeline.models.autoencoder import weights_sha256

log = logging.getLogger(__name__)

LAST = "last.ckpt"
RESUMABLE_CHANGES = ("max_steps", "checkpoint_every", "log_every")


class BandsMismatchError(PipelineError):
    """Patches whose band count is not the autoencoder's channel count."""


class ResumeAutoencoderError(PipelineError):
    """A last.ckpt that this run cannot continue from; the message names the file and why."""


class _Batches(L.LightningDataModule):
    def __init__(self, patches: torch.Tensor, settings: AutoencoderTrainSettings) -> None:
        super().__init__()
        self.patches, self.settings = patches, settings

    def train_dataloader(self) -> DataLoader:
        # Called after a resumed run's loops are restored: global_step is the step to continue with.
        start = self.trainer.global_step if self.trainer is not None else 0
        s = self.settings
        return DataLoader(PatchBatches(self.patches, s.batch_size, s.crop_size, s.seed, start), batch_size=None,
                          num_workers=0)


def check_patches(split: PatchSplit, settings: AutoencoderTrainSettings, source: str) -> None:
    bands, height, width = split.train.shape[1:]
    if bands != settings.in_channels:
        raise BandsMismatchError(f"{source}: the patches have {bands} bands, but the autoencoder takes "
                                 f"{settings.in_channels} channels")
    f = settings.downsampling
    if height % f or width % f or (settings.crop_size and settings.crop_size % f):
        raise PipelineError(f"{source}: patches of {height}x{width} px (crops {settings.crop_size}) are not "
                            f"multiples of the downsampling factor {f}")


def _read_resume(path: Path, settings: AutoencoderTrainSettings) -> None:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
        before = saved["hyper_parameters"]["autoencoder_settings"]
    except Exception as exc:  # noqa: BLE001 - truncated or foreign file
        raise ResumeAutoencoderError(f"{path}: not an autoencoder checkpoint of this stage ({type(exc).__name__}: "
                                     f"{exc}); move it away to start over") from exc
    now = settings.to_dict()
    changed = {k: (before.get(k), v) for k, v in now.items() if k not in RESUMABLE_CHANGES and before.get(k) != v}
    if changed:
        raise ResumeAutoencoderError(f"{path}: the run was started with other settings (saved, now): {changed}; "
                                     "use a new output folder")


def build_trainer(settings: AutoencoderTrainSettings, out_dir: Path, callbacks: Sequence[Callback] = (),
                  **overrides: Any) -> L.Trainer:
    checkpoints = ModelCheckpoint(dirpath=out_dir / CHECKPOINT_DIR, filename="step-{step:06d}",
                                  auto_insert_metric_name=False, every_n_train_steps=settings.checkpoint_every,
                                  save_top_k=-1, save_last=True)
    options: dict[str, Any] = {
        "default_root_dir": str(out_dir), "max_steps": settings.max_steps, "max_epochs": -1,
        "accelerator": settings.accelerator, "devices": 1,
        "precision": lightning_precision(settings.precision, settings.accelerator),
        "plugins": [AtomicCheckpointIO()], "callbacks": [checkpoints, *callbacks],
        "logger": CSVLogger(str(out_dir), name=LOGS_DIR), "log_every_n_steps": settings.log_every,
        "limit_val_batches": 0, "num_sanity_val_steps": 0, "enable_model_summary": False,
        "enable_progress_bar": False,
    }
    options.update(overrides)
    return L.Trainer(**options)


def fit(settings: AutoencoderTrainSettings, split: PatchSplit, out_dir: str | Path,
        callbacks: Sequence[Callback] = (), **trainer_overrides: Any) -> AutoencoderModule:
    """Train (or continue) to ``max_steps``; ``checkpoints/last.ckpt`` holds the final state."""
    out_dir = Path(out_dir)
    checkpoint_dir = out_dir / CHECKPOINT_DIR
    remove_stale_temporaries(checkpoint_dir)
    resume = checkpoint_dir / LAST
    if resume.is_file():
        _read_resume(resume, settings)
    module = AutoencoderModule(settings, int(split.train.shape[-1]))
    trainer = build_trainer(settings, out_dir, callbacks, **trainer_overrides)
    trainer.fit(module, datamodule=_Batches(split.train, settings),
                ckpt_path=str(resume) if resume.is_file() else None, weights_only=False)
    trainer.save_checkpoint(resume, weights_only=False)
    return module


def with_unit_latents(model: torch.nn.Module, images: torch.Tensor, batch_size: int) -> torch.nn.Module:
    """The model with scaling_factor = 1 / std of its latents on ``images`` (unit-variance latents)."""
    model.register_to_config(scaling_factor=1.0)
    model.register_to_config(scaling_factor=1.0 / max(latent_std(model, images, batch_size), 1e-6))
    return model


def train_autoencoder(tiles_dir: str | Path, out_dir: str | Path, settings: AutoencoderTrainSettings, *,
                      dataset: str, holdout_inputs: Sequence[str] = (), holdout_fraction: float = 0.0,
                      callbacks: Sequence[Callback] = (), **trainer_overrides: Any) -> dict[str, Any]:
    """The whole stage: split, train, measure, write ``model/`` then ``metrics.json``. Returns the metrics."""
    out_dir = Path(out_dir)
    split = read_patches(tiles_dir, holdout_inputs, holdout_fraction)
    check_patches(split, settings, str(tiles_dir))
    module = fit(settings, split, out_dir, callbacks, **trainer_overrides)
    device = next(module.parameters()).device
    batch = settings.batch_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        untrained = settings.build_model(int(split.train.shape[-1])).to(device).eval()
    model = module.export_model().eval()
    with_unit_latents(untrained, split.train, batch)
    with_unit_latents(model, split.train, batch)
    heldout = split.heldout
    f, c, bands = settings.downsampling, settings.latent_channels, settings.in_channels
    side = baseline_side(int(heldout.shape[-2]), f, c, bands)
    record: dict[str, Any] = {
        "dataset": dataset, "kind": settings.kind, "steps": settings.max_steps,
        "train_patches": len(split.train_keys), "heldout_patches": len(split.heldout_keys),
        **reconstruction_metrics(model, heldout, batch, "ae"),
        **reconstruction_metrics(untrained, heldout, batch, "untrained"),
        **bicubic_metrics(heldout, side),
        "bicubic_side": side,
        "latent_shape": [c, int(heldout.shape[-2]) // f, int(heldout.shape[-1]) // f],
        "scaling_factor": float(model.config.scaling_factor),
        "ema": settings.ema_decay is not None,
        "measured_on": "held-out patches (pipeline/splits.py): whole held-out inputs and the key-hash fraction",
    }
    record["beats_bicubic"] = record["psnr_ae"] > record["psnr_bicubic"]
    provenance = {"dataset": dataset, "steps": settings.max_steps, "seed": settings.seed,
                  "settings": settings.to_dict(), "weights_sha256": weights_sha256(model),
                  "heldout_psnr": record["psnr_ae"], "metrics": METRICS_FILE}
    with atomic_dir(out_dir / MODEL_DIR) as temp:
        model.cpu().save_pretrained(temp, safe_serialization=True)
        (temp / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2, sort_keys=True))
    write_metrics(out_dir, record)
    return record
