"""The patches an autoencoder learns from, split as everywhere else (pipeline/splits.py), and the
deterministic, resumable stream of training batches: batch ``s`` (its patches, crops and flips) is
a function of the run seed and ``s`` alone, so a run continued from a checkpoint at step ``s``
sees exactly the batches an uninterrupted run would have seen.

The patches are held in memory as uint8, every band they carry (256² RGB: 192 KiB each, so 10 000
patches take 1.9 GiB; R, G, B, NIR a third more).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset

from pipeline.errors import PipelineError
from pipeline.io.shard_stage import SHARD_GLOB
from pipeline.io.shards import decode_bands, image_field, iter_shard
from pipeline.splits import is_held_out
from pipeline.tiling.status import INPUTS_DIR, inputs_with_patches

_STEP_STREAM = 0xAE57


class NoPatchesError(PipelineError):
    """A split of a dataset that has no patches to train or to evaluate on."""


@dataclass(frozen=True)
class PatchSplit:
    """uint8 (N, C, H, W) patches and their keys: the ones trained on and the held-out ones."""

    train: torch.Tensor
    train_keys: tuple[str, ...]
    heldout: torch.Tensor
    heldout_keys: tuple[str, ...]


def read_patches(tiles_dir: str | Path, holdout_inputs: Sequence[str] = (), holdout_fraction: float = 0.0) -> PatchSplit:
    """Every patch of a tiled dataset (``OUT/tiles/<dataset>``), split into trained-on and held out:
    all patches of a held-out input, and the hash-chosen fraction of the others' keys."""
    tiles_dir = Path(tiles_dir)
    train, train_keys, heldout, heldout_keys = [], [], [], []
    for input_id in inputs_with_patches(tiles_dir):
        whole = input_id in holdout_inputs
        for shard in sorted((tiles_dir / INPUTS_DIR / input_id).glob(SHARD_GLOB)):
            for sample in iter_shard(shard):
                key = sample["__key__"]
                image = torch.from_numpy(decode_bands(sample[image_field(sample)])).permute(2, 0, 1).contiguous()
                if whole or is_held_out(key, holdout_fraction):
                    heldout.append(image), heldout_keys.append(key)
                else:
                    train.append(image), train_keys.append(key)
    for name, images in (("trained on", train), ("held out", heldout)):
        if not images:
            raise NoPatchesError(f"{tiles_dir}: no patches to be {name} (inputs held out: {list(holdout_inputs)}, "
                                 f"fraction {holdout_fraction}); the autoencoder needs both")
    shapes = {tuple(image.shape) for image in train + heldout}
    if len(shapes) != 1:
        raise PipelineError(f"{tiles_dir}: patches of different shapes {sorted(shapes)}")
    return PatchSplit(torch.stack(train), tuple(train_keys), torch.stack(heldout), tuple(heldout_keys))


def step_generator(seed: int, step: int, stream: int = _STEP_STREAM) -> torch.Generator:
    """A CPU generator fixed by (run seed, stream, step)."""
    words = np.random.SeedSequence([seed, stream, step]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int((int(words[0]) << 31) ^ int(words[1])))


def batch_for_step(patches: torch.Tensor, step: int, batch_size: int, crop: int | None, seed: int) -> torch.Tensor:
    """Batch ``step``: patches drawn with replacement, a random crop of each, random h/v flips;
    float32 in [-1, 1]."""
    generator = step_generator(seed, step)
    count, _, height, width = patches.shape
    crop = min(crop or height, height, width)
    picks = torch.randint(0, count, (batch_size,), generator=generator)
    tops = torch.randint(0, height - crop + 1, (batch_size,), generator=generator)
    lefts = torch.randint(0, width - crop + 1, (batch_size,), generator=generator)
    flips = torch.rand((batch_size, 2), generator=generator) < 0.5
    out = []
    for i in range(batch_size):
        image = patches[picks[i], :, tops[i]:tops[i] + crop, lefts[i]:lefts[i] + crop]
        dims = [d for d, flip in ((-1, flips[i, 0]), (-2, flips[i, 1])) if flip]
        out.append(image.flip(dims) if dims else image)
    return torch.stack(out).float() / 127.5 - 1.0


class PatchBatches(IterableDataset):
    """The endless batch stream from ``start_step`` on (one ordered stream: no loader workers)."""

    def __init__(self, patches: torch.Tensor, batch_size: int, crop: int | None, seed: int, start_step: int = 0):
        super().__init__()
        self.patches, self.batch_size, self.crop, self.seed = patches, batch_size, crop, seed
        self.start_step = start_step

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        step = self.start_step
        while True:
            yield {"images": batch_for_step(self.patches, step, self.batch_size, self.crop, self.seed),
                   "step": torch.tensor(step)}
            step += 1
