"""What the torch stages among the shard-to-shard stages (embeddings, latents) share: decoding
patch images in DataLoader workers, or (JPEG) in batches on the device that embeds them. The resumable per-shard loop itself is in
pipeline.io.shard_loop (no torch, so that the stain stage can run it in tiatoolbox's environment),
re-exported here for the stages that import it from here.
"""

from __future__ import annotations


from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from pipeline.errors import StageOutputError
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


class JpegPatches:
    """One shard's JPEG patches kept encoded, to be decoded a batch at a time on the device that
    embeds them with TorchCodec (nvJPEG on CUDA, libjpeg-turbo on a CPU): no decoding workers, and on a GPU the
    decode no longer bounds the encoder's pace."""

    def __init__(self, samples: Sequence[dict[str, Any]], source: str = "shard"):
        self.images = [sample[image_field(sample)] for sample in samples]
        self.source = source

    @staticmethod
    def holds_jpeg(samples: Sequence[dict[str, Any]]) -> bool:
        return bool(samples) and all(image_field(sample) == "jpg" for sample in samples)

    def __len__(self) -> int:
        return len(self.images)

    def batches(self, batch_size: int, device: torch.device) -> Iterator[torch.Tensor]:
        """uint8 [B, 3, H, W] on ``device``, in shard order."""
        from torchcodec.decoders import decode_jpeg  # torchvision's decoders are deprecated for it

        for start in range(0, len(self.images), batch_size):
            encoded = self.images[start:start + batch_size]
            try:
                decoded = decode_jpeg(list(encoded), mode="RGB", device=device)
            except RuntimeError as exc:
                raise StageOutputError(f"{self.source}: a JPEG patch among samples {start}-{start + len(encoded) - 1} "
                                       f"does not decode: {exc}") from exc
            yield torch.stack(decoded)
