"""Reading the files a stage wrote, for its readers: every failure is a `StageOutputError` that
names the file and says what is wrong with it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import StageOutputError


def check_columns(frame: pd.DataFrame, required: Iterable[str], path: Path) -> pd.DataFrame:
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise StageOutputError(f"{path}: missing column(s) {', '.join(missing)}")
    return frame


def read_parquet_file(path: Path, required: Iterable[str] = ()) -> pd.DataFrame:
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise StageOutputError(f"{path}: cannot read: {exc}") from exc
    return check_columns(frame, required, path)


def read_json_file(path: Path) -> dict[str, Any]:
    """A JSON object."""
    try:
        data = json.loads(path.read_text())
    except OSError as exc:
        raise StageOutputError(f"{path}: cannot read: {exc}") from exc
    except ValueError as exc:  # a JSON or a UTF-8 decode error
        raise StageOutputError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise StageOutputError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def read_npy_file(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise StageOutputError(f"{path}: cannot read: {exc}") from exc
