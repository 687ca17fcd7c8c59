"""The evaluation's one output, ``OUT/evaluation/<dataset>/metrics.json`` (docs/data_contract.md,
"Stage 7"): its writer and its reader, for the report."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import StageOutputError
from pipeline.io.atomic import write_text_atomic
from pipeline.io.stage_files import read_json_file

METRICS_FORMAT = "rldiff-metrics/1"
SPREAD = ("std", "min", "median", "max")  # of the per-image cosines


def write_metrics(out: str | Path, result: Mapping[str, Any]) -> None:
    write_text_atomic(out, json.dumps(result, indent=2, allow_nan=False) + "\n")


@dataclass(frozen=True)
class Metric:
    name: str                        # fid, kid, fd_<encoder>, embedding_cosine, ...; crop_ for large-image crops
    value: float | None              # None: undefined (e.g. too few images)
    scope: str                       # patches | large_image_crops
    generated: int                   # images in each set
    real: int
    extractor: Mapping[str, Any]     # what produced the features: name, random_weights, dim, ...
    sampler: Mapping[str, Any]       # the sampling settings the images were made with
    warnings: tuple[str, ...]
    spread: Mapping[str, float] | None  # std, min, median, max of a cosine's per-image values
    regions: int | None              # large images behind a crop metric

    @property
    def random_extractor(self) -> bool:
        return bool(self.extractor.get("random_weights")) or any("RANDOM weights" in w for w in self.warnings)


@dataclass(frozen=True)
class Metrics:
    path: Path
    metrics: tuple[Metric, ...]
    skipped: tuple[Mapping[str, str], ...]  # {name, reason} of each metric not computed
    settings: Mapping[str, Any]             # the evaluation: table it ran with


def _metric(entry: Mapping[str, Any]) -> Metric:
    counts = entry.get("samples") or {}
    spread = {k: entry[k] for k in SPREAD if k in entry} or None
    return Metric(name=str(entry["name"]), value=entry.get("value"), scope=str(entry.get("scope")),
                  generated=int(counts.get("generated", 0)), real=int(counts.get("real", 0)),
                  extractor=entry.get("feature_extractor") or {}, sampler=entry.get("sampler") or {},
                  warnings=tuple(entry.get("warnings") or ()), spread=spread, regions=entry.get("regions"))


def read_metrics(path: str | Path) -> Metrics:
    path = Path(path)
    record = read_json_file(path)
    if record.get("format") != METRICS_FORMAT:
        raise StageOutputError(f"{path}: not an evaluation's metrics.json (format {METRICS_FORMAT} expected)")
    try:
        metrics = tuple(_metric(entry) for entry in record.get("metrics") or ())
    except (KeyError, TypeError, ValueError) as exc:
        raise StageOutputError(f"{path}: malformed metric record: {exc!r}") from exc
    return Metrics(path, metrics, tuple(record.get("skipped") or ()), record.get("settings") or {})
