"""The reader of a tiled dataset's status table (``OUT/tiles/<dataset>/status.tsv``, written by
pipeline.tiling.outputs.summarize_dataset). Apart from the shard writers so that the workflow,
which plans its jobs from this table, never imports torch (webdataset does)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import StageOutputError
from pipeline.io.stage_files import check_columns
from pipeline.tiling.failures import Reason

THUMBNAIL_FILE = "thumbnail.jpg"
STATUS_TABLE = "status.tsv"  # per dataset, beside inputs/<input id>/
INPUTS_DIR = "inputs"
STATUS_TABLE_COLUMNS = ["input_id", "source", "status", "reason", "patch_count", "message"]


@dataclasses.dataclass(frozen=True)
class InputStatus:
    """One input's row of a dataset's status.tsv: its outcome and what was learnt about it."""

    input_id: str
    source: str                      # the input's file name
    kind: str                        # wsi | aerial
    done: bool
    reason: Reason | None            # why it failed
    patch_count: int
    message: str | None              # "<path>: <reason>: <detail>" of a failed input
    width: int | None                # level-0 / source pixels, when the file opened
    height: int | None
    pixel_size: float | None         # slides: level-0 um/px; aerial: source ground m/px
    pixel_size_from: str | None      # slides: where the um/px came from (mpp_source)
    thumbnail: Path | None           # its QC image, when one was written


def _cell(row: pd.Series, name: str) -> Any:
    value = row.get(name)
    return None if value is None or (not isinstance(value, str) and pd.isna(value)) else value


def _input_status(row: pd.Series, dataset_dir: Path, path: Path) -> InputStatus:
    input_id = str(row["input_id"])
    reason = _cell(row, "reason")
    try:
        reason = Reason(reason) if reason is not None else None
    except ValueError:
        raise StageOutputError(f"{path}: input {input_id} has an unknown reason {reason!r}") from None
    width, height = _cell(row, "width"), _cell(row, "height")
    pixel_size = next((v for v in (_cell(row, "level0_mpp"), _cell(row, "source_gsd")) if v is not None), None)
    thumbnail = dataset_dir / INPUTS_DIR / input_id / THUMBNAIL_FILE
    return InputStatus(
        input_id=input_id, source=str(row["source"]), kind=str(_cell(row, "kind") or "wsi"),
        done=row["status"] == "done", reason=reason, patch_count=int(_cell(row, "patch_count") or 0),
        message=_cell(row, "message"), width=int(width) if width is not None else None,
        height=int(height) if height is not None else None,
        pixel_size=float(pixel_size) if pixel_size is not None else None,
        pixel_size_from=_cell(row, "mpp_source"), thumbnail=thumbnail if thumbnail.is_file() else None)


def read_tiling_status(dataset_dir: str | Path) -> list[InputStatus]:
    """The inputs of a tiled dataset (``OUT/tiles/<dataset>``), in status.tsv order."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / STATUS_TABLE
    if not path.is_file():
        raise StageOutputError(f"{path}: no tiling status table (run the tile stage first)")
    try:
        table = pd.read_csv(path, sep="\t", dtype={"input_id": str, "source": str, "reason": str, "message": str})
    except (OSError, ValueError) as exc:
        raise StageOutputError(f"{path}: cannot read: {exc}") from exc
    check_columns(table, STATUS_TABLE_COLUMNS, path)
    return [_input_status(row, dataset_dir, path) for _, row in table.iterrows()]


def inputs_with_patches(dataset_dir: str | Path) -> list[str]:
    """Input ids of a tiled dataset whose tiling kept at least one patch."""
    return [status.input_id for status in read_tiling_status(dataset_dir) if status.done and status.patch_count > 0]
