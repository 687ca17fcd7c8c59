"""The resumable per-shard loop every shard-to-shard stage shares (stain normalisation,
embeddings, latents), without torch: the stain stage runs it in tiatoolbox's own environment.

A stage maps each input shard ``patches-NNNNNN.tar`` to an output shard of the same name. Output
shards are only ever renamed into place once complete, so an existing one is finished and is
never recomputed; the input's ``manifest.parquet`` is written last and marks it complete.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
from tqdm import tqdm

from pipeline.io.atomic import atomic_file, remove_path

log = logging.getLogger(__name__)

SHARD_GLOB = "patches-*.tar"


def process_shards(in_dir: str | Path, out_dir: str | Path,
                   process_shard: Callable[[Path, Path, tqdm], int],
                   finish_manifest: Callable[[pd.DataFrame], pd.DataFrame]) -> pd.DataFrame:
    """Run ``process_shard(source, target, progress)`` for every unfinished shard of ``in_dir``,
    then write ``finish_manifest(input manifest)`` as ``out_dir/manifest.parquet``."""
    in_dir, out_dir = Path(in_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob(".*.tmp-*"):  # left by a killed run: never a finished shard
        remove_path(stale)
    manifest = pd.read_parquet(in_dir / "manifest.parquet")
    shards = sorted(in_dir.glob(SHARD_GLOB))
    todo = [s for s in shards if not (out_dir / s.name).exists()]
    todo_count = int(manifest.shard.isin([s.name for s in todo]).sum()) if len(manifest) else 0
    started = time.perf_counter()
    # A bar only on a terminal (disable=None): in a job's log its redrawn line is noise; the
    # summary line below says what was done.
    with tqdm(total=todo_count, unit="patch", desc=out_dir.name, disable=None if todo_count else True,
              mininterval=2.0) as progress:
        for shard in todo:
            process_shard(shard, out_dir / shard.name, progress)
    if todo_count:
        seconds = max(time.perf_counter() - started, 1e-9)
        log.info("%s: %d patches in %.1f s (%.1f patches/s), %d of %d shards were already done",
                 out_dir.name, todo_count, seconds, todo_count / seconds, len(shards) - len(todo), len(shards))
    manifest = finish_manifest(manifest)
    with atomic_file(out_dir / "manifest.parquet") as temp:
        manifest.to_parquet(temp, index=False)
    return manifest
