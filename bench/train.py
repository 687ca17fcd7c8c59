"""Training step time split into data and compute: precomputed latents against encoding on the fly.

Data: embedding-layout shards of the 22 real H&E patches (../shared/data/he_patches_256, repeated
``--repeats`` times; embeddings: the tests' fixed random projection), encoded once with
``pipeline.latents.encode_input`` and a random-weight tiny VQ (``--latent-preset``).

* **precomputed**: ``pipeline.training.train`` itself (its ``LatentDataModule`` loader, Lightning
  trainer, precision, optimizer) on the latent shards.
* **on_the_fly**: the same model, trainer and batch size, but the loader (same worker count) reads
  the embedding shards and decodes the JPEG patches (random flips), and every step encodes the batch
  with the autoencoder on the training device before the diffusion step, as LID did.

A Lightning callback times every step: *compute* = ``on_train_batch_start`` -> ``on_train_batch_end``
(forward, backward, optimizer step); *data* = the gap from the previous step's end to this step's
start (waiting for the loader's next batch, host->device copy and, on the fly, the encoding). On
GPU both ends synchronise. The first ``--warmup`` steps are dropped. ``input_share`` =
mean data / (mean data + mean compute); the issue's goal is <= 5 % for precomputed latents.

    .venv/bin/python bench/train.py                      # CPU, about 1-3 minutes on 2 cores
    .venv/bin/python bench/train.py --device cuda --preset lid --latent-preset tiny-vq-f4 --batch-size 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, IterableDataset

from pipeline.io.shard_stage import PatchImages
from pipeline.io.shards import decode_npy, read_shard
from pipeline.latents import EncodeSettings, encode_input
from pipeline.models.autoencoder import random_vq
from pipeline.latents.encode import to_model_range
from pipeline.training import TrainConfig, train
from pipeline.training.data import embedding_field, step_randomness
from pipeline.training.module import LatentDiffusion
from pipeline.training.run import build_trainer, resolve_precision

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from test_latents import ENCODER, make_embedding_input, real_patches  # noqa: E402

warnings.filterwarnings("ignore")  # random weights, few shards, Lightning's hints: fine for timing


class StepTimer(Callback):
    """Per step: data (previous end -> this start) and compute (start -> end) seconds."""

    def __init__(self) -> None:
        self.data: list[float] = []
        self.compute: list[float] = []
        self._mark = 0.0

    @staticmethod
    def _now(pl_module) -> float:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_train_start(self, trainer, pl_module) -> None:
        self._mark = self._now(pl_module)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        now = self._now(pl_module)
        self.data.append(now - self._mark)
        self._mark = now

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        now = self._now(pl_module)
        self.compute.append(now - self._mark)
        self._mark = now


# --- on the fly: JPEG patches + embeddings -> batches; encoding on the training device ----------------
class ImageBatches(IterableDataset):
    """Endless batches of decoded (randomly flipped) uint8 patches with embeddings and step noise."""

    def __init__(self, shards: list[Path], config: TrainConfig, latent_shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shards, self.config, self.latent_shape = shards, config, latent_shape

    def __iter__(self):
        config = self.config
        samples = [s for path in self.shards for s in read_shard(path)]
        images = PatchImages(samples)
        field = embedding_field(config.embedding_key)
        rng = np.random.default_rng(config.seed)
        order: list[int] = []
        step = 0
        while True:
            while len(order) < config.batch_size:
                order.extend(rng.permutation(len(samples)).tolist())
            picks, order = order[:config.batch_size], order[config.batch_size:]
            batch = []
            for index in picks:
                image = images[index]  # JPEG decode
                dims = [d for d, flip in zip((2, 1), rng.random(2) < 0.5) if flip]
                batch.append(image.flip(dims) if dims else image)
            embeddings = np.stack([decode_npy(samples[i][field]).reshape(-1).astype(np.float32) for i in picks])
            extra = step_randomness(config.seed, 0, step, config.batch_size, self.latent_shape,
                                    config.num_train_timesteps, config.cfg_dropout)
            yield {"images": torch.stack(batch), "embeddings": torch.from_numpy(embeddings),
                   "step": torch.tensor(step), **extra}
            step += 1


class ImageDataModule(L.LightningDataModule):
    def __init__(self, dataset: ImageBatches, num_workers: int) -> None:
        super().__init__()
        self.dataset, self.num_workers = dataset, num_workers

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.dataset, batch_size=None, num_workers=self.num_workers,
                          pin_memory=torch.cuda.is_available())


class EncodingDiffusion(LatentDiffusion):
    """The training module, encoding the batch's images into latents after the device transfer."""

    def attach(self, autoencoder) -> EncodingDiffusion:
        self._autoencoder = autoencoder  # not a submodule: not trained, not checkpointed
        return self

    def on_fit_start(self) -> None:
        self._autoencoder.to(self.device)

    def on_after_batch_transfer(self, batch, dataloader_idx):
        if "images" in batch:
            batch = dict(batch)
            batch["latents"] = self._autoencoder.encode(to_model_range(batch.pop("images")))
        return batch


# --- runs ------------------------------------------------------------------------------------------
def summary(timer: StepTimer, warmup: int) -> dict:
    data, compute = timer.data[warmup:], timer.compute[warmup:]
    steps = [d + c for d, c in zip(data, compute)]
    mean_data, mean_compute = statistics.fmean(data), statistics.fmean(compute)
    return {
        "timed_steps": len(steps),
        "step_s_median": round(statistics.median(steps), 5),
        "data_s_median": round(statistics.median(data), 5),
        "compute_s_median": round(statistics.median(compute), 5),
        "data_s_mean": round(mean_data, 5),
        "compute_s_mean": round(mean_compute, 5),
        "input_share": round(mean_data / (mean_data + mean_compute), 4),
    }


def device_name(config: TrainConfig) -> str:
    if config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return (f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"{platform.processor() or platform.machine()})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per path")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--preset", default="small", choices=["small", "lid"])
    parser.add_argument("--latent-preset", default="tiny-vq-f8", choices=["tiny-vq-f4", "tiny-vq-f8", "tiny-vq-f16"])
    parser.add_argument("--num-workers", type=int, default=1, help="loader workers (TrainConfig allows 0 or 1)")
    parser.add_argument("--repeats", type=int, default=6, help="copies of the 22 real patches")
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "train.json"))
    args = parser.parse_args()

    accelerator = {"auto": "auto", "cpu": "cpu", "cuda": "gpu", "gpu": "gpu"}[args.device]
    encode_device = "cpu" if accelerator == "cpu" else ("cuda" if torch.cuda.is_available() else "cpu")
    autoencoder = random_vq(args.latent_preset, seed=0, allow_random_weights=True)
    factor = autoencoder.downsampling_factor
    latent_shape = (autoencoder.latent_channels, 256 // factor, 256 // factor)
    config = TrainConfig(
        embedding_key=ENCODER, patch_embed_dim=384, latent_channels=latent_shape[0], latent_size=latent_shape[1],
        batch_size=args.batch_size, preset=args.preset, num_workers=args.num_workers,
        max_steps=args.warmup + args.steps, warmup_steps=10, checkpoint_every=10**9, log_every=50,
        accelerator=accelerator,
    )
    quiet = {"enable_progress_bar": False}

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        embedded = root / "embeddings" / "inputs" / "slideA"
        latents = root / "latents" / "inputs" / "slideA"
        make_embedding_input(embedded, real_patches() * args.repeats, per_shard=args.per_shard)
        samples = len(real_patches()) * args.repeats
        started = time.perf_counter()
        encode_input(embedded, latents, autoencoder,
                     EncodeSettings(batch_size=32, num_workers=0, device=encode_device, flips="all"))
        encode_s = time.perf_counter() - started

        # 1. precomputed latents: the training entry point itself
        timer = StepTimer()
        train(config, [root / "latents"], root / "run_precomputed", callbacks=[timer], **quiet)
        precomputed = summary(timer, args.warmup)

        # 2. on the fly: JPEG decode in the loader, encoding on the device every step
        timer = StepTimer()
        module = EncodingDiffusion(config).attach(autoencoder)  # as train's build_module (no init_from)
        data = ImageDataModule(ImageBatches(sorted(embedded.glob("patches-*.tar")), config, latent_shape),
                               config.num_workers)
        trainer = build_trainer(config, root / "run_on_the_fly", [timer], **quiet)
        trainer.fit(module, datamodule=data)
        on_the_fly = summary(timer, args.warmup)

    result = {
        "device": device_name(config), "torch": torch.__version__,
        "precision": resolve_precision(config), "preset": args.preset, "latent_preset": args.latent_preset,
        "latent_shape": list(latent_shape), "batch_size": args.batch_size, "steps": args.steps,
        "warmup_steps_dropped": args.warmup, "num_workers": args.num_workers, "samples": samples,
        "precompute_encode_s": round(encode_s, 3),  # one-off: all samples x 4 flips
        "precomputed": precomputed,
        "on_the_fly": on_the_fly,
        "on_the_fly_over_precomputed_step": round(on_the_fly["step_s_median"] / precomputed["step_s_median"], 3),
        "goal_input_share": 0.05,
        "meets_goal": precomputed["input_share"] <= 0.05,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
