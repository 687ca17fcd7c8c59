"""Stage 3: encode every embedded patch into the first-stage latent space, once.

For each input, every embedding shard ``patches-NNNNNN.tar`` becomes a latent shard of the same
name whose samples keep the key, order and every member of the embedding shard (image, json,
``<encoder>.npy``) and add float16 latents ``[C, H/f, W/f]`` (3x64x64 for VQ-f4 on 256² patches):

- ``latent.npy``: the patch as is;
- with ``flips="all"`` (the default) also ``latent_hflip.npy``, ``latent_vflip.npy`` and
  ``latent_hvflip.npy``: the encodings of the horizontally, vertically and doubly flipped patch.

LID trains with random horizontal and vertical flips of the *image* before encoding. A
convolutional encoder is not exactly flip-equivariant (``E(flip(x)) != flip(E(x))``), so flipping a
stored latent is only an approximation of that augmentation; storing all four encodings keeps it
exact for any autoencoder at 4x the (small) latent storage. :func:`flip_equivariance_error`
measures the approximation for a given autoencoder, for deciding whether ``flips="none"`` plus
latent flipping at training time is good enough.

The sample json gains a ``latents`` record (autoencoder kind, source, weights hash, random or not,
scaling factor, the latent fields). Each output shard is written atomically and a finished one is
never recomputed, so a killed run resumes where it stopped; ``manifest.parquet`` is written last.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.errors import PipelineError
from pipeline.io.device import resolve_device
from pipeline.io.precision import autocast
from pipeline.io.shard_stage import PatchImages, process_shards
from pipeline.io.shards import encode_json, encode_npy, read_shard, write_shard
from pipeline.models.autoencoder import Autoencoder, AutoencoderSettings

LATENT_FIELD = "latent.npy"
# Name suffix -> tensor dims flipped (on images (B, C, H, W) and latents alike).
FLIPS: dict[str, tuple[int, ...]] = {"": (), "hflip": (-1,), "vflip": (-2,), "hvflip": (-2, -1)}
FLIP_MODES = {"all": tuple(FLIPS), "none": ("",)}


def latent_field(flip: str) -> str:
    return f"latent_{flip}.npy" if flip else LATENT_FIELD


def apply_flip(tensor: torch.Tensor, flip: str) -> torch.Tensor:
    dims = FLIPS[flip]
    return tensor.flip(dims) if dims else tensor


@dataclass(frozen=True)
class EncodeSettings:
    """The config's `latents:` table: the autoencoder, and how the stage runs."""

    autoencoder: AutoencoderSettings = AutoencoderSettings()
    batch_size: int = 32
    num_workers: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # bfloat16 autocast on CUDA, float32 on a CPU
    flips: str = "all"  # all | none

    def __post_init__(self) -> None:
        if self.flips not in FLIP_MODES:
            raise ValueError(f"flips must be one of {sorted(FLIP_MODES)}, got {self.flips!r}")

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1], as LID feeds its first stage."""
    return images_uint8.float() / 127.5 - 1.0


@torch.inference_mode()
def encode_images(autoencoder: Autoencoder, images: Dataset, settings: EncodeSettings) -> dict[str, np.ndarray]:
    """Latents [N, C, h, w] (float16) of every image, per flip name, in dataset order."""
    device = settings.torch_device()
    autoencoder.to(device)
    loader = DataLoader(images, batch_size=settings.batch_size, num_workers=settings.num_workers,
                        pin_memory=device.type == "cuda")
    flips = FLIP_MODES[settings.flips]
    parts: dict[str, list[np.ndarray]] = {flip: [] for flip in flips}
    for batch in loader:
        batch = to_model_range(batch.to(device, non_blocking=True))
        for flip in flips:
            with autocast(settings.precision, device):
                latents = autoencoder.encode(apply_flip(batch, flip))
            if not torch.isfinite(latents).all():
                raise FloatingPointError("the autoencoder produced non-finite latents")
            parts[flip].append(latents.cpu().numpy().astype(np.float16))
    return {flip: np.concatenate(p) for flip, p in parts.items() if p}


def latent_record(autoencoder: Autoencoder, settings: EncodeSettings) -> dict[str, Any]:
    return {**autoencoder.record(), "fields": [latent_field(f) for f in FLIP_MODES[settings.flips]]}


class BandsMismatchError(PipelineError):
    """Patches whose band count is not the autoencoder's input channel count."""


def check_bands(images: PatchImages, autoencoder: Autoencoder, source: Path) -> None:
    bands = int(images[0].shape[0])
    if bands != autoencoder.in_channels:
        raise BandsMismatchError(f"{source}: the patches have {bands} bands, but the autoencoder ({autoencoder.source}) "
                                 f"takes {autoencoder.in_channels} channels")


def encode_shard(source: Path, target: Path, autoencoder: Autoencoder, settings: EncodeSettings,
                 progress: tqdm | None = None) -> int:
    """Encode one embedding shard into ``target`` (atomic). Returns the number of samples."""
    samples = read_shard(source)
    if samples:
        check_bands(PatchImages(samples, all_bands=True), autoencoder, source)
    latents = encode_images(autoencoder, PatchImages(samples, all_bands=True), settings) if samples else {}
    record = latent_record(autoencoder, settings)
    out = []
    for index, sample in enumerate(samples):
        fields = dict(sample)  # every member of the embedding shard, bytes unchanged ...
        meta = json.loads(sample["json"])
        meta["latents"] = record  # ... except the json, which records how the latents were made
        fields["json"] = encode_json(meta)
        for flip, array in latents.items():
            fields[latent_field(flip)] = encode_npy(array[index])
        out.append(fields)
    write_shard(target, out)
    if progress is not None:
        progress.update(len(out))
    return len(out)


def encode_input(embed_dir: str | Path, out_dir: str | Path, autoencoder: Autoencoder,
                 settings: EncodeSettings = EncodeSettings()) -> pd.DataFrame:
    """Encode every shard of one embedded input; skip shards already finished; manifest last.

    A shard counts as finished when its output file exists: outputs are only ever renamed into
    place once complete. (Changing the autoencoder means a new output folder, not a re-run.)
    """
    record = latent_record(autoencoder, settings)

    def encode(source: Path, target: Path, progress: tqdm) -> int:
        return encode_shard(source, target, autoencoder, settings, progress)

    def add_record(manifest: pd.DataFrame) -> pd.DataFrame:
        manifest["latent_autoencoder"] = record["kind"]
        manifest["latent_weights_sha256"] = record["weights_sha256"]
        manifest["latent_random_weights"] = record["random_weights"]
        manifest["latent_fields"] = ",".join(record["fields"])
        return manifest

    return process_shards(embed_dir, out_dir, encode, add_record)


@torch.inference_mode()
def flip_equivariance_error(autoencoder: Autoencoder, images_uint8: torch.Tensor) -> dict[str, float]:
    """How far flipping a latent is from encoding the flipped image, per flip.

    Returns, for each of hflip/vflip/hvflip, ``||E(flip(x)) - flip(E(x))|| / ||E(x)||`` over the batch
    (relative L2), and the same for the quantised latents the decoder sees (VQ only: fraction of
    latent pixels whose nearest code differs, ``*_code_mismatch``).
    """
    images = to_model_range(images_uint8.to(autoencoder.device))
    base = autoencoder.encode(images)
    result: dict[str, float] = {}
    for flip in ("hflip", "vflip", "hvflip"):
        direct = autoencoder.encode(apply_flip(images, flip))
        flipped = apply_flip(base, flip)
        result[flip] = float((direct - flipped).norm() / base.norm())
        if autoencoder.kind == "vq":
            from pipeline.models.first_stage import quantize

            scale = autoencoder.scaling_factor
            same = (quantize(autoencoder.model, direct / scale) == quantize(autoencoder.model, flipped / scale)).all(1)
            result[f"{flip}_code_mismatch"] = float(1.0 - same.float().mean())
    return result
