"""Test helpers: paths of the real data and small readers of pipeline outputs."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.io.shards import read_shard

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
DEMO_SLIDE = REPO / "demo_data" / "cmu_small_region.svs"


def make_spec(**changes):
    """A DatasetSpec with the schema's defaults, changed where the test says."""
    from pipeline.config import DatasetSpec

    base = DatasetSpec(
        name="test", kind="wsi", inputs={}, target_mpp=0.5, patch_size=256, tissue_threshold=0.5,
        mpp_overrides=None, mpp_from_objective=False, bands=(1, 2, 3), max_nodata_fraction=0.05,
        image_format="png", jpeg_quality=95, patches_per_shard=2000,
    )
    return dataclasses.replace(base, **changes)


def read_shards(folder: Path) -> list[dict]:
    """All samples of the tar shards in ``folder``, in order: {'__key__', ext: bytes, ...}."""
    return [sample for shard in sorted(folder.glob("*.tar")) for sample in read_shard(shard)]


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
