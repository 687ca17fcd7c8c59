"""The report's overview of one dataset (summary.html): a row per stage saying what the stage
does and what it did here, read with each stage's own reader."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline.embedding.outputs import read_embedding_index
from pipeline.evaluation.outputs import Metrics, read_metrics
from pipeline.io.atomic import write_text_atomic
from pipeline.reporting.metrics import format_number, metrics_random
from pipeline.reporting.notices import model_parts, random_notice
from pipeline.reporting.pages import banner, html_page, table_html
from pipeline.reporting.tiling import tiling_summary
from pipeline.sampling.outputs import PatchSamples, read_large_images, read_samples
from pipeline.tiling.status import read_tiling_status
from pipeline.training.outputs import read_training_done, read_training_log

STAGES = {
    "tiling": "the input images are cut into square patches at one physical resolution; only patches "
              "that are mostly tissue (slides) or valid data (aerial) are kept",
    "embeddings": "a self-supervised encoder turns every patch into a vector that describes its content",
    "training": "a latent diffusion model learns to generate a patch given that vector",
    "patches": "for each held-out real patch (never seen in training) a new patch is generated from its vector",
    "large images": "for real k x k blocks of adjacent patches, one large image is generated from the grid of "
                    "their vectors",
    "evaluation": "generated and real images are compared in feature space (distances: lower is better) and "
                  "by how well the generated images keep their vectors (cosine: higher is better)",
}


def _tiling(tiles: str | Path) -> str:
    inputs = read_tiling_status(tiles)
    failed = [status for status in inputs if not status.done]
    text = tiling_summary(inputs)
    if failed:
        text += ". Failed: " + ", ".join(f"{s.source} ({s.reason.value if s.reason else '?'})" for s in failed)
    return text


def _training(training: str | Path) -> str:
    log, done = read_training_log(training), read_training_done(training)
    text = f"trained to step {done.max_steps if done else '?'}"
    if len(log):
        tail = log.losses[-max(1, len(log) // 10):].mean()
        text += (f"; loss {log.losses[0]:.4g} at step {int(log.steps[0])}, "
                 f"{tail:.4g} over the last tenth of the log")
        if log.restarts:
            text += f"; continued after {len(log.restarts)} restart(s)"
    return text


def _patches(record: PatchSamples) -> str:
    sampler = record.sampler
    return (f"{len(record.sample_ids)} patches generated from {record.embedding_key or '?'} embeddings "
            f"({sampler.get('sampler', '?')}, {sampler.get('steps', '?')} steps, guidance "
            f"{sampler.get('guidance_scale', '?')})")


def _large_images(large_images: str | Path) -> str:
    regions = read_large_images(large_images).regions
    sizes = sorted({f"{r.settings.get('width')}x{r.settings.get('height')}" for r in regions
                    if r.settings.get("width") is not None})
    ks = sorted({r.k for r in regions})
    return (f"{len(regions)} large image(s) of {', '.join(sizes) or '?'} px from "
            f"{' / '.join(f'{k}x{k}' for k in ks)} regions")


def _evaluation(record: Metrics) -> str:
    headline = []
    for metric in record.metrics:
        shown = f"{metric.name} = {format_number(metric.value)}"
        if metric.generated and metric.real:
            shown += f" ({metric.generated} generated vs {metric.real} real)"
        headline.append(shown)
    return "; ".join(headline) or "no metric computed"


def summary_page(out: str | Path, dataset: str, *, tiles: str | Path | None = None,
                 embeddings_index: str | Path | None = None, training: str | Path | None = None,
                 samples: str | Path | None = None, large_images: str | Path | None = None,
                 metrics: str | Path | None = None) -> list[dict[str, str]]:
    """HTML overview of one dataset: a row per stage given, saying what the stage does, what it did
    here and its headline numbers, under a banner naming every randomly initialised model.
    `embeddings_index` is the index.parquet file, the others the stages' folders or metrics.json."""
    rows: list[dict[str, str]] = []
    random_what: list[str] = []

    def add(stage: str, result: str) -> None:
        rows.append({"stage": f"{len(rows) + 1}. {stage}", "what it does": STAGES[stage], "result": result})

    if tiles:
        add("tiling", _tiling(tiles))
    if embeddings_index:
        index = read_embedding_index(Path(embeddings_index).parent)
        random_what += [f"the conditioning encoder {name}" for name in index.random_encoders]
        add("embeddings", f"{len(index)} patches embedded with {', '.join(index.encoders) or '?'}")
    if training:
        add("training", _training(training))
    if samples:
        patch_samples = read_samples(samples)
        random_what += [what for what in model_parts(patch_samples.random_parts) if what not in random_what]
        add("patches", _patches(patch_samples))
    if large_images:
        add("large images", _large_images(large_images))
    if metrics:
        evaluation = read_metrics(metrics)
        random_what += [what for what in metrics_random(evaluation) if what not in random_what]
        add("evaluation", _evaluation(evaluation))
    body = banner([random_notice(random_what)])
    body += table_html(pd.DataFrame(rows, columns=["stage", "what it does", "result"]))
    write_text_atomic(out, html_page(f"{dataset}: what was done", body))
    return rows
