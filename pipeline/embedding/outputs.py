"""The embedding stage's dataset index (written here) and its readers, for the stages and the
report that use embeddings (docs/data_contract.md, "Stage 2").

``OUT/embeddings/<dataset>/index.parquet`` has one row per patch (key, input id, grid col/row,
shard relative to ``inputs/``, the encoders' spec and weights hashes); the shards under
``inputs/<input id>/`` hold each patch's image next to its embeddings. The per-input manifests
(and the latents stage's, which copy them) record which weights made each encoder's embeddings:
`recorded_encoder`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import StageOutputError
from pipeline.io.atomic import atomic_file
from pipeline.io.shards import decode_bands, decode_npy, image_field, iter_shard
from pipeline.io.stage_files import read_parquet_file

INDEX_NAME = "index.parquet"
INPUTS_DIR = "inputs"
INDEX_COLUMNS = ["key", "input_id", "source", "x", "y", "col", "row", "shard"]
REQUIRED_COLUMNS = ("key", "input_id", "col", "row", "shard")
WEIGHTS_HASH = "_weights_sha256"  # column suffix: <encoder>_weights_sha256, "random" for random weights


def write_dataset_index(input_dirs: Sequence[str | Path], final: str | Path) -> pd.DataFrame:
    """The dataset's embedding index: one row per patch (key, slide, x, y, col, row, shard)."""
    frames = []
    for folder in map(Path, input_dirs):
        frame = pd.read_parquet(folder / "manifest.parquet")
        frame.insert(1, "input_id", folder.name)
        frame["shard"] = [str(Path(folder.name) / name) for name in frame.shard] if len(frame) else frame.get("shard")
        frames.append(frame)
    index = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=INDEX_COLUMNS)
    if "slide" not in index.columns:
        index["slide"] = index.get("source")
    with atomic_file(final) as temp:
        index.to_parquet(temp, index=False)
    return index


@dataclass(frozen=True, eq=False)
class EmbeddingIndex:
    """A dataset's embedding index."""

    folder: Path                     # OUT/embeddings/<dataset>
    rows: pd.DataFrame               # one row per patch, in input-id then row-major order
    encoders: tuple[str, ...]        # every encoder the patches were embedded with
    random_encoders: tuple[str, ...]  # those of them with randomly initialised weights

    def __len__(self) -> int:
        return len(self.rows)


def read_embedding_index(embeddings_dir: str | Path) -> EmbeddingIndex:
    folder = Path(embeddings_dir)
    path = folder / INDEX_NAME
    if not path.is_file():
        raise StageOutputError(f"{path}: embedding index not found (run the embed stage first)")
    rows = read_parquet_file(path, REQUIRED_COLUMNS)
    hashes = [c for c in rows.columns if c.endswith(WEIGHTS_HASH)]
    encoders = tuple(c.removesuffix(WEIGHTS_HASH) for c in hashes)
    random = tuple(name for name, c in zip(encoders, hashes) if (rows[c].astype(str) == "random").any())
    return EmbeddingIndex(folder, rows, encoders, random)


def recorded_encoder(manifests: Sequence[str | Path], name: str) -> dict[str, Any]:
    """Which weights made the `name` embeddings of manifests this stage wrote (or a later stage
    copied): its name, weights hash (``"random"`` for random weights) and whether they are random."""
    column = f"{name}{WEIGHTS_HASH}"
    hashes: set[str] = set()
    for path in map(Path, manifests):
        frame = read_parquet_file(path)
        hashes |= set(frame[column].astype(str)) if column in frame else set()
    if len(hashes) > 1:
        raise StageOutputError(f"the {name} embeddings were made with {len(hashes)} different weights: "
                               f"{sorted(hashes)}")
    weights = min(hashes) if hashes else None
    return {"name": name, "weights_sha256": weights, "random_weights": weights == "random"}


@dataclass(frozen=True, eq=False)
class RealPatch:
    key: str
    input_id: str
    col: int
    row: int
    image: np.ndarray  # (H, W, 3) uint8: RGB, the first three bands
    embedding: np.ndarray  # (D,) float32
    bands: np.ndarray | None = None  # (H, W, bands) uint8: every band the patch carries (image itself for RGB)


def _indexed_samples(index: EmbeddingIndex, rows: pd.DataFrame, embedding_key: str):
    """(sample, its embedding float32 (D,), (input id, col, row), shard path) of each of `rows`,
    read shard by shard; an indexed patch missing from its shard is an error, after the last."""
    inputs_dir = index.folder / INPUTS_DIR
    field = f"{embedding_key}.npy"
    seen: set[str] = set()
    for shard, group in rows.groupby("shard", sort=True):
        wanted = {key: (ident, int(col), int(row))
                  for key, ident, col, row in zip(group.key, group.input_id, group.col, group.row)}
        path = inputs_dir / shard
        for sample in iter_shard(path):
            key = sample["__key__"]
            if key not in wanted:
                continue
            if field not in sample:
                raise StageOutputError(f"{path}: sample {key!r} has no embedding {field!r}")
            seen.add(key)
            yield sample, decode_npy(sample[field]).reshape(-1).astype(np.float32), wanted[key]
    missing = sorted(set(rows.key) - seen)
    if missing:
        raise StageOutputError(f"{inputs_dir}: {len(missing)} indexed patches not found in their shards, "
                               f"e.g. {missing[:3]}")


def read_patches(index: EmbeddingIndex, rows: pd.DataFrame, embedding_key: str) -> dict[str, RealPatch]:
    """Image and embedding of each of the index's `rows`, read shard by shard."""
    found: dict[str, RealPatch] = {}
    for sample, embedding, (ident, col, row) in _indexed_samples(index, rows, embedding_key):
        key = sample["__key__"]
        pixels = decode_bands(sample[image_field(sample)])
        rgb = pixels if pixels.shape[2] == 3 else np.ascontiguousarray(pixels[..., :3])
        found[key] = RealPatch(key, ident, col, row, rgb, embedding, pixels)
    return found


def iter_embeddings(index: EmbeddingIndex, rows: pd.DataFrame, embedding_key: str):
    """(key, embedding float32 (D,)) of each of the index's `rows`, shard by shard, images not
    decoded: memory holds one sample whatever the number of rows."""
    for sample, embedding, _ in _indexed_samples(index, rows, embedding_key):
        yield sample["__key__"], embedding
