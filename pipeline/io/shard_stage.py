"""What the torch stages among the shard-to-shard stages (embeddings, latents) share: decoding
patch images in DataLoader workers. The resumable per-shard loop itself is in
pipeline.io.shard_loop (no torch, so that the stain stage can run it in tiatoolbox's environment),
re-exported here for the stages that import it from here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from pipeline.io.shard_loop import SHARD_GLOB, process_shards  # noqa: F401 (re-exported)
from pipeline.io.shards import decode_bands, decode_image, image_field


class PatchImages(Dataset):
    """Decodes the images of one shard's samples (in DataLoader workers) into uint8 CHW tensors: RGB
    (the encoders' input), or with ``all_bands`` every band the patches carry (the autoencoder's)."""

    def __init__(self, samples: Sequence[dict[str, Any]], all_bands: bool = False):
        self.images = [sample[image_field(sample)] for sample in samples]
        self.decode = decode_bands if all_bands else decode_image

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(self.decode(self.images[index])).permute(2, 0, 1).contiguous()
