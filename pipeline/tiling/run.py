"""Entry points of the tiling stage: one input, and the dataset summary."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import DatasetSpec
from pipeline.tiling.outputs import describe_summary, summarize_dataset, tile_input


def _opener(kind: str):
    # Imported lazily: a slide-only run need not load rasterio, and vice versa.
    if kind == "wsi":
        from pipeline.tiling.slide import open_slide_source
        return open_slide_source
    if kind == "aerial":
        from pipeline.tiling.aerial import open_aerial_source
        return open_aerial_source
    raise ValueError(f"unknown dataset kind {kind!r}")


def tile_one(spec: DatasetSpec, input_id: str, out_dir: str | Path) -> dict[str, Any]:
    """Tile the input ``input_id`` of ``spec`` into ``out_dir`` and return its status."""
    return tile_input(spec, input_id, spec.inputs[input_id], out_dir, _opener(spec.kind))


def tile_dataset(spec: DatasetSpec, out_root: str | Path) -> str:
    """Tile every input of a dataset in this process (no Snakemake) and write the summary."""
    out_root = Path(out_root)
    folders = []
    for input_id in spec.inputs:
        folder = out_root / "inputs" / input_id
        tile_one(spec, input_id, folder)
        folders.append(folder)
    table = summarize_dataset(folders, out_root / "status.tsv", out_root / "manifest.parquet")
    return describe_summary(table)
