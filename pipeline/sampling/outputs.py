"""What the sampling stages write (docs/data_contract.md, stages 5 and 6): the file names the
writers in `pipeline.sampling.stage` use, and the readers evaluation and the report use.

Patch samples, ``OUT/samples/<dataset>/``: ``generated/`` and ``real/`` PNGs, ``conditions.npy``
(row i = manifest row i), ``manifest.parquet``, ``grid.jpg`` and ``sample.json``.
Large images, ``OUT/large_images/<dataset>/``: ``manifest.parquet`` (one row per region),
``large_images.json``, and per region ``region-NNN/`` with the images, ``embeddings.npy``
([k, k, D]) and ``region.json``.
Reference-free images, ``OUT/generated/<dataset>/``: ``manifest.parquet`` (one row per image),
``generated.json``, and per image ``image-NNN/`` with the image, ``grid.npy`` (rows, cols, D),
``tissue.npy`` and ``image.json``.
The manifests, not a folder listing, say which files are samples, so a stray file in a folder
never enters the statistics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipeline.errors import StageOutputError
from pipeline.io.stage_files import read_json_file, read_npy_file, read_parquet_file

MANIFEST = "manifest.parquet"
# Patch samples
GENERATED_DIR, REAL_DIR = "generated", "real"
CONDITIONS = "conditions.npy"
GRID = "grid.jpg"
SAMPLES_SUMMARY = "sample.json"
PATCH_COLUMNS = ("sample_id", "generated", "real")
# Large images
REGION_RECORD = "region.json"
REGION_EMBEDDINGS = "embeddings.npy"
LARGE_IMAGES_SUMMARY = "large_images.json"
# Aerial regions: every band, georeferenced (the RGB previews are the PNG / pyramidal TIFF).
GENERATED_GEOTIFF, REFERENCE_GEOTIFF = "generated.geo.tif", "reference.geo.tif"
IMAGE_COLUMNS = ("generated_png", "generated_tif", "reference_png", "reference_tif", "generated_geotiff",
                 "reference_geotiff")
REGION_COLUMNS = ("region", "k")
# Reference-free large images (the generate stage)
GENERATED_IMAGE_RECORD = "image.json"
GRID_EMBEDDINGS, GRID_TISSUE = "grid.npy", "tissue.npy"
GENERATED_IMAGES_SUMMARY = "generated.json"
# Per-region facts of a large-image manifest; the other columns are the run's sampler settings.
REGION_FACTS = {"region", "input_id", "col", "row", "k", "held_out", *IMAGE_COLUMNS, "embeddings", "mpp", "dataset"}


def region_folder(number: int) -> str:
    return f"region-{number:03d}"


def image_folder(number: int) -> str:
    return f"image-{number:03d}"


def _plain(value: Any) -> Any:
    """A parquet / NumPy value as plain JSON data."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def _read_manifest(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    manifest = read_parquet_file(path, required)
    if manifest.empty:
        raise StageOutputError(f"{path}: no rows")
    return manifest


def _read_array(path: Path) -> np.ndarray:
    return read_npy_file(path).astype(np.float32, copy=False)


def _existing(folder: Path, relative: list[str], what: str) -> tuple[Path, ...]:
    paths = tuple(folder / r for r in relative)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise StageOutputError(f"{folder}/{MANIFEST} lists {len(missing)} {what} file(s) that do not exist, "
                               f"e.g. {', '.join(missing[:3])}")
    return paths


@dataclass(frozen=True, eq=False)
class PatchSamples:
    folder: Path
    dataset: str
    mpp: float | None
    settings: dict[str, Any]         # sample.json without dataset and mpp: model, sampler settings, ...
    embedding_key: str | None
    sample_ids: tuple[str, ...]      # one per manifest row
    generated: tuple[Path, ...]      # one per manifest row
    real: tuple[Path, ...]           # one per manifest row (a real patch may condition several rows)
    conditions: np.ndarray           # float32 [N, D], row i conditioned generated[i]

    @property
    def unique_real(self) -> list[Path]:
        """The real set for the distances: each real patch once, however many samples it conditioned."""
        return list(dict.fromkeys(self.real))

    @property
    def sampler(self) -> dict[str, Any]:
        """The sampler's settings (sampler, steps, guidance_scale, ...)."""
        return self.settings.get("sampler") or {}

    @property
    def random_weights(self) -> bool:
        return bool(self.settings.get("random_weights"))

    @property
    def random_parts(self) -> list[str]:
        """What of the model was randomly initialised (outputs of older versions: the autoencoder)."""
        return random_parts_of(self.settings)


def read_samples(folder: str | Path) -> PatchSamples:
    folder = Path(folder)
    if not folder.is_dir():
        raise StageOutputError(f"{folder}: patch samples folder not found")
    settings = read_json_file(folder / SAMPLES_SUMMARY)
    manifest = _read_manifest(folder / MANIFEST, PATCH_COLUMNS)
    conditions_path = folder / CONDITIONS
    conditions = _read_array(conditions_path)
    if conditions.ndim != 2 or len(conditions) != len(manifest):
        raise StageOutputError(f"{conditions_path}: shape {conditions.shape}, expected [{len(manifest)}, D] "
                               f"(one row per manifest row)")
    return PatchSamples(
        folder=folder,
        dataset=str(settings.get("dataset") or folder.name),
        mpp=settings.get("mpp"),
        settings={k: v for k, v in settings.items() if k not in ("dataset", "mpp")},
        embedding_key=settings.get("embedding_key"),
        sample_ids=tuple(map(str, manifest.sample_id)),
        generated=_existing(folder, list(manifest.generated), "generated"),
        real=_existing(folder, list(manifest.real), "real"),
        conditions=conditions,
    )


@dataclass(frozen=True, eq=False)
class GeneratedRegion:
    name: str                        # its folder, region-NNN
    k: int
    input_id: str | None
    col: int | None                  # grid index of its top-left patch
    row: int | None
    generated: Path
    reference: Path
    embeddings: np.ndarray           # float32 [k, k, D]; cell (r, c) conditioned the patch-sized square (r, c)
    settings: dict[str, Any]         # the manifest row's other columns: mode, sampler, seed, width, seam score, ...
    info: dict[str, Any] = field(default_factory=dict)  # region.json
    generated_geotiff: Path | None = None  # every band, georeferenced (aerial regions only)
    reference_geotiff: Path | None = None


@dataclass(frozen=True, eq=False)
class LargeImages:
    folder: Path
    dataset: str
    mpp: float | None
    sampler: dict[str, Any]          # settings shared by every region
    varying: list[str]               # settings columns that differ between regions
    embedding_key: str | None
    regions: list[GeneratedRegion]

    @property
    def random_weights(self) -> bool:
        return any(region.settings.get("random_weights") for region in self.regions)

    @property
    def random_parts(self) -> list[str]:
        return list(dict.fromkeys(part for region in self.regions for part in random_parts_of(region.info or
                                                                                             region.settings)))


def random_parts_of(record: dict[str, Any]) -> list[str]:
    """The `random_parts` a stage record holds (older records: the autoencoder, when `random_weights`)."""
    parts = record.get("random_parts")
    if parts is None:
        return ["autoencoder"] if record.get("random_weights") else []
    return [str(part) for part in parts]


def _image_path(row: pd.Series, side: str) -> Any:
    """The region's PNG, or its TIFF when the image was too large for a PNG."""
    for column in (f"{side}_png", f"{side}_tif"):
        value = row.get(column)
        if isinstance(value, str) and value:
            return value
    return None


def _region_name(value: Any) -> str:
    return region_folder(int(value)) if isinstance(value, (int, np.integer)) else str(value)


def _read_region(folder: Path, manifest_path: Path, row: pd.Series) -> GeneratedRegion:
    name, k = _region_name(row["region"]), int(row["k"])
    images = {side: _image_path(row, side) for side in ("generated", "reference")}
    for side, path in images.items():
        if path is None:
            raise StageOutputError(f"{manifest_path}: region {name} has neither {side}_png nor {side}_tif")
    embeddings_path = folder / name / REGION_EMBEDDINGS
    embeddings = _read_array(embeddings_path)
    if embeddings.ndim != 3 or embeddings.shape[:2] != (k, k):
        raise StageOutputError(f"{embeddings_path}: shape {embeddings.shape}, expected [{k}, {k}, D] (k = {k})")
    info_path = folder / name / REGION_RECORD
    info = read_json_file(info_path) if info_path.exists() else {}
    generated, reference = _existing(folder, [images["generated"], images["reference"]], f"region {name}")
    place = {c: _plain(row.get(c)) for c in ("input_id", "col", "row")}
    settings = {c: _plain(v) for c, v in row.items() if c not in REGION_FACTS}
    geotiffs = {side: _plain(row.get(f"{side}_geotiff")) for side in ("generated", "reference")}
    geotiffs = {side: _existing(folder, [path], f"region {name}")[0] if isinstance(path, str) and path else None
                for side, path in geotiffs.items()}
    return GeneratedRegion(name, k, place["input_id"], place["col"], place["row"], generated, reference, embeddings,
                           settings, info, geotiffs["generated"], geotiffs["reference"])


def read_large_images(folder: str | Path) -> LargeImages:
    folder = Path(folder)
    if not folder.is_dir():
        raise StageOutputError(f"{folder}: large-image folder not found")
    manifest_path = folder / MANIFEST
    manifest = _read_manifest(manifest_path, REGION_COLUMNS)
    regions = [_read_region(folder, manifest_path, row) for _, row in manifest.iterrows()]
    widths = {region.embeddings.shape[2] for region in regions}
    if len(widths) > 1:
        raise StageOutputError(f"{folder}: regions' {REGION_EMBEDDINGS} differ in width ({sorted(widths)}): "
                               "not one encoder")
    shared = [c for c in manifest.columns if c not in REGION_FACTS and manifest[c].astype(str).nunique() == 1]
    varying = [c for c in manifest.columns if c not in REGION_FACTS and c not in shared]
    sampler = {c: _plain(manifest[c].iloc[0]) for c in shared}
    summary_path = folder / LARGE_IMAGES_SUMMARY
    summary = read_json_file(summary_path) if summary_path.exists() else {}
    embedding_key = (sampler.get("embedding_key") or regions[0].info.get("embedding_key")
                     or summary.get("embedding_key"))
    dataset = manifest["dataset"].iloc[0] if "dataset" in manifest.columns else regions[0].info.get("dataset")
    mpp = _plain(manifest["mpp"].iloc[0]) if "mpp" in manifest.columns else regions[0].info.get("mpp")
    if "mpp" in manifest.columns and manifest["mpp"].nunique() > 1:
        raise StageOutputError(f"{manifest_path}: regions at different resolutions "
                               f"({sorted(manifest['mpp'].unique())} um/px) cannot form one crop set")
    return LargeImages(folder, str(dataset or folder.name), mpp, sampler, varying, embedding_key, regions)


@dataclass(frozen=True, eq=False)
class ReferenceFreeImage:
    name: str                        # its folder, image-NNN
    generated: Path                  # the PNG, or the pyramidal TIFF when too large for a PNG
    grid: np.ndarray                 # (rows, cols, D) float32: the sampled embeddings, zeros at background
    tissue: np.ndarray               # (rows, cols) bool: where the image is tissue (elsewhere glass)
    settings: dict[str, Any]         # the manifest row's other columns: seed, mode, tissue_fraction, ...
    geotiff: Path | None = None      # every band, at the ground resolution, no CRS (aerial datasets only)


@dataclass(frozen=True, eq=False)
class ReferenceFreeImages:
    folder: Path
    dataset: str
    images: list[ReferenceFreeImage]


def read_generated_images(folder: str | Path) -> ReferenceFreeImages:
    """The generate stage's images, their grids and masks (checked to agree in shape)."""
    folder = Path(folder)
    manifest_path = folder / MANIFEST
    manifest = _read_manifest(manifest_path, ("image", "grid", "tissue"))
    images = []
    for _, row in manifest.iterrows():
        name = str(row["image"])
        image = _image_path(row, "generated")
        if image is None:
            raise StageOutputError(f"{manifest_path}: image {name} has neither generated_png nor generated_tif")
        (path,) = _existing(folder, [image], f"image {name}")
        grid, tissue = _read_array(folder / row["grid"]), _read_array(folder / row["tissue"])
        if grid.ndim != 3 or tissue.shape != grid.shape[:2]:
            raise StageOutputError(f"{folder / name}: grid {grid.shape} and tissue mask {tissue.shape} do not agree")
        geotiff = _plain(row.get("generated_geotiff"))
        geotiff = _existing(folder, [geotiff], f"image {name}")[0] if isinstance(geotiff, str) and geotiff else None
        settings = {c: _plain(v) for c, v in row.items() if c not in ("image", "grid", "tissue", "generated_png",
                                                                      "generated_tif", "generated_geotiff")}
        images.append(ReferenceFreeImage(name, path, grid, tissue.astype(bool), settings, geotiff))
    dataset = str(manifest["dataset"].iloc[0]) if "dataset" in manifest.columns and len(manifest) else folder.name
    return ReferenceFreeImages(folder, dataset, images)
