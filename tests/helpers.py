"""Test helpers: paths of the real data and small readers of pipeline outputs."""

from __future__ import annotations

import dataclasses
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.io.shards import read_shard

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHARED_DATA = SHARED / "data"
LID_FIXTURE = SHARED / "fixtures" / "seed_ldm_tiny"
DEMO_SLIDE = REPO / "demo_data" / "cmu_small_region.svs"


def make_spec(**changes):
    """A DatasetSpec with the schema's defaults, changed where the test says."""
    from pipeline.config import DatasetSpec

    base = DatasetSpec(
        name="test", kind="wsi", inputs={}, target_mpp=0.5, patch_size=256, tissue_threshold=0.5,
        mpp_overrides=None, mpp_from_objective=False, bands=(1, 2, 3), max_nodata_fraction=0.05, max_upsample=1.5,
        image_format="png", jpeg_quality=95, patches_per_shard=2000,
    )
    return dataclasses.replace(base, **changes)


def read_shards(folder: Path) -> list[dict]:
    """All samples of the tar shards in ``folder``, in order: {'__key__', ext: bytes, ...}."""
    return [sample for shard in sorted(folder.glob("*.tar")) for sample in read_shard(shard)]


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


# Runs `python -m pipeline <args>` with one function wrapped so that the process SIGKILLs itself
# right after that function's N-th call returns: a real kill at a chosen point of a real run.
_KILL_AFTER_CALLS = """
import importlib, os, signal, sys
module, attribute, after = sys.argv[1], sys.argv[2], int(sys.argv[3])
owner = importlib.import_module(module)
*path, name = attribute.split(".")
for part in path:
    owner = getattr(owner, part)
original, calls = getattr(owner, name), 0
def call_then_die(*args, **kwargs):
    global calls
    result = original(*args, **kwargs)
    calls += 1
    if calls >= after:
        os.kill(os.getpid(), signal.SIGKILL)
    return result
setattr(owner, name, call_then_die)
from pipeline.cli import main
sys.exit(main(sys.argv[4:]))
"""


def pipeline_env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def run_pipeline(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`python -m pipeline <args>`, checked."""
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=pipeline_env(), check=True,
                          capture_output=True, **kwargs)


def run_pipeline_dying(target: str, after_calls: int, args: list[str], env: dict[str, str] | None = None,
                       **kwargs) -> subprocess.CompletedProcess:
    """`python -m pipeline <args>` whose process (whichever calls it: a forked child too) SIGKILLs
    itself after ``target`` ("module:Attr.path") returned ``after_calls`` times."""
    module, attribute = target.split(":")
    return subprocess.run([sys.executable, "-c", _KILL_AFTER_CALLS, module, attribute, str(after_calls), *args],
                          env=env or pipeline_env(), capture_output=True, **kwargs)


def run_pipeline_killed(target: str, after_calls: int, args: list[str], **kwargs) -> subprocess.CompletedProcess:
    """`python -m pipeline <args>`, SIGKILLed after ``target`` ("module:Attr.path") returned ``after_calls`` times."""
    process = run_pipeline_dying(target, after_calls, args, **kwargs)
    assert process.returncode == -9, f"expected a SIGKILL, got {process.returncode}: {process.stderr[-2000:]}"
    return process


def write_tiled_input(folder: Path, images: list[tuple[str, np.ndarray]], per_shard: int = 2000,
                      image_format: str = "png") -> Path:
    """A folder laid out as tiling writes one input (shards, manifest.parquet) from (key, RGB) pairs."""
    import json

    import pandas as pd

    from pipeline.io.shards import ShardWriter, encode_image

    folder.mkdir(parents=True)
    rows = []
    with ShardWriter(folder, max_count=per_shard) as writer:
        for index, (key, rgb) in enumerate(images):
            meta = {"dataset": "test", "source": "real.svs", "col": index, "row": 0, "x": 256 * index, "y": 0}
            shard = writer.write({"__key__": key, image_format: encode_image(rgb, image_format),
                                  "json": json.dumps(meta).encode()})
            rows.append({"key": key, **meta, "shard": shard})
    pd.DataFrame(rows).to_parquet(folder / "manifest.parquet", index=False)
    return folder


def run_snakemake(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """The workflow's Snakefile under this interpreter's snakemake, output captured."""
    return subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile"), *args], cwd=cwd,
                          capture_output=True, text=True)
