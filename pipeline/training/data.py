"""Streaming latent shards -> training batches, resumable to the exact batch.

Shards are the latent stage's WebDataset tars (``<key>.latent*.npy`` + ``<key>.<encoder>.npy``).
Each rank reads its own endless stream, built in *blocks*:

1. Split by node: with at least as many shards as ranks (``world_size``), rank r gets every
   world_size-th shard (disjoint subsets). With fewer shards than ranks, a strided split would
   leave some ranks without data, so every rank gets all shards instead (its own random stream
   keeps the ranks' batches different) and a warning says so.
2. Resampled: block b of rank r draws ``shards_per_block`` of its shards with replacement,
   weighted by their sample counts (each sample equally likely, whatever its shard's size), from
   a generator seeded by (seed, rank, b). The block's samples are shuffled together and each gets
   its flip variant from the same generator.
3. Batch number s of the rank is samples [s*B, (s+1)*B) of the concatenated blocks.

Everything random is a function of (seed, rank, block) or (seed, rank, step): the diffusion noise,
the timesteps and the classifier-free-guidance dropout mask of batch s come from a generator
seeded by (seed, rank, s). Resuming at step s therefore skips whole blocks by arithmetic on the
shard sample counts (no reading) and produces exactly the batches an uninterrupted run would.
This needs one ordered stream per rank (loader workers: 0 or 1); loading precomputed latents is
cheap enough for that.
"""

from __future__ import annotations

import tarfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline.errors import PipelineError
from pipeline.io.shard_stage import SHARD_GLOB
from pipeline.io.shards import decode_npy, iter_shard
from pipeline.splits import is_held_out
from pipeline.training.config import TrainConfig

LATENT_FIELDS = ("latent.npy", "latent_hflip.npy", "latent_vflip.npy", "latent_hvflip.npy")
# numpy axes of a [C, H, W] latent flipped for each stored variant (for augment="latent").
VARIANT_AXES: tuple[tuple[int, ...], ...] = ((), (2,), (1,), (1, 2))


class EmbeddingWidthError(PipelineError):
    """Embeddings in a shard do not have the width the condition stage was built for."""


class ShardContentError(PipelineError):
    """A shard lacks a field training needs, or holds one of the wrong shape."""


@dataclass(frozen=True)
class ShardInfo:
    path: str
    count: int


def tar_sample_count(path: str | Path, holdout_fraction: float = 0.0) -> int:
    """Number of training samples (distinct keys not held out) in a tar shard, from its headers only."""
    keys = set()
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                keys.add(member.name.split(".", 1)[0])
    return sum(not is_held_out(key, holdout_fraction) for key in keys)


def find_latent_shards(paths: Sequence[str | Path], holdout_fraction: float = 0.0) -> list[ShardInfo]:
    """Latent shards under each path, with their training-sample counts, in a fixed (sorted) order.

    A path may be a shard, an input folder holding ``patches-*.tar`` (its ``manifest.parquet``, if
    present, gives the counts), or a dataset folder with ``inputs/<input_id>/`` below it. Samples
    held out by key (``holdout_fraction``, see pipeline.splits) are not counted.
    """
    found: list[ShardInfo] = []
    for path in map(Path, paths):
        if path.is_file():
            found.append(ShardInfo(str(path), tar_sample_count(path, holdout_fraction)))
            continue
        folders = [path] if any(path.glob(SHARD_GLOB)) else sorted(p for p in (path / "inputs").glob("*") if p.is_dir())
        for folder in folders:
            shards = sorted(folder.glob(SHARD_GLOB))
            manifest = folder / "manifest.parquet"
            counts: dict[str, int] = {}
            if manifest.is_file():
                frame = pd.read_parquet(manifest, columns=["key", "shard"])
                frame = frame[[not is_held_out(k, holdout_fraction) for k in frame["key"]]]
                counts = frame["shard"].map(lambda s: Path(s).name).value_counts().to_dict()
            for shard in shards:
                # A shard whose samples are all held out is absent from the filtered counts.
                count = counts.get(shard.name, 0) if manifest.is_file() else tar_sample_count(shard, holdout_fraction)
                found.append(ShardInfo(str(shard), int(count)))
    found = sorted({s.path: s for s in found}.values(), key=lambda s: s.path)
    if not found or sum(s.count for s in found) == 0:
        raise FileNotFoundError(f"no latent samples found under {[str(p) for p in paths]}")
    return found


def shards_for_rank(shards: Sequence[ShardInfo], rank: int, world_size: int) -> list[ShardInfo]:
    """The shards one rank streams from (see the module docstring, point 1)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    usable = [s for s in shards if s.count > 0]
    if not usable:
        raise ValueError("no shard holds any sample")
    if len(usable) < world_size:
        warnings.warn(
            f"{len(usable)} latent shards for {world_size} ranks: every rank samples from all shards "
            "(no split by node); batches differ between ranks but may repeat samples across them",
            stacklevel=2,
        )
        return list(usable)
    return list(usable[rank::world_size])


def _seed_int(*words: int) -> int:
    """A 63-bit seed from integers (numpy's SeedSequence mixes them; order matters)."""
    state = np.random.SeedSequence([int(w) for w in words]).generate_state(2, dtype=np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


# Distinct streams derived from the run seed.
_BLOCK_STREAM, _STEP_STREAM = 0xB10C, 0x57E9


def step_randomness(seed: int, rank: int, step: int, batch_size: int, latent_shape: Sequence[int],
                    num_timesteps: int, cfg_dropout: float) -> dict[str, torch.Tensor]:
    """Noise, timesteps and condition-dropout mask of batch ``step`` on ``rank`` (CPU, float32)."""
    generator = torch.Generator().manual_seed(_seed_int(seed, _STEP_STREAM, rank, step))
    noise = torch.randn((batch_size, *latent_shape), generator=generator)
    timesteps = torch.randint(0, num_timesteps, (batch_size,), generator=generator)
    drop = torch.rand(batch_size, generator=generator) < cfg_dropout
    return {"noise": noise, "timesteps": timesteps, "drop": drop}


def embedding_field(embedding_key: str) -> str:
    return f"{embedding_key}.npy"


def check_sample(sample: dict[str, Any], shard: str, config: TrainConfig) -> None:
    """The sample has the embedding (of the configured width) and the latents training needs."""
    key = sample.get("__key__", "?")
    field = embedding_field(config.embedding_key)
    if field not in sample:
        available = sorted(k for k in sample if k.endswith(".npy") and not k.startswith("latent"))
        raise ShardContentError(f"{shard}: sample {key!r} has no embedding '{field}' (embeddings present: "
                                f"{available}); set embedding_key to one of them")
    width = decode_npy(sample[field]).reshape(-1).shape[0]
    if width != config.patch_embed_dim:
        raise EmbeddingWidthError(
            f"{shard}: sample {key!r}: embedding '{config.embedding_key}' is {width}-d, but the condition "
            f"stage expects {config.patch_embed_dim}-d embeddings (patch_embed_dim). Use the encoder the "
            f"model was built for, or set patch_embed_dim to {width} for a new model."
        )
    needed = LATENT_FIELDS if config.augment == "stored" else LATENT_FIELDS[:1]
    missing = [f for f in needed if f not in sample]
    if missing:
        hint = ""
        if config.augment == "stored":
            hint = " (encode with flips='all', or train with augment='latent' or 'none')"
        raise ShardContentError(f"{shard}: sample {key!r} lacks {missing}{hint}")
    shape = decode_npy(sample[LATENT_FIELDS[0]]).shape
    if len(shape) != 3 or shape[0] != config.latent_channels:
        raise ShardContentError(f"{shard}: sample {key!r}: latent shape {shape}, expected "
                                f"[{config.latent_channels}, H, W] (latent_channels)")
    if tuple(shape[1:]) != (config.latent_size, config.latent_size):
        raise ShardContentError(f"{shard}: sample {key!r}: latents of {shape[1]}x{shape[2]}, but the UNet is built for "
                                f"latent_size {config.latent_size}; set training.latent_size: {shape[1]} (or use an "
                                "autoencoder whose downsampling gives that size)")


def first_sample(path: str) -> dict[str, Any]:
    for sample in iter_shard(path):
        return sample
    raise ShardContentError(f"{path}: empty shard")


def check_shards(shards: Sequence[ShardInfo], config: TrainConfig) -> None:
    """Fail before training starts: the first sample of the first shard of every folder."""
    seen: set[str] = set()
    for shard in shards:
        folder = str(Path(shard.path).parent)
        if folder in seen or shard.count == 0:
            continue
        seen.add(folder)
        check_sample(first_sample(shard.path), shard.path, config)


class LatentBatches(IterableDataset):
    """One rank's endless, resumable stream of training batches (see the module docstring)."""

    def __init__(self, shards: Sequence[ShardInfo], config: TrainConfig, rank: int = 0, world_size: int = 1,
                 start_step: int = 0) -> None:
        super().__init__()
        self.config = config
        self.rank, self.world_size, self.start_step = rank, world_size, start_step
        self.shards = shards_for_rank(shards, rank, world_size)
        counts = np.array([s.count for s in self.shards], dtype=np.float64)
        self.counts = counts.astype(np.int64)
        self.weights = counts / counts.sum()

    # --- blocks ---------------------------------------------------------------------------------
    def _block_rng(self, block: int) -> np.random.Generator:
        return np.random.default_rng(_seed_int(self.config.seed, _BLOCK_STREAM, self.rank, block))

    def _block_picks(self, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(len(self.shards), size=self.config.shards_per_block, replace=True, p=self.weights)

    def locate(self, sample_index: int) -> tuple[int, int]:
        """(block, offset in block) of the rank's sample number ``sample_index``, without reading."""
        block, start = 0, 0
        while True:
            size = int(self.counts[self._block_picks(self._block_rng(block))].sum())
            if start + size > sample_index:
                return block, sample_index - start
            start += size
            block += 1

    def _read_shard(self, index: int) -> list[dict[str, Any]]:
        shard = self.shards[index]
        holdout = self.config.holdout_fraction
        samples = [s for s in iter_shard(shard.path) if not is_held_out(s["__key__"], holdout)]
        if len(samples) != shard.count:
            raise ShardContentError(f"{shard.path}: {len(samples)} samples, but its manifest lists {shard.count}")
        return samples

    def load_block(self, block: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The block's (latent float16 [C,H,W], embedding float32 [D]) pairs, shuffled and flipped."""
        rng = self._block_rng(block)
        picks = self._block_picks(rng)
        cache: dict[int, list[dict[str, Any]]] = {}
        samples: list[tuple[dict[str, Any], str]] = []
        for index in picks:
            if index not in cache:
                cache[index] = self._read_shard(int(index))
            samples.extend((sample, self.shards[index].path) for sample in cache[index])
        order = rng.permutation(len(samples))
        variants = rng.integers(0, len(LATENT_FIELDS), size=len(samples))
        field = embedding_field(self.config.embedding_key)
        out = []
        for position in order:
            sample, shard = samples[position]
            check_sample(sample, shard, self.config)
            variant = int(variants[position]) if self.config.augment != "none" else 0
            if self.config.augment == "stored":
                latent = decode_npy(sample[LATENT_FIELDS[variant]])
            else:
                latent = decode_npy(sample[LATENT_FIELDS[0]])
                if VARIANT_AXES[variant]:
                    latent = np.ascontiguousarray(np.flip(latent, VARIANT_AXES[variant]))
            out.append((latent, decode_npy(sample[field]).reshape(-1).astype(np.float32)))
        return out

    # --- batches --------------------------------------------------------------------------------
    def samples_from(self, sample_index: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        block, offset = self.locate(sample_index)
        while True:
            yield from self.load_block(block)[offset:]
            block, offset = block + 1, 0

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = torch.utils.data.get_worker_info()
        if info is not None and info.num_workers > 1:
            raise RuntimeError("LatentBatches is one ordered stream per rank: use at most one loader worker")
        config, step = self.config, self.start_step
        samples = self.samples_from(step * config.batch_size)
        while True:
            pairs = [next(samples) for _ in range(config.batch_size)]
            shapes = {p[0].shape for p in pairs}
            if len(shapes) != 1:
                raise ShardContentError(f"latents of different shapes in one batch: {sorted(shapes)}")
            latents = torch.from_numpy(np.stack([p[0] for p in pairs]).astype(np.float32))
            embeddings = torch.from_numpy(np.stack([p[1] for p in pairs]))
            extra = step_randomness(config.seed, self.rank, step, config.batch_size, latents.shape[1:],
                                    config.num_train_timesteps, config.cfg_dropout)
            yield {"latents": latents, "embeddings": embeddings, "step": torch.tensor(step), **extra}
            step += 1


class LatentDataModule(L.LightningDataModule):
    """Latent shards for Lightning: each rank's stream starts where the (restored) run stands."""

    def __init__(self, paths: Sequence[str | Path], config: TrainConfig) -> None:
        super().__init__()
        self.paths = [str(p) for p in paths]
        self.config = config
        self.shards: list[ShardInfo] | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.shards is None:
            self.shards = find_latent_shards(self.paths, self.config.holdout_fraction)
            check_shards(self.shards, self.config)

    def train_dataloader(self) -> DataLoader:
        self.setup()
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        world_size = trainer.world_size if trainer is not None else 1
        # Called after a resumed run's loops are restored: global_step is the step to continue with.
        start = trainer.global_step * self.config.accumulate_grad_batches if trainer is not None else 0
        dataset = LatentBatches(self.shards, self.config, rank, world_size, start)
        return DataLoader(dataset, batch_size=None, num_workers=self.config.num_workers,
                          pin_memory=torch.cuda.is_available())
