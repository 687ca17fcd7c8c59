"""What the viewer shows: the large-image stage's regions, read from its folders.

Reads ``OUT/large_images/<dataset>/`` (``manifest.parquet``, ``region-NNN/region.json``,
``large_images.json``; docs/data_contract.md, stage 6) and, for the region's place on its slide,
the embedding index ``OUT/embeddings/<dataset>/index.parquet`` (slide file, x, y of the top-left
patch). A small reader of its own for now; the sampling stage's reader replaces it once it exists.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from pipeline.errors import PipelineError
from pipeline.io.large_image_files import UM_PER_M
from pipeline.io.stage_files import read_json_file

MANIFEST = "manifest.parquet"


@dataclass(frozen=True)
class Region:
    """One large image: its files and where it came from."""

    dataset: str
    name: str  # region-NNN
    generated: Path  # the pyramidal TIFF where there is one, else the PNG
    reference: Path | None  # the real region, where there is one (not for reference-free images)
    record: dict[str, Any]  # region.json
    model: str | None  # from large_images.json
    slide: str | None  # the input's file name, from the embedding index
    x: float | None  # top-left corner of the region on the slide (level-0 / source pixels)
    y: float | None
    aerial: bool  # ground metres per pixel (the index has a CRS), else micrometres
    crs: str | None  # aerial: the source's coordinate reference system

    @property
    def title(self) -> str:
        return f"{self.dataset} / {self.name}"

    @property
    def pixel_size_um(self) -> float:
        """The recorded resolution in µm/px (aerial datasets record metres per pixel)."""
        mpp = float(self.record["mpp"])
        return mpp * UM_PER_M if self.aerial else mpp


def read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise PipelineError(f"{path}: not found (an unfinished large-image run? rerun `snakemake large_image`)")
    return read_json_file(path)


def read_table(path: Path) -> pd.DataFrame:
    try:
        return pd.read_parquet(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise PipelineError(f"{path}: not a readable Parquet table ({exc})") from exc


def dataset_folders(results_dir: Path, datasets: list[str] | None) -> list[Path]:
    """The large-image folders of the given datasets (each must exist), or every finished one."""
    root = results_dir / "large_images"
    if datasets:
        folders = [root / name for name in datasets]
        for folder in folders:
            if not (folder / MANIFEST).is_file():
                raise PipelineError(f"{folder / MANIFEST}: not found (run `snakemake large_image` first)")
        return folders
    return sorted(folder for folder in root.glob("*") if (folder / MANIFEST).is_file())


def _present(value: Any) -> bool:
    return isinstance(value, str) and bool(value)


def _placement(index: pd.DataFrame | None, key: str | None) -> dict[str, Any]:
    """Slide, x, y and unit of the region's top-left patch from the embedding index."""
    rows = index[index.key == key] if index is not None and "key" in index else ()
    if not len(rows):
        return {"slide": None, "x": None, "y": None, "aerial": False, "crs": None}
    row = rows.iloc[0]

    def value(name: str) -> Any:
        found = row.get(name)
        return None if found is None or (isinstance(found, float) and math.isnan(found)) else found

    return {"slide": value("slide") or value("source"), "x": value("x"), "y": value("y"),
            "aerial": value("crs") is not None or value("gsd") is not None, "crs": value("crs")}


def read_regions(results_dir: str | Path, datasets: list[str] | None = None) -> list[Region]:
    """Every region of the datasets' large-image folders, in manifest order."""
    results_dir = Path(results_dir)
    regions = []
    for folder in dataset_folders(results_dir, datasets):
        manifest = read_table(folder / MANIFEST)
        if "region" not in manifest:
            raise PipelineError(f"{folder / MANIFEST}: no 'region' column")
        summary_path = folder / "large_images.json"
        summary = read_json(summary_path) if summary_path.is_file() else {}
        index_path = results_dir / "embeddings" / folder.name / "index.parquet"
        index = read_table(index_path) if index_path.is_file() else None
        for row in manifest.to_dict("records"):
            record = read_json(folder / row["region"] / "region.json")
            generated = row.get("generated_tif") if _present(row.get("generated_tif")) else row.get("generated_png")
            if not _present(generated):
                raise PipelineError(f"{folder / MANIFEST}: region {row['region']} names no generated image")
            reference = next((row[c] for c in ("reference_tif", "reference_png") if _present(row.get(c))), None)
            for path in [generated] + ([reference] if reference else []):
                if not (folder / path).is_file():
                    raise PipelineError(f"{folder / path}: listed in {folder / MANIFEST} but not found")
            if "mpp" not in record:
                raise PipelineError(f"{folder / row['region'] / 'region.json'}: no 'mpp'")
            keys = record.get("keys") or [[None]]
            regions.append(Region(
                dataset=str(record.get("dataset", folder.name)), name=str(row["region"]),
                generated=folder / generated, reference=folder / reference if reference else None, record=record,
                model=summary.get("model"), **_placement(index, keys[0][0])))
    return regions
