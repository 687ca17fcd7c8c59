"""The evaluation in the report: the metrics table (metrics.html), from
`pipeline.evaluation.outputs.read_metrics`, with what each metric means."""

from __future__ import annotations

import html
import math
from pathlib import Path

import pandas as pd

from pipeline.evaluation.outputs import Metric, Metrics, read_metrics
from pipeline.io.atomic import write_text_atomic
from pipeline.reporting.notices import model_parts, random_notice
from pipeline.sampling.outputs import random_parts_of
from pipeline.reporting.pages import banner, html_page, table_html

# What each metric measures and which direction is better (docs "Stage 7").
METRIC_MEANING = {
    "fid": "Fréchet Inception distance: lower is better, 0 = identical feature statistics",
    "kid": "kernel Inception distance: lower is better, about 0 = same distribution",
    "clip_fid": "Fréchet distance in CLIP ViT-B/32 features: lower is better",
    "clip_kid": "kernel distance in CLIP ViT-B/32 features: lower is better",
    "fd_": "Fréchet distance in {name} features: lower is better; not comparable with FID",
    "kd_": "kernel distance in {name} features: lower is better; not comparable with KID",
    "embedding_cosine": "cosine between each generated image's embedding and the embedding it was generated "
                        "from: higher is better, at most 1; compare with the real images' value",
    "embedding_cosine_real": "the same cosine for the real images that gave the conditions: the ceiling",
    "prior_fd": "Fréchet distance of the prior's sampled grid positions to real ones (unit embeddings): lower is "
                "better; compare with the real floor and the shuffled control",
    "prior_fd_real_floor": "the same distance between two disjoint halves of the real positions: the floor",
    "prior_fd_shuffled": "the same for real embeddings placed at random (right marginals, no layout)",
    "prior_neighbour_cosine_generated": "mean cosine of adjacent tissue positions in the sampled grids: "
                                        "spatial coherence; compare with real and shuffled",
    "prior_neighbour_cosine_real": "the same in real crops",
    "prior_neighbour_cosine_shuffled": "the same with the real embeddings placed at random (its exact expectation)",
    "prior_tissue_fraction_generated": "mean share of tissue positions per sampled grid",
    "prior_tissue_fraction_real": "the same for real crops",
}

SCOPES = {
    "patches": "patches: generated vs held-out real",
    "large_image_crops": "large images: 256 px crops, generated vs reference region",
    "prior_grids": "embedding-grid prior: sampled grids vs real grids",
}
COLUMNS = ["images", "metric", "value", "generated", "real", "features", "meaning", "notes"]


def metric_meaning(name: str) -> str:
    base = name.removeprefix("crop_")
    if base in METRIC_MEANING:
        return METRIC_MEANING[base]
    for prefix in ("fd_", "kd_"):
        if base.startswith(prefix):
            return METRIC_MEANING[prefix].format(name=base[len(prefix):])
    return ""


def format_number(value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.4g}"


def metrics_random(metrics: Metrics) -> list[str]:
    """What was randomly initialised behind the metrics: the feature extractor(s), the generating model."""
    what = []
    for metric in metrics.metrics:
        if metric.random_extractor:
            name = f"the evaluation's feature extractor {metric.extractor.get('name', '')}".strip()
            if name not in what:
                what.append(name)
        what += [part for part in model_parts(random_parts_of(metric.sampler)) if part not in what]
    return what


def _row(metric: Metric) -> dict[str, object]:
    notes = list(metric.warnings)
    if metric.spread is not None:
        notes.append(", ".join(f"{k} {format_number(v)}" for k, v in metric.spread.items()))
    if metric.regions is not None:
        notes.append(f"{metric.regions} region(s)")
    extractor = metric.extractor
    return {"images": SCOPES.get(metric.scope, metric.scope), "metric": metric.name,
            "value": format_number(metric.value), "generated": metric.generated, "real": metric.real,
            "features": f"{extractor.get('name', '?')}" + (" (RANDOM weights)" if extractor.get("random_weights")
                                                          else ""),
            "meaning": metric_meaning(metric.name), "notes": "; ".join(notes)}


def metrics_frame(metrics: Metrics) -> pd.DataFrame:
    return pd.DataFrame([_row(metric) for metric in metrics.metrics], columns=COLUMNS)


def metrics_table(metrics_path: str | Path, out: str | Path, dataset: str) -> pd.DataFrame:
    """HTML table of metrics.json: every metric with its value, the image counts behind it, the
    features it was computed in, what it means, and its warnings; skipped metrics below."""
    metrics = read_metrics(metrics_path)
    frame = metrics_frame(metrics)
    body = banner([random_notice(metrics_random(metrics))])
    body += ('<p class="note">"generated" and "real" are the numbers of images in each set; with few images '
             "the distances are noisy and biased upwards, so only compare runs with similar counts.</p>\n")
    body += table_html(frame, numeric=["value", "generated", "real"])
    if metrics.skipped:
        body += "<h2>Not computed</h2>\n" + table_html(pd.DataFrame(list(metrics.skipped), columns=["name", "reason"]))
    body += (f'<p class="note">Feature extractor setting: '
             f'{html.escape(str(metrics.settings.get("feature_extractor")))}; '
             f"source: {html.escape(str(metrics_path))}.</p>\n")
    write_text_atomic(out, html_page(f"{dataset}: evaluation metrics", body))
    return frame
