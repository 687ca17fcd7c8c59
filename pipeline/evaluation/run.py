"""Stage 7: evaluation. FID/KID of generated patches and large-image crops, and the cosine
between each generated image's SSL embedding and the embedding it was conditioned on; every
number goes to one metrics.json with its sample counts and what produced it."""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from pipeline.embedding.encoders import ENCODERS
from pipeline.embedding.extract import EmbeddingSettings, embed_images
from pipeline.evaluation.crops import check_crops_fit, write_region_crops
from pipeline.evaluation.distances import (KID_SEED, degenerate_covariance_warning, features_frechet_distance,
                                           kernel_distance, kid_subset_size)
from pipeline.evaluation.extractors import (EncoderCache, ExtractorUnavailable, FeatureExtractor, build_extractor,
                                            encoder_extractor)
from pipeline.evaluation.outputs import METRICS_FORMAT, write_metrics
from pipeline.evaluation.prior import prior_figures, real_crops, real_inputs
from pipeline.evaluation.settings import EvaluationError, EvaluationSettings
from pipeline.io.device import resolve_device
from pipeline.io.images import read_image
from pipeline.models.prior import load_prior
from pipeline.prior.outputs import read_prior_record
from pipeline.sampling.outputs import (MANIFEST, SAMPLES_SUMMARY, LargeImages, PatchSamples, read_large_images,
                                      read_samples)

log = logging.getLogger(__name__)

PATCHES, CROPS, PRIOR = "patches", "large_image_crops", "prior_grids"
SCOPE_PREFIX = {PATCHES: "", CROPS: "crop_"}


def folder_features(extractor: FeatureExtractor, files: Sequence[Path], settings: EvaluationSettings,
                    device: torch.device) -> np.ndarray:
    """Features [N, D] of image files through clean-fid's loader (mode "clean"), computed once per
    set and shared by the Fréchet and kernel distances."""
    from cleanfid.fid import get_files_features

    return get_files_features([str(f) for f in files], extractor.model, num_workers=settings.num_workers,
                              batch_size=settings.batch_size, device=device, mode="clean",
                              custom_fn_resize=extractor.fn_resize, verbose=False)


class ImageFiles(Dataset):
    """uint8 CHW tensors of image files, decoded in DataLoader workers (what embed_images takes)."""

    def __init__(self, paths: Sequence[Path]):
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.array(read_image(self.paths[index]))).permute(2, 0, 1).contiguous()


def cosine_similarities(encoder, files: Sequence[Path], conditions: np.ndarray,
                        settings: EvaluationSettings) -> np.ndarray:
    """Cosine between the embedding of files[i] (as the embed stage computes it) and conditions[i]."""
    run = EmbeddingSettings(batch_size=settings.batch_size, num_workers=settings.num_workers, device=settings.device)
    embedded = embed_images([encoder], ImageFiles(files), run)[encoder.spec.name].astype(np.float32)
    norms = np.linalg.norm(embedded, axis=1) * np.linalg.norm(conditions, axis=1)
    return np.sum(embedded * conditions, axis=1) / np.maximum(norms, 1e-12)


class Evaluation:
    """Collects metric records with the context they share (dataset, resolution, sampler)."""

    def __init__(self, settings: EvaluationSettings, encoder_settings: dict[str, Any]):
        self.settings = settings
        self.device = resolve_device(settings.device)
        self.encoders = EncoderCache(encoder_settings, self.device)
        self.extractors: list[FeatureExtractor] = []
        self.metrics: list[dict[str, Any]] = []
        self.skipped: list[dict[str, str]] = []

    def build_extractors(self) -> None:
        self.extractors = [build_extractor(self.settings.feature_extractor, self.settings, self.encoders)]
        if self.settings.clip_fid and self.settings.feature_extractor != "clip":
            try:
                self.extractors.append(build_extractor("clip", self.settings, self.encoders))
            except ExtractorUnavailable as exc:
                log.warning("%s", exc)
                self.skipped.append({"name": "clip_fid", "reason": str(exc)})

    def record(self, name: str, value: float, scope: str, counts: dict[str, int], extractor: dict[str, Any],
               context: dict[str, Any], warnings: list[str], **extra: Any) -> None:
        for warning in warnings:
            log.warning("%s: %s", name, warning)
        if extractor.get("random_weights"):  # build_encoder has already said so loudly, once
            warnings = [f"{extractor['name']} has RANDOM weights: this number says nothing about the images",
                        *warnings]
        self.metrics.append({"name": name, "value": value if math.isfinite(value) else None, "scope": scope,
                             "samples": counts, "feature_extractor": extractor, **context, **extra,
                             "warnings": warnings})

    def distances(self, scope: str, generated: Sequence[Path], real: Sequence[Path], context: dict[str, Any]) -> None:
        counts = {"generated": len(generated), "real": len(real)}
        prefix = SCOPE_PREFIX[scope]
        for extractor in self.extractors:
            if min(counts.values()) < 2:
                self.skipped.append({"name": prefix + extractor.fd_name,
                                     "reason": f"needs at least 2 images per set, got {counts}"})
                continue
            log.info("%s%s: features of %d generated and %d real images", prefix, extractor.fd_name, *counts.values())
            gen = folder_features(extractor, generated, self.settings, self.device)
            ref = folder_features(extractor, real, self.settings, self.device)
            degenerate = degenerate_covariance_warning(counts, extractor.dim)
            self.record(prefix + extractor.fd_name, features_frechet_distance(gen, ref), scope, counts,
                        extractor.record, context, [degenerate] if degenerate else [])
            kid = {"subsets": self.settings.kid_subsets, "seed": KID_SEED,
                   "subset_size": kid_subset_size(len(gen), len(ref), self.settings.kid_subset_size)}
            self.record(prefix + extractor.kd_name,
                        kernel_distance(gen, ref, self.settings.kid_subsets, self.settings.kid_subset_size),
                        scope, counts, extractor.record, context, [], kid=kid)

    def similarity(self, scope: str, embedding_key: str, generated: Sequence[Path], real: Sequence[Path],
                   conditions: np.ndarray, context: dict[str, Any]) -> None:
        encoder = self.encoders.get(embedding_key)
        record = encoder_extractor(encoder).record  # the features' record: the same encoder, the same input
        prefix = SCOPE_PREFIX[scope]
        # The real image's own cosine is the ceiling: far below 1, the conditions were not made by
        # this encoder (other weights or preprocessing) and the generated cosine cannot be read.
        for name, files, counts in ((f"{prefix}embedding_cosine", generated, {"generated": len(generated), "real": 0}),
                                    (f"{prefix}embedding_cosine_real", real, {"generated": 0, "real": len(real)})):
            cosines = cosine_similarities(encoder, files, conditions, self.settings)
            spread = {"std": float(cosines.std()), "min": float(cosines.min()),
                      "median": float(np.median(cosines)), "max": float(cosines.max())}
            self.record(name, float(cosines.mean()), scope, counts, record, context, [], **spread)

    def patches(self, samples: PatchSamples) -> None:
        context = {"dataset": samples.dataset, "mpp": samples.mpp, "sampler": samples.settings}
        self.distances(PATCHES, samples.generated, samples.unique_real, context)
        self.similarity(PATCHES, samples.embedding_key, samples.generated, samples.real, samples.conditions, context)

    def large_images(self, large: LargeImages, scratch: Path) -> None:
        context = {"dataset": large.dataset, "mpp": large.mpp, "sampler": large.sampler,
                   "sampler_varies_per_region": large.varying, "regions": len(large.regions)}
        generated, reference, conditions = [], [], []
        for region in large.regions:
            gen, ref = write_region_crops(region, scratch)
            generated += gen
            reference += ref
            conditions.append(region.embeddings.reshape(region.k * region.k, -1))  # row-major, as the crops
        self.distances(CROPS, generated, reference, context)
        self.similarity(CROPS, large.embedding_key, generated, reference, np.concatenate(conditions), context)


    def prior(self, prior_dir: Path, embeddings_dir: Path, dataset: str) -> None:
        """The grid prior's figures (pipeline.evaluation.prior) for one of its datasets."""
        record = read_prior_record(prior_dir)
        prior = load_prior(record.model)
        inputs, real_set = real_inputs(embeddings_dir, record.heldout_inputs, record.inputs, dataset)
        min_tissue = float(prior.provenance.get("settings", {}).get("min_tissue", 0.0))
        real = real_crops(embeddings_dir, inputs, prior.config.embedding_key, prior.crop, min_tissue)
        extractor = {"name": f"unit {prior.config.embedding_key} embeddings", "dim": prior.embedding_dim}
        context = {"dataset": dataset, "prior": str(record.model), "real_set": real_set, "real_inputs": inputs,
                   "crop": prior.crop, "sampler": {"steps": self.settings.prior_steps, "sampler": "ddim"}}
        for figure in prior_figures(prior, dataset, real, self.settings.prior_grids, self.settings.prior_steps,
                                    seed=0):
            if "skipped" in figure:
                self.skipped.append({"name": figure["skipped"], "reason": figure["reason"]})
                continue
            self.record(figure["name"], figure["value"], PRIOR, figure["counts"], extractor, context,
                        figure["warnings"], **figure.get("extra", {}))


def _embedding_key(recorded: str | None, given: str | None, dim: int, source: Path) -> str:
    """The encoder that made the conditions (what the folder records, else what the caller says),
    checked against the conditions' width before any network is loaded."""
    if recorded and given and recorded != given:
        raise EvaluationError(f"{source}: conditions were made by {recorded!r}, but embedding key {given!r} was given")
    key = recorded or given
    if not key:
        raise EvaluationError(f"{source}: no embedding_key says which encoder made the conditions; pass one")
    if key not in ENCODERS:
        raise EvaluationError(f"{source}: embedding_key {key!r} is not in the encoder registry")
    if ENCODERS[key].output_dim != dim:
        raise EvaluationError(f"{source}: conditions have {dim} dimensions, but {key} gives {ENCODERS[key].output_dim}")
    return key


def evaluate(out: str | Path, settings: EvaluationSettings, encoder_settings: dict[str, Any],
             samples: str | Path | None = None, large_images: str | Path | None = None,
             embedding_key: str | None = None, prior: str | Path | None = None,
             embeddings: str | Path | None = None, dataset: str | None = None) -> dict[str, Any]:
    """Evaluate a patch-samples folder, a large-images folder and/or a grid prior (with the
    dataset's ``embeddings`` folder for its real grids); write ``out`` (metrics.json)
    atomically and return its content. ``embedding_key`` names the conditioning encoder for
    folders that do not record it (large images fall back to the samples' key)."""
    if samples is None and large_images is None and prior is None:
        raise EvaluationError("nothing to evaluate: give a patch samples folder, a large-images folder or a prior")
    if prior is not None and (embeddings is None or dataset is None):
        raise EvaluationError("a prior is evaluated against a dataset's real grids: give its embeddings and dataset")
    out = Path(out)
    # Read and check every input before loading any network, so a bad folder fails in seconds.
    patch_samples = read_samples(samples) if samples is not None else None
    large = read_large_images(large_images) if large_images is not None else None
    if patch_samples is not None:
        patch_samples = replace(patch_samples, embedding_key=_embedding_key(
            patch_samples.embedding_key, embedding_key, patch_samples.conditions.shape[1],
            patch_samples.folder / SAMPLES_SUMMARY))
        embedding_key = embedding_key or patch_samples.embedding_key
    if large is not None:
        check_crops_fit(large)
        large = replace(large, embedding_key=_embedding_key(
            large.embedding_key, embedding_key, large.regions[0].embeddings.shape[2], large.folder / MANIFEST))
    run = Evaluation(settings, encoder_settings)
    if patch_samples is not None or large is not None:
        run.build_extractors()
    if patch_samples is not None:
        run.patches(patch_samples)
    if large is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".crops-", dir=out.parent) as scratch:
            run.large_images(large, Path(scratch))
    if prior is not None:
        run.prior(Path(prior), Path(embeddings), dataset)
    result = {"format": METRICS_FORMAT,
              "inputs": {"samples": str(samples) if samples is not None else None,
                         "large_images": str(large_images) if large_images is not None else None,
                         "prior": str(prior) if prior is not None else None},
              "settings": settings.to_dict(), "metrics": run.metrics, "skipped": run.skipped}
    write_metrics(out, result)
    return result


def describe(result: dict[str, Any]) -> str:
    """One line per metric, for the job log."""
    lines = []
    for m in result["metrics"]:
        n = m["samples"]
        flag = " [RANDOM weights]" if m["feature_extractor"].get("random_weights") else ""
        value = "undefined" if m["value"] is None else f"{m['value']:.6g}"
        lines.append(f"{m['dataset']} {m['name']} = {value} "
                     f"({n['generated']} generated, {n['real']} real){flag}")
    lines += [f"skipped {s['name']}: {s['reason']}" for s in result["skipped"]]
    return "\n".join(lines)
