"""What the stain stage writes per input (OUT/stain/<dataset>/inputs/<input id>/), and its readers.

Shards `patches-NNNNNN.tar` (tiling's names, keys and order; each sample's JSON gains a `stain`
record), `manifest.parquet` (tiling's columns plus MANIFEST_COLUMNS) and `stain.json` (the fit and
the counts). Standard library, pandas and numpy only: the report reads them in the main environment.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import StageOutputError
from pipeline.io.stage_files import read_json_file, read_parquet_file

STATUS_FILE = "stain.json"
MANIFEST_FILE = "manifest.parquet"
MANIFEST_COLUMNS = ("stain_normalized", "stain_skipped", "stain_stained_fraction", "stain_method",
                    "stain_target_sha256")
STATUS_KEYS = ("input_id", "method", "target", "target_sha256", "patch_count", "normalized", "passed_through")
# Why a patch passed through unchanged (the `skipped` of its record).
BACKGROUND = "background"  # fewer stained pixels than min_stained_fraction
ESTIMATION_FAILED = "estimation_failed"  # tiatoolbox raised, or the arithmetic gave no finite result


def read_stain_status(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / STATUS_FILE
    status = read_json_file(path)
    missing = [key for key in STATUS_KEYS if key not in status]
    if missing:
        raise StageOutputError(f"{path}: missing {', '.join(missing)}")
    return status


def read_stain_manifest(folder: str | Path) -> pd.DataFrame:
    return read_parquet_file(Path(folder) / MANIFEST_FILE, ("key", "shard", *MANIFEST_COLUMNS))
