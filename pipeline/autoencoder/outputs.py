"""What the autoencoder stage writes in ``OUT/autoencoder/<dataset>/`` (docs/data_contract.md,
"Stage 2b"), and its readers:

- ``model/``: the trained autoencoder as a diffusers folder (``config.json`` +
  ``diffusion_pytorch_model.safetensors``, from ``save_pretrained``) with ``provenance.json``
  (dataset, steps, seed, settings, weights hash): what the latents stage loads for
  ``latents.autoencoder: {kind: trained, ...}``;
- ``metrics.json``: held-out reconstruction PSNR/SSIM of the trained model, of the same model
  untrained and of the bicubic baseline at the same latent size, with the patch counts; written
  last, so it marks a finished stage;
- ``checkpoints/`` (``last.ckpt``, ``step-NNNNNN.ckpt``) and ``logs/version_K/metrics.csv``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import StageOutputError
from pipeline.io.atomic import write_text_atomic
from pipeline.io.stage_files import read_json_file

MODEL_DIR = "model"
METRICS_FILE = "metrics.json"
CHECKPOINT_DIR = "checkpoints"
LOGS_DIR = "logs"
# Also read by pipeline.models.autoencoder (the loader), which names it on its own.
PROVENANCE_FILE = "provenance.json"


@dataclass(frozen=True)
class AutoencoderMetrics:
    """Held-out reconstruction figures (PSNR in dB, SSIM in [0, 1]) and what they were measured on."""

    dataset: str
    kind: str
    steps: int
    train_patches: int
    heldout_patches: int
    psnr_ae: float
    ssim_ae: float
    psnr_untrained: float
    ssim_untrained: float
    psnr_bicubic: float
    ssim_bicubic: float
    bicubic_side: int  # side of the baseline's small image
    latent_shape: tuple[int, int, int]  # (channels, h, w) per patch
    scaling_factor: float
    beats_bicubic: bool  # psnr_ae > psnr_bicubic


def write_metrics(folder: str | Path, record: dict[str, Any]) -> None:
    write_text_atomic(Path(folder) / METRICS_FILE, json.dumps(record, indent=2, sort_keys=True))


def read_autoencoder_metrics(folder: str | Path) -> AutoencoderMetrics:
    """The stage's metrics.json (``folder``: ``OUT/autoencoder/<dataset>``)."""
    path = Path(folder) / METRICS_FILE
    record = read_json_file(path)
    try:
        return AutoencoderMetrics(
            dataset=str(record["dataset"]), kind=str(record["kind"]), steps=int(record["steps"]),
            train_patches=int(record["train_patches"]), heldout_patches=int(record["heldout_patches"]),
            **{k: float(record[k]) for k in ("psnr_ae", "ssim_ae", "psnr_untrained", "ssim_untrained",
                                              "psnr_bicubic", "ssim_bicubic", "scaling_factor")},
            bicubic_side=int(record["bicubic_side"]), latent_shape=tuple(int(v) for v in record["latent_shape"]),
            beats_bicubic=bool(record["beats_bicubic"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise StageOutputError(f"{path}: not an autoencoder metrics record: {exc!r}") from exc


def trained_model_dir(folder: str | Path) -> Path:
    """The diffusers folder of a finished stage; StageOutputError while it is unfinished."""
    folder = Path(folder)
    if not (folder / METRICS_FILE).is_file() or not (folder / MODEL_DIR / "config.json").is_file():
        raise StageOutputError(f"{folder}: no trained autoencoder (no {METRICS_FILE} and {MODEL_DIR}/config.json); "
                               "run the autoencoder stage first")
    return folder / MODEL_DIR
