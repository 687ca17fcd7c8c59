"""Parts 2 and 3 of the learning benchmark (bench/learning.py): does the diffusion model learn, and
does it follow its condition? Everything goes through the pipeline's own stages' functions:

* conditions: ``pipeline.embedding.extract.embed_images`` with the conditioning encoder, on RGB;
* latents: ``pipeline.latents.encode.encode_images`` (all four flips) with the trained autoencoder,
  written as one latent shard (``pipeline.io.shards.write_shard``) that ``pipeline.training.train``
  streams like the latent stage's;
* models: every kept checkpoint (``step-NNNNNN.ckpt``) and the untrained model (the same config,
  step 0) exported with ``pipeline.training.export_module`` and loaded with ``load_pipeline``;
* samples: ``pipeline.sampling.patches.PatchSampler`` (the sample stage's), one per condition;
* FD: the evaluation stage's feature extractor (``pipeline.evaluation.extractors``) on PNG files
  through clean-fid's loader (``pipeline.evaluation.run.folder_features``) and its Fréchet
  distance (``pipeline.evaluation.distances``).
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.cli import training_config
from pipeline.embedding.extract import EmbeddingSettings, embed_images
from pipeline.evaluation.distances import degenerate_covariance_warning, features_frechet_distance
from pipeline.evaluation.extractors import FeatureExtractor
from pipeline.evaluation.run import folder_features
from pipeline.evaluation.settings import EvaluationSettings
from pipeline.io.large_image_files import rgb_view, write_png
from pipeline.io.shards import encode_npy, write_shard
from pipeline.latents.encode import EncodeSettings, encode_images, latent_field
from pipeline.models import load_pipeline
from pipeline.models.autoencoder import Autoencoder
from pipeline.sampling.patches import PatchSampler, PatchSamplingConfig
from pipeline.training import LatentDiffusion, export_module, module_from_checkpoint, train
from pipeline.training.run import CHECKPOINT_DIR

CPU = torch.device("cpu")


@dataclass(frozen=True)
class DiffusionSettings:
    """What the benchmark changes from the demo's `training:` table, and how it samples."""

    max_steps: int
    curve_every: int  # a kept checkpoint (and an fd_curve point) every this many steps
    sampler: str = "ddim"
    sampling_steps: int = 20
    guidance_scale: float = 2.0
    batch_size: int = 16  # sampling, embedding and feature batches
    seed: int = 0


@dataclass(frozen=True)
class Stage:
    """The trained pieces the diffusion model is built on."""

    autoencoder: Autoencoder
    encoder: Any  # pipeline.embedding.encoders.Encoder: makes the conditions
    extractor: FeatureExtractor  # the FD's features
    training_table: dict[str, Any]  # the config's `training:` table


def rgb(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> its first three bands, as the pipeline embeds and previews."""
    return images[:, :3].contiguous()


def embed(encoder, images: torch.Tensor, batch_size: int) -> np.ndarray:
    run = EmbeddingSettings(batch_size=batch_size, num_workers=0, device="cpu")
    return embed_images([encoder], rgb(images), run)[encoder.spec.name].astype(np.float32)


def write_latent_shard(stage: Stage, images: torch.Tensor, conditions: np.ndarray, path: Path) -> Path:
    """The training patches as one latent shard: the four flips' latents and the condition."""
    latents = encode_images(stage.autoencoder, images, EncodeSettings(batch_size=8, num_workers=0, device="cpu"))
    field = f"{stage.encoder.spec.name}.npy"
    samples = [{"__key__": f"train{i:05d}", field: encode_npy(conditions[i].astype(np.float16)),
                **{latent_field(flip): encode_npy(array[i]) for flip, array in latents.items()}}
               for i in range(len(images))]
    write_shard(path, samples)
    return path


def train_config(stage: Stage, settings: DiffusionSettings, latent_size: int):
    table = {**stage.training_table, "max_steps": settings.max_steps, "checkpoint_every": settings.curve_every,
             "latent_size": latent_size, "accelerator": "cpu", "num_workers": 0,
             "latent_channels": stage.autoencoder.latent_channels}
    return training_config(table, stage.encoder.spec.name, seed=settings.seed)


def fit(stage: Stage, settings: DiffusionSettings, shard: Path, latent_size: int, run_dir: Path):
    """Train; returns the config, the models of every kept checkpoint by step (0: untrained), seconds."""
    config = train_config(stage, settings, latent_size)
    started = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(config, [shard], run_dir, enable_progress_bar=False)
    seconds = time.perf_counter() - started
    modules = {0: LatentDiffusion(config)}
    for path in sorted((run_dir / CHECKPOINT_DIR).glob("step-*.ckpt")):
        module = module_from_checkpoint(path)
        modules[module._exported_step] = module
    return config, modules, seconds


def sampler_config(settings: DiffusionSettings) -> PatchSamplingConfig:
    return PatchSamplingConfig(sampler=settings.sampler, steps=settings.sampling_steps,
                               guidance_scale=settings.guidance_scale, batch_size=settings.batch_size,
                               precision="float32", device="cpu", seed=settings.seed)


def generate(stage: Stage, module, conditions: np.ndarray, settings: DiffusionSettings, folder: Path) -> torch.Tensor:
    """One patch per condition from the exported module; uint8 (N, bands, H, W)."""
    encoder = {"name": stage.encoder.spec.name, **stage.encoder.record()}
    model = load_pipeline(export_module(module, folder, stage.autoencoder, encoder=encoder))
    images = [batch.images for batch in PatchSampler(model, sampler_config(settings)).batches(conditions)]
    return torch.from_numpy(np.concatenate(images)).permute(0, 3, 1, 2).contiguous()


def features(stage: Stage, images: torch.Tensor, folder: Path, batch_size: int) -> np.ndarray:
    """The FD features of images (their RGB), written as PNG and read back as the evaluation stage does."""
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        files.append(folder / f"{i:05d}.png")
        write_png(files[-1], rgb_view(image))
    settings = EvaluationSettings(feature_extractor=stage.extractor.name, batch_size=batch_size, num_workers=0,
                                  device="cpu")
    return folder_features(stage.extractor, files, settings, CPU)


def condition_following(stage: Stage, generated: torch.Tensor, conditions: np.ndarray, batch_size: int) -> dict:
    """Rank each generated patch's own condition among all conditions of the set (cosine of its
    embedding by the conditioning encoder); ties count against it."""
    embedded = embed(stage.encoder, generated, batch_size)
    unit = embedded / np.maximum(np.linalg.norm(embedded, axis=1, keepdims=True), 1e-12)
    cond = conditions / np.maximum(np.linalg.norm(conditions, axis=1, keepdims=True), 1e-12)
    cosine = unit @ cond.T
    own = np.diag(cosine)
    rank = (cosine >= own[:, None]).sum(axis=1) - 1  # 0: its own condition is the closest
    count = len(own)
    return {"retrieval_top1": float(np.mean(rank < 1)), "retrieval_top5": float(np.mean(rank < 5)),
            "retrieval_chance": {"top1": 1 / count, "top5": min(5, count) / count},
            "cosine_paired": float(own.mean()),
            "cosine_shuffled": float(cosine[~np.eye(count, dtype=bool)].mean()) if count > 1 else None}


@dataclass(frozen=True)
class EmbeddedPair:
    """Held-out sets A (conditions) and B (reference), with A's conditions."""

    conditions: torch.Tensor
    reference: torch.Tensor
    conditions_embedded: np.ndarray


def measure_step(stage: Stage, module, pair: EmbeddedPair, reference_features: np.ndarray,
                 settings: DiffusionSettings, work: Path, step: int) -> tuple[dict, torch.Tensor]:
    """fd and condition following of one model: one patch per condition of A."""
    generated = generate(stage, module, pair.conditions_embedded, settings, work / f"model-{step:06d}")
    fd = features_frechet_distance(features(stage, generated, work / f"png-{step:06d}", settings.batch_size),
                                   reference_features)
    return {"step": step, "fd": fd, **condition_following(stage, generated, pair.conditions_embedded,
                                                           settings.batch_size)}, generated


CONDITION_KEYS = ("retrieval_top1", "retrieval_top5", "cosine_paired", "cosine_shuffled")


def curve_figures(curve: list[dict]) -> dict[str, Any]:
    """The trained (last point) and untrained (step 0) figures, and the curves."""
    last, first = curve[-1], curve[0]
    return {"fd_trained": last["fd"], "fd_untrained": first["fd"],
            "fd_curve": [{"step": p["step"], "fd": p["fd"]} for p in curve],
            **{k: last[k] for k in (*CONDITION_KEYS, "retrieval_chance")},
            "untrained": {k: first[k] for k in CONDITION_KEYS},
            "condition_curve": [{"step": p["step"], **{k: p[k] for k in CONDITION_KEYS}} for p in curve]}


def diffusion_figures(stage: Stage, train_images: torch.Tensor, pair, settings: DiffusionSettings,
                      work: Path) -> tuple[dict[str, Any], torch.Tensor]:
    """Parts 2 and 3 on one dataset: train on train_images' latents, sample one patch per A condition
    at every kept checkpoint; returns the figures and the last step's generated patches."""
    embedded = EmbeddedPair(pair.conditions, pair.reference, embed(stage.encoder, pair.conditions, settings.batch_size))
    shard = write_latent_shard(stage, train_images, embed(stage.encoder, train_images, settings.batch_size),
                               work / "latents" / "patches-000000.tar")
    latent_size = int(train_images.shape[-1]) // stage.autoencoder.downsampling_factor
    config, modules, train_seconds = fit(stage, settings, shard, latent_size, work / "training")
    reference = features(stage, pair.reference, work / "png-reference", settings.batch_size)
    conditions_features = features(stage, pair.conditions, work / "png-conditions", settings.batch_size)
    started = time.perf_counter()
    curve, generated = [], torch.empty(0)
    for step, module in sorted(modules.items()):
        point, generated = measure_step(stage, module, embedded, reference, settings, work, step)
        curve.append(point)
    count = len(pair.conditions)
    figures = {
        **curve_figures(curve), "fd_real_floor": features_frechet_distance(conditions_features, reference),
        "trained_step": curve[-1]["step"],
        "samples": {"train_patches": len(train_images), "conditions_A": count, "reference_B": len(pair.reference),
                    "generated_per_point": count, "fd_floor_sets": [count, len(pair.reference)],
                    "fd_curve_points": len(curve)},
        "fd_warning": degenerate_covariance_warning({"generated": count, "real": len(pair.reference)},
                                                    stage.extractor.dim),
        "diffusion": {"bench": asdict(settings), "train_config": config.to_dict(),
                      "train_seconds": round(train_seconds, 1),
                      "measure_seconds": round(time.perf_counter() - started, 1)},
    }
    return figures, generated
