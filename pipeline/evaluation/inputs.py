"""Read the sampling stages' outputs (docs/data_contract.md) and cut large images into crops.

Patch samples, ``OUT/samples/<dataset>/``: ``generated/`` and ``real/`` PNGs, ``conditions.npy``
(row i = manifest row i), ``manifest.parquet`` and ``sample.json``.
Large images, ``OUT/large_images/<dataset>/``: ``manifest.parquet`` (one row per region) and per
region ``region-NNN/embeddings.npy`` ([k, k, D]) and ``region.json``.
The manifests, not a folder listing, say which files are samples, so a stray file in a folder
never enters the statistics.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.evaluation.settings import EvaluationError
from pipeline.io.shards import encode_image

CROP_SIZE = 256  # large images are compared on the 256 px grid their embeddings describe
PATCH_COLUMNS = ("sample_id", "generated", "real")
REGION_COLUMNS = ("region", "k")
# Per-region facts of a large-image manifest; the other columns are the run's sampler settings.
REGION_FACTS = {"region", "input_id", "col", "row", "k", "held_out", "generated_png", "generated_tif",
                "reference_png", "reference_tif", "embeddings", "mpp", "dataset"}


def plain(value: Any) -> Any:
    """A parquet / NumPy value as plain JSON data."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, float) and np.isnan(value):
        return None
    return value


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{path}: cannot read: {exc}") from exc
    if not isinstance(data, dict):
        raise EvaluationError(f"{path}: expected a JSON object")
    return data


def _read_manifest(path: Path, required: tuple[str, ...]) -> pd.DataFrame:
    try:
        manifest = pd.read_parquet(path)
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{path}: cannot read: {exc}") from exc
    missing = [c for c in required if c not in manifest.columns]
    if missing:
        raise EvaluationError(f"{path}: missing column(s) {', '.join(missing)}")
    if manifest.empty:
        raise EvaluationError(f"{path}: no rows, nothing to evaluate")
    return manifest


def _existing(folder: Path, relative: list[str], what: str) -> list[Path]:
    paths = [folder / r for r in relative]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise EvaluationError(f"{folder}/manifest.parquet lists {len(missing)} {what} file(s) that do not exist, "
                              f"e.g. {', '.join(missing[:3])}")
    return paths


@dataclass
class PatchSamples:
    folder: Path
    dataset: str
    mpp: float | None
    sampler: dict[str, Any]          # sample.json without dataset and mpp
    embedding_key: str | None
    generated: list[Path]            # one per manifest row
    real: list[Path]                 # one per manifest row (a real patch may condition several rows)
    conditions: np.ndarray           # float32 [N, D], row i conditioned generated[i]

    @property
    def unique_real(self) -> list[Path]:
        """The real set for the distances: each real patch once, however many samples it conditioned."""
        return list(dict.fromkeys(self.real))


def read_patch_samples(folder: str | Path) -> PatchSamples:
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"{folder}: patch samples folder not found")
    settings = _read_json(folder / "sample.json")
    manifest = _read_manifest(folder / "manifest.parquet", PATCH_COLUMNS)
    conditions_path = folder / "conditions.npy"
    try:
        conditions = np.load(conditions_path).astype(np.float32, copy=False)
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{conditions_path}: cannot read: {exc}") from exc
    if conditions.ndim != 2 or len(conditions) != len(manifest):
        raise EvaluationError(f"{conditions_path}: shape {conditions.shape}, expected [{len(manifest)}, D] "
                              f"(one row per manifest row)")
    sampler = {k: v for k, v in settings.items() if k not in ("dataset", "mpp")}
    return PatchSamples(
        folder=folder,
        dataset=str(settings.get("dataset") or folder.name),
        mpp=settings.get("mpp"),
        sampler=sampler,
        embedding_key=settings.get("embedding_key"),
        generated=_existing(folder, list(manifest.generated), "generated"),
        real=_existing(folder, list(manifest.real), "real"),
        conditions=conditions,
    )


@dataclass
class Region:
    name: str
    k: int
    generated: Path
    reference: Path
    embeddings: np.ndarray           # float32 [k, k, D]; cell (r, c) is the crop at (r*256, c*256)
    info: dict[str, Any] = field(default_factory=dict)  # region.json


@dataclass
class LargeImages:
    folder: Path
    dataset: str
    mpp: float | None
    sampler: dict[str, Any]          # settings shared by every region
    varying: list[str]               # settings columns that differ between regions
    embedding_key: str | None
    regions: list[Region]


def _region_folder(value: Any) -> str:
    if isinstance(value, (int, np.integer)):
        return f"region-{int(value):03d}"
    return str(value)


def _image_path(row: pd.Series, side: str) -> Any:
    """The region's PNG, or its TIFF when the image was too large for a PNG."""
    for column in (f"{side}_png", f"{side}_tif"):
        value = row.get(column)
        if isinstance(value, str) and value:
            return value
    return None


def read_large_images(folder: str | Path) -> LargeImages:
    folder = Path(folder)
    if not folder.is_dir():
        raise EvaluationError(f"{folder}: large-image folder not found")
    manifest_path = folder / "manifest.parquet"
    manifest = _read_manifest(manifest_path, REGION_COLUMNS)
    regions = []
    for _, row in manifest.iterrows():
        name, k = _region_folder(row["region"]), int(row["k"])
        generated, reference = _image_path(row, "generated"), _image_path(row, "reference")
        for side, path in (("generated", generated), ("reference", reference)):
            if path is None:
                raise EvaluationError(f"{manifest_path}: region {name} has neither {side}_png nor {side}_tif")
        region_dir = folder / name
        embeddings_path = region_dir / "embeddings.npy"
        try:
            embeddings = np.load(embeddings_path).astype(np.float32, copy=False)
        except (OSError, ValueError) as exc:
            raise EvaluationError(f"{embeddings_path}: cannot read: {exc}") from exc
        if embeddings.ndim != 3 or embeddings.shape[:2] != (k, k):
            raise EvaluationError(f"{embeddings_path}: shape {embeddings.shape}, expected [{k}, {k}, D] (k = {k})")
        info_path = region_dir / "region.json"
        info = _read_json(info_path) if info_path.exists() else {}
        generated_path, reference_path = _existing(folder, [generated, reference], f"region {name}")
        for path in (generated_path, reference_path):
            _check_grid_fits(path, k)
        regions.append(Region(name, k, generated_path, reference_path, embeddings, info))
    widths = {region.embeddings.shape[2] for region in regions}
    if len(widths) > 1:
        raise EvaluationError(f"{folder}: regions' embeddings.npy differ in width ({sorted(widths)}): not one encoder")
    shared = [c for c in manifest.columns if c not in REGION_FACTS and manifest[c].astype(str).nunique() == 1]
    varying = [c for c in manifest.columns if c not in REGION_FACTS and c not in shared]
    sampler = {c: plain(manifest[c].iloc[0]) for c in shared}
    summary_path = folder / "large_images.json"
    summary = _read_json(summary_path) if summary_path.exists() else {}
    embedding_key = (sampler.get("embedding_key") or regions[0].info.get("embedding_key")
                     or summary.get("embedding_key"))
    dataset = manifest["dataset"].iloc[0] if "dataset" in manifest.columns else regions[0].info.get("dataset")
    mpp = plain(manifest["mpp"].iloc[0]) if "mpp" in manifest.columns else regions[0].info.get("mpp")
    if "mpp" in manifest.columns and manifest["mpp"].nunique() > 1:
        raise EvaluationError(f"{manifest_path}: regions at different resolutions "
                              f"({sorted(manifest['mpp'].unique())} um/px) cannot form one crop set")
    return LargeImages(folder, str(dataset or folder.name), mpp, sampler, varying, embedding_key, regions)


@contextlib.contextmanager
def _large_image_reads() -> Iterator[None]:
    # Our own large images may exceed PIL's decompression-bomb limit (meant for untrusted files).
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def read_rgb(path: Path) -> np.ndarray:
    """An image file as HxWx3 uint8; of a pyramidal TIFF, the full-resolution level."""
    try:
        if path.suffix.lower() in (".tif", ".tiff"):
            with contextlib.suppress(ImportError):
                import tifffile  # JPEG-compressed pyramids (tifffile + imagecodecs, as they are written)

                image = tifffile.imread(path)
                return image[..., :3] if image.ndim == 3 else np.repeat(image[..., None], 3, axis=2)
        with _large_image_reads(), Image.open(path) as image:
            return np.asarray(image.convert("RGB"))
    except (OSError, ValueError) as exc:
        raise EvaluationError(f"{path}: cannot read the image: {exc}") from exc


def _check_grid_fits(path: Path, k: int, size: tuple[int, int] | None = None) -> None:
    """Stop before any network is loaded when an image cannot hold its k x k grid of crops."""
    if size is None:
        try:  # the header only
            with _large_image_reads(), Image.open(path) as image:
                size = image.size
        except OSError:
            return  # not for PIL (some TIFFs): checked when the pixels are read
    side = k * CROP_SIZE
    if size[0] < side or size[1] < side:
        raise EvaluationError(f"{path}: {size[0]}x{size[1]} px is smaller than the {k}x{k} grid of "
                              f"{CROP_SIZE} px crops ({side}x{side} px)")


def grid_crops(image: np.ndarray, k: int, path: Path) -> list[np.ndarray]:
    """The k x k grid of 256 px crops, row-major: crop (r, c) starts at pixel (r*256, c*256)."""
    _check_grid_fits(path, k, (image.shape[1], image.shape[0]))
    return [image[r * CROP_SIZE:(r + 1) * CROP_SIZE, c * CROP_SIZE:(c + 1) * CROP_SIZE]
            for r in range(k) for c in range(k)]


def write_region_crops(region: Region, folder: Path) -> tuple[list[Path], list[Path]]:
    """Write the generated and reference crops of one region as lossless PNGs under ``folder``
    (clean-fid reads image files); return (generated crops, reference crops), row-major."""
    written = []
    for side, path in (("generated", region.generated), ("reference", region.reference)):
        target = folder / side
        target.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, crop in enumerate(grid_crops(read_rgb(path), region.k, path)):
            r, c = divmod(index, region.k)
            out = target / f"{region.name}_r{r:03d}_c{c:03d}.png"
            out.write_bytes(encode_image(np.ascontiguousarray(crop), "png"))
            paths.append(out)
        written.append(paths)
    return written[0], written[1]
