"""The Snakemake report's assets, built by `pipeline report-assets` (pipeline.reporting.assets
dispatches to one small module per asset: tiling, charts, samples, large_images, metrics,
summary; pages and sheets draw them), and what the rule files need to caption them. This module
is imported by rules/report.smk, so it imports nothing beyond the standard library."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

# Evaluation feature extractors that are not SSL encoders of the registry (pipeline.evaluation).
NON_ENCODER_EXTRACTORS = ("inception", "clip")


def random_weight_models(config: Mapping[str, Any], encoders: Sequence[str]) -> str:
    """What a validated workflow config makes randomly initialised for a dataset whose encoders are
    `encoders` ("" when nothing is), for the captions. The stages record the same (metrics.json,
    sample.json, the embedding shards), and the assets read it from there."""

    def random_encoder(name: str) -> bool:
        settings = config.get("encoders", {}).get(name) or {}
        return not settings.get("weights") and not settings.get("hub_id")

    what = [f"the conditioning encoder {name}" for name in list(encoders)[:1] if random_encoder(name)]
    if (config.get("latents", {}).get("autoencoder") or {}).get("kind") == "random":
        what.append("the first-stage autoencoder")
    extractor = (config.get("evaluation") or {}).get("feature_extractor", "inception")
    if extractor not in NON_ENCODER_EXTRACTORS and random_encoder(extractor):
        what.append(f"the evaluation's feature extractor {extractor}")
    return ", ".join(what)
