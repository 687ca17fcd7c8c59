"""Per-input tiling outputs and the per-dataset summary (see docs/data_contract.md).

Each input gets one folder, written as a whole (temporary folder, then rename):
``patches-NNNNNN.tar`` shards, ``manifest.parquet``, ``thumbnail.jpg`` and ``status.json``.
An input that fails still gets a folder with an empty manifest and a status naming the
reason, so one bad slide never stops the dataset; a ``no_tissue`` input keeps its thumbnail.
The dataset's ``status.tsv`` (one row per input) is read with `read_tiling_status`
(pipeline.tiling.status, which the workflow reads without importing torch).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.config import DatasetSpec
from pipeline.io.atomic import atomic_dir, atomic_file
from pipeline.io.shards import ShardWriter, encode_image, encode_json
from pipeline.tiling.failures import Reason, TilingError
from pipeline.tiling.status import STATUS_TABLE_COLUMNS, THUMBNAIL_FILE

log = logging.getLogger(__name__)

STATUS_FILE = "status.json"
INTEGER_STATUS_COLUMNS = {"patch_count", "width", "height", "grid_cols", "grid_rows", "read_level", "band_count"}
# Integer for slides, fractional for most resampled aerial grids: integer when every value is whole.
WHOLE_WHEN_WHOLE_COLUMNS = {"read_size"}
MANIFEST_FILE = "manifest.parquet"


@dataclasses.dataclass
class Patch:
    """One patch: grid position, pixels, and the metadata that goes into its json and the manifest."""

    col: int
    row: int
    pixels: np.ndarray  # patch_size x patch_size x bands (3 for slides, the configured ones for aerial), uint8
    meta: dict[str, Any]


class TiledSource(Protocol):
    """What a reader (slide or aerial) offers to the shared writer."""

    info: dict[str, Any]  # facts about the input recorded in its status (e.g. level-0 um/px)

    def patches(self) -> Iterator[Patch]: ...

    def qc_thumbnail(self) -> Image.Image: ...

    def close(self) -> None: ...


def patch_key(input_id: str, row: int, col: int) -> str:
    return f"{input_id}_r{row:05d}_c{col:05d}"


def _manifest_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    frame = pd.DataFrame.from_records(rows)
    if frame.empty:
        frame = pd.DataFrame({"key": pd.Series(dtype="string"), "col": pd.Series(dtype="int32"),
                              "row": pd.Series(dtype="int32"), "shard": pd.Series(dtype="string")})
    for column in ("col", "row"):
        frame[column] = frame[column].astype("int32")
    return frame


def write_parquet_atomic(frame: pd.DataFrame, final: Path) -> None:
    with atomic_file(final) as temp:
        frame.to_parquet(temp, index=False)


def tile_input(spec: DatasetSpec, input_id: str, path: str | Path, out_dir: str | Path,
               open_source) -> dict[str, Any]:
    """Tile one input with ``open_source(path, spec) -> TiledSource`` into ``out_dir``.

    Returns the status record. Never raises for a bad input: the failure is the status.
    """
    path = Path(path)
    out_dir = Path(out_dir)
    started = time.perf_counter()
    status: dict[str, Any] = {"dataset": spec.name, "input_id": input_id, "source": path.name,
                              "path": str(path), "kind": spec.kind}
    with atomic_dir(out_dir) as temp:
        rows: list[dict[str, Any]] = []
        try:
            source = open_source(path, spec)
            try:
                status.update(source.info)
                with ShardWriter(temp, prefix="patches", max_count=spec.patches_per_shard) as shards:
                    for patch in source.patches():
                        key = patch_key(input_id, patch.row, patch.col)
                        meta = {"dataset": spec.name, "source": path.name, **patch.meta,
                                "col": patch.col, "row": patch.row}
                        check_finite(path, meta)
                        shard = shards.write({
                            "__key__": key, "json": encode_json(meta),
                            spec.image_format: encode_image(patch.pixels, spec.image_format, spec.jpeg_quality)})
                        rows.append({"key": key, **meta, "shard": shard})
                # Written for no_tissue too: the mask (or nodata) it shows is why nothing was kept.
                source.qc_thumbnail().save(temp / THUMBNAIL_FILE, quality=90)
                if not rows:
                    raise TilingError(path, Reason.NO_TISSUE, "no patch passed the tissue / nodata filters")
            finally:
                source.close()
            status.update(status="done", reason=None, message=None, patch_count=len(rows))
        except Exception as exc:  # noqa: BLE001 - one bad input must never stop the dataset
            failure = exc if isinstance(exc, TilingError) else as_failure(path, exc)
            if failure.reason is Reason.UNEXPECTED_ERROR:
                log.exception("unexpected error while tiling %s", path)
            keep = {THUMBNAIL_FILE} if failure.reason is Reason.NO_TISSUE else set()
            for leftover in temp.iterdir():  # drop shards of a half-read input
                if leftover.name not in keep:
                    leftover.unlink()
            rows = []
            status.update(failure.facts)
            status.update(status="error", reason=failure.reason.value, message=str(failure), patch_count=0)
            log.warning("%s", failure)
        _manifest_frame(rows).to_parquet(temp / MANIFEST_FILE, index=False)
        status["seconds"] = round(time.perf_counter() - started, 3)
        (temp / STATUS_FILE).write_text(status_json(status))
    return status


def as_failure(path: Path, exc: BaseException) -> TilingError:
    if isinstance(exc, MemoryError):  # raised where an allocation failed: under a memory limit, the limit
        return TilingError(path, Reason.OUT_OF_MEMORY, f"an allocation failed{f': {exc}' if str(exc) else ''}")
    return TilingError(path, Reason.UNEXPECTED_ERROR, f"{type(exc).__name__}: {exc}")


def check_finite(path: Path, meta: dict[str, Any]) -> None:
    """Patch metadata must be valid JSON: NaN and Infinity are not (the readers check their inputs;
    this stops what they missed)."""
    try:
        json.dumps(meta, allow_nan=False)
    except ValueError as exc:
        raise TilingError(path, Reason.UNEXPECTED_ERROR, f"a patch's metadata is not finite: {meta}") from exc


def status_json(status: dict[str, Any]) -> str:
    """The status as strict JSON: a non-finite fact a failed reader learnt (an infinite pixel size)
    is recorded as its text."""
    finite = {key: repr(value) if isinstance(value, float) and not math.isfinite(value) else value
              for key, value in status.items()}
    return json.dumps(finite, indent=1, sort_keys=True, default=str, allow_nan=False)


def failed_status(input_id: str, path: str | Path, reason: Reason, detail: str, **facts: Any) -> dict[str, Any]:
    """The status record of an input that produced nothing, for writers other than tile_input."""
    return {"input_id": input_id, "source": Path(path).name, "path": str(path), **facts, "status": "error",
            "reason": reason.value, "message": str(TilingError(path, reason, detail)), "patch_count": 0}


def write_failed_folder(out_dir: str | Path, status: dict[str, Any]) -> None:
    """An input folder holding only a failure: empty manifest, status (written atomically)."""
    with atomic_dir(out_dir) as temp:
        _manifest_frame([]).to_parquet(temp / MANIFEST_FILE, index=False)
        (temp / STATUS_FILE).write_text(status_json(status))


def summarize_dataset(input_dirs: list[str | Path], status_out: str | Path,
                      manifest_out: str | Path) -> pd.DataFrame:
    """Gather per-input folders into the dataset status table and the dataset patch index."""
    statuses, manifests = [], []
    for folder in map(Path, input_dirs):
        if not (folder / STATUS_FILE).is_file():
            # Its job died before writing anything (killed from outside): a failure, not a lost dataset.
            statuses.append(failed_status(folder.name, folder, Reason.READER_CRASHED,
                                          "the input's tiling job left no status.json (it was killed or crashed)"))
            continue
        status = json.loads((folder / STATUS_FILE).read_text())
        statuses.append(status)
        manifest = pd.read_parquet(folder / MANIFEST_FILE)
        if not manifest.empty:
            manifest.insert(1, "input_id", status["input_id"])
            manifests.append(manifest)
    table = pd.DataFrame.from_records(statuses)
    columns = STATUS_TABLE_COLUMNS
    table = table[columns + [c for c in table.columns if c not in columns]]
    # Failed inputs lack some facts; keep counts integer (nullable) instead of 4.0-style floats.
    for column in INTEGER_STATUS_COLUMNS & set(table.columns):
        table[column] = table[column].astype("Int64")
    for column in WHOLE_WHEN_WHOLE_COLUMNS & set(table.columns):
        values = pd.to_numeric(table[column]).dropna()
        if (values == values.round()).all():
            table[column] = pd.to_numeric(table[column]).astype("Int64")
    with atomic_file(status_out) as temp:
        table.to_csv(temp, sep="\t", index=False)
    index = pd.concat(manifests, ignore_index=True) if manifests else _manifest_frame([])
    write_parquet_atomic(index, Path(manifest_out))
    return table


def describe_summary(table: pd.DataFrame) -> str:
    done = table[table.status == "done"]
    failed = table[table.status != "done"]
    lines = [f"{len(done)} of {len(table)} inputs tiled, {int(done.patch_count.sum())} patches"]
    for row in failed.itertuples():
        # The message is "<path>: <reason>: <detail>": shown once, after the file name.
        lines.append(f"  FAILED {row.source}: {str(row.message).removeprefix(f'{row.path}: ')}")
    return "\n".join(lines)
