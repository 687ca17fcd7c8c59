"""What a training run writes besides its checkpoints (docs/data_contract.md, "Stage 4"), and
the readers the report uses: Lightning's CSV log of every (re)start, ``logs/version_K/metrics.csv``
(``train/loss`` and ``train/lr`` per logged step), and ``done.json``, written when the run
reached ``max_steps``."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import StageOutputError
from pipeline.io.atomic import write_text_atomic
from pipeline.io.stage_files import read_json_file

LOGS_DIR = "logs"  # CSVLogger(run_dir, name=LOGS_DIR) writes version_K/metrics.csv under it
LOG_GLOB = f"{LOGS_DIR}/version_*/metrics.csv"
DONE_FILE = "done.json"


@dataclass(frozen=True)
class TrainingDone:
    checkpoint: str                  # the final last.ckpt
    max_steps: int
    encoder: dict[str, Any] | None   # the conditioning encoder's record (name, weights_sha256, random_weights)


def write_training_done(out: str | Path, checkpoint: str | Path, max_steps: int,
                        encoder: dict[str, Any] | None) -> None:
    write_text_atomic(out, json.dumps({"checkpoint": str(checkpoint), "max_steps": max_steps, "encoder": encoder}))


def read_training_done(run_dir: str | Path) -> TrainingDone | None:
    """The run's done record; None while the run has not finished."""
    path = Path(run_dir) / DONE_FILE
    if not path.is_file():
        return None
    record = read_json_file(path)
    try:
        return TrainingDone(str(record["checkpoint"]), int(record["max_steps"]), record.get("encoder"))
    except (ValueError, KeyError, TypeError) as exc:
        raise StageOutputError(f"{path}: cannot read the done record: {exc!r}") from exc


@dataclass(frozen=True, eq=False)
class TrainingLog:
    """The logged steps of every start of a run, in step order; a step logged again after a
    restart keeps its latest value."""

    steps: np.ndarray                # int, increasing
    losses: np.ndarray               # train/loss at each step
    learning_rates: np.ndarray | None  # train/lr at each step (NaN where not logged); None: never logged
    versions: np.ndarray             # the Lightning version (start of the run) that logged each step

    def __len__(self) -> int:
        return len(self.steps)

    @property
    def restarts(self) -> list[int]:
        """The first step logged by each start after the first: where a restarted run continued."""
        return [int(self.steps[self.versions == v].min()) for v in np.unique(self.versions)[1:]]


def read_training_log(run_dir: str | Path) -> TrainingLog:
    frames = []
    for path in sorted(Path(run_dir).glob(LOG_GLOB)):
        match = re.fullmatch(r"version_(\d+)", path.parent.name)
        try:
            frame = pd.read_csv(path)
        except (OSError, ValueError) as exc:
            raise StageOutputError(f"{path}: cannot read: {exc}") from exc
        if "train/loss" not in frame or "step" not in frame or frame.empty:
            continue
        frame = frame.rename(columns={"train/loss": "loss", "train/lr": "lr"})
        frame["version"] = int(match.group(1)) if match else 0
        frames.append(frame[[c for c in ("step", "loss", "lr", "version") if c in frame]])
    if not frames:
        frames = [pd.DataFrame({"step": [], "loss": [], "version": []})]
    log = pd.concat(frames).dropna(subset=["loss"]).sort_values(["version", "step"])
    log = log.drop_duplicates("step", keep="last").sort_values("step").reset_index(drop=True)
    learning_rates = log.lr.to_numpy(float) if "lr" in log and log.lr.notna().any() else None
    return TrainingLog(log.step.to_numpy(int), log.loss.to_numpy(float), learning_rates, log.version.to_numpy(int))
