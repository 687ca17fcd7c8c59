"""Stage 2: embed every tiled patch with one or more SSL encoders.

For each input, every tiling shard ``patches-NNNNNN.tar`` becomes an embedding shard of the
same name whose samples keep the key, the image bytes and the json of the tiling stage, plus
one ``<encoder>.npy`` (float16 vector) per encoder. Each output shard is written atomically and
a finished one is never recomputed, so a killed run resumes where it stopped. The input's
``manifest.parquet`` is written last and marks the input as complete.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from pipeline.embedding.outputs import WEIGHTS_HASH
from pipeline.io.device import resolve_device
from pipeline.io.shard_stage import JpegPatches, PatchImages, process_shards
from pipeline.io.shards import encode_json, encode_npy, image_field, read_shard, write_shard

@dataclass(frozen=True)
class EmbeddingSettings:
    """The config's `embedding:` table."""

    batch_size: int = 64
    num_workers: int = 2
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # JPEG patches: workers (PIL in DataLoader workers) | device (batched TorchCodec decode on the
    # embedding device: nvJPEG on CUDA) | auto (device on CUDA, workers on a CPU). Others: workers.
    decode: str = "auto"

    def torch_device(self) -> torch.device:
        return resolve_device(self.device)

    def decodes_on_device(self) -> bool:
        return self.decode == "device" or (self.decode == "auto" and self.torch_device().type == "cuda")


def _device_batches(images: Dataset | JpegPatches, settings: EmbeddingSettings,
                    device: torch.device) -> Iterator[torch.Tensor]:
    if isinstance(images, JpegPatches):
        yield from images.batches(settings.batch_size, device)
        return
    loader = DataLoader(images, batch_size=settings.batch_size, num_workers=settings.num_workers,
                        pin_memory=device.type == "cuda", persistent_workers=False)
    for batch in loader:
        yield batch.to(device, non_blocking=True)


@torch.inference_mode()
def embed_images(encoders: Sequence[Any], images: Dataset | JpegPatches, settings: EmbeddingSettings,
                 progress: tqdm | None = None) -> dict[str, np.ndarray]:
    """Embeddings [N, D] (float16) of every image for every encoder, in dataset order."""
    device = settings.torch_device()
    outputs: dict[str, list[np.ndarray]] = {e.spec.name: [] for e in encoders}
    # bf16 on GPU (the published encoders are run this way for extraction); full fp32 on CPU.
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for batch in _device_batches(images, settings, device):
        with autocast:
            for encoder in encoders:
                vectors = encoder(encoder.preprocess(batch)).float()
                outputs[encoder.spec.name].append(vectors.cpu().numpy().astype(np.float16))
        if progress is not None:
            progress.update(len(batch))
    return {name: np.concatenate(parts) if parts else np.zeros((0, 0), np.float16)
            for name, parts in outputs.items()}


def embed_shard(source: Path, target: Path, encoders: Sequence[Any], settings: EmbeddingSettings,
                progress: tqdm | None = None) -> int:
    """Embed one tiling shard into ``target`` (atomic). Returns the number of samples."""
    samples = read_shard(source)
    on_device = settings.decodes_on_device() and JpegPatches.holds_jpeg(samples)
    images = JpegPatches(samples, str(source)) if on_device else PatchImages(samples)
    vectors = embed_images(encoders, images, settings, progress)
    records = {e.spec.name: e.record() for e in encoders}
    out = []
    for index, sample in enumerate(samples):
        meta = json.loads(sample["json"])
        meta["encoders"] = {**meta.get("encoders", {}), **records}
        fields = {"__key__": sample["__key__"], image_field(sample): sample[image_field(sample)],
                  "json": encode_json(meta)}
        for name in records:
            fields[f"{name}.npy"] = encode_npy(vectors[name][index])
        out.append(fields)
    write_shard(target, out)
    return len(out)


def embed_input(tile_dir: str | Path, out_dir: str | Path, encoders: Sequence[Any],
                settings: EmbeddingSettings) -> pd.DataFrame:
    """Embed every shard of one tiled input; skip shards already finished; write the manifest last."""

    def embed(source: Path, target: Path, progress: tqdm) -> int:
        return embed_shard(source, target, encoders, settings, progress)

    def add_hashes(manifest: pd.DataFrame) -> pd.DataFrame:
        for encoder in encoders:
            manifest[f"{encoder.spec.name}_spec_sha256"] = encoder.spec_hash
            manifest[f"{encoder.spec.name}{WEIGHTS_HASH}"] = encoder.weights_sha256
        return manifest

    return process_shards(tile_dir, out_dir, embed, add_hashes)
