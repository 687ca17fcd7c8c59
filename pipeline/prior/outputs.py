"""What the prior stage writes in ``OUT/prior/<dataset>/`` (docs/data_contract.md, "Stage 4b"),
and its readers:

- ``model/``: the prior (`pipeline.models.prior.EmbeddingGridPrior.save_pretrained`);
- ``prior.json``: datasets, crop size, inputs trained on and held out, crops, steps, final loss,
  seconds; written last, so it marks a finished stage;
- ``checkpoints/`` (``last.ckpt``, ``step-NNNNNN.ckpt``) and ``logs/version_K/metrics.csv``;
- while it runs, ``.grids/``: the training grids as memmaps (removed at the end).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.errors import StageOutputError
from pipeline.io.atomic import write_text_atomic
from pipeline.io.stage_files import read_json_file

MODEL_DIR = "model"
RECORD_FILE = "prior.json"
GRIDS_WORK_DIR = ".grids"


def write_prior_record(out_dir: str | Path, record: dict[str, Any]) -> None:
    write_text_atomic(Path(out_dir) / RECORD_FILE, json.dumps(record, indent=2, sort_keys=True) + "\n")


@dataclass(frozen=True)
class PriorRecord:
    folder: Path
    model: Path                      # the export, for pipeline.models.prior.load_prior
    datasets: tuple[str, ...]
    crop: int
    steps: int
    crops: int                       # training crops with enough tissue
    inputs: dict[str, list[str]]     # per dataset, the inputs trained on
    heldout_inputs: dict[str, list[str]]
    final_loss: float | None


def read_prior_record(folder: str | Path) -> PriorRecord:
    """A finished prior stage's record (its model folder checked to exist)."""
    folder = Path(folder)
    path = folder / RECORD_FILE
    record = read_json_file(path)
    try:
        model = folder / str(record["model"])
        result = PriorRecord(folder, model, tuple(record["datasets"]), int(record["crop"]), int(record["steps"]),
                             int(record["crops"]), dict(record["inputs"]), dict(record["heldout_inputs"]),
                             record.get("final_loss"))
    except (KeyError, TypeError, ValueError) as exc:
        raise StageOutputError(f"{path}: cannot read the prior record: {exc!r}") from exc
    if not model.is_dir():
        raise StageOutputError(f"{path}: its model folder {model} is missing")
    return result
