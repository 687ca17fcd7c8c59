"""Stage 1b: stain normalisation of one tiled input towards a target, with tiatoolbox.

tiatoolbox's normaliser (`tiatoolbox.tools.stainnorm`: Macenko, Vahadane or Reinhard) is fitted
once on the target (an H&E image, or a folder of patch images fitted on all their pixels) and
applied to every patch of the input. Each tiling shard ``patches-NNNNNN.tar`` becomes a shard of
the same name with the same keys in the same order; every sample keeps its JSON, plus a ``stain``
record (method, the target's hash, what was fitted on it, whether this patch was normalised).

Background and near-white patches, whose stain estimation is ill-posed (tiatoolbox's contrast
stretch then turns noise into dark "stain"), pass through with their bytes unchanged and are
counted; the test is this module's own, on the raw pixels (`stained_fraction`). A target with too
little tissue fails with `StainTargetError` naming it.

The input's folder is built under a hidden sibling name keyed by the settings, the target and the
tiles (a killed job leaves its finished shards there and a re-run resumes; other settings start
afresh) and renamed into place once its manifest and ``stain.json`` are written.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.io.atomic import move_dir_into_place, remove_path, write_text_atomic
from pipeline.io.hashing import file_sha256
from pipeline.io.shard_loop import process_shards
from pipeline.io.shards import decode_image, encode_image, encode_json, image_field, iter_shard, read_shard, write_shard
from pipeline.stain.outputs import BACKGROUND, ESTIMATION_FAILED, MANIFEST_FILE, STATUS_FILE
from pipeline.stain.settings import StainSettings

# A pixel is stained when the mean optical density of its R, G and B is at least this (Macenko's
# beta, 0.15: white glass is about 0.05, pale eosin about 0.2).
STAINED_OD = 0.15
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


class StainTargetError(PipelineError):
    """The stain target cannot be used: missing, not an image, no images in the folder, or too
    little tissue to fit; the message names it."""


def optical_density(rgb: np.ndarray) -> np.ndarray:
    return -np.log(np.maximum(rgb.astype(np.float64), 1.0) / 255.0)


def stained_fraction(rgb: np.ndarray) -> float:
    """Share of the pixels whose mean optical density is at least STAINED_OD."""
    return float((optical_density(rgb).mean(axis=-1) >= STAINED_OD).mean())


def read_rgb(path: Path) -> np.ndarray:
    """An image file as RGB uint8; transparent pixels (PNGs with alpha) composited onto white."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
                rgba = image.convert("RGBA")
                white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
                return np.array(Image.alpha_composite(white, rgba).convert("RGB"))
            return np.array(image.convert("RGB"))
    except (OSError, ValueError) as exc:  # PIL's UnidentifiedImageError is an OSError
        raise StainTargetError(f"{path}: cannot read the stain target image: {exc}") from exc


def target_files(target: str | Path) -> list[Path]:
    target = Path(target)
    if target.is_file():
        return [target]
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise StainTargetError(f"{target}: the stain target folder holds no image ({', '.join(IMAGE_SUFFIXES)})")
        return files
    raise StainTargetError(f"{target}: the stain target does not exist")


def files_sha256(files: list[Path]) -> str:
    """One file: the sha256 of its bytes; a folder's images: the sha256 of their names and hashes."""
    hashes = [file_sha256(path) for path in files]
    if len(files) == 1:
        return hashes[0]
    return hashlib.sha256("".join(f"{p.name}\0{h}\n" for p, h in zip(files, hashes)).encode()).hexdigest()


def load_target(target: str | Path, min_stained_fraction: float) -> tuple[np.ndarray, str]:
    """The target's pixels (one image, or all of a folder's as one column) and their hash; too little
    tissue is a StainTargetError."""
    files = target_files(target)
    images = [read_rgb(path) for path in files]
    pixels = images[0] if len(images) == 1 else np.concatenate([im.reshape(-1, 1, 3) for im in images])
    fraction = stained_fraction(pixels)
    if fraction < max(min_stained_fraction, 1e-9):
        raise StainTargetError(
            f"{target}: only {fraction:.1%} of the stain target's pixels are stained (mean optical density >= "
            f"{STAINED_OD}; min_stained_fraction is {min_stained_fraction:.1%}): not enough tissue to fit "
            "stain vectors; give an H&E image or patches that are mostly tissue")
    return pixels, files_sha256(files)


@dataclass(frozen=True)
class FittedNormalizer:
    """A normaliser fitted on the target: ``transform`` maps an RGB uint8 patch to its normalised
    copy; ``fitted`` is what was learnt from the target (JSON-ready)."""

    method: str
    transform: Callable[[np.ndarray], np.ndarray]
    fitted: dict[str, Any]
    tiatoolbox_version: str


def fit_normalizer(method: str, target_pixels: np.ndarray, target_name: str) -> FittedNormalizer:
    """tiatoolbox's normaliser for ``method``, fitted on the target's pixels."""
    from pipeline.stain.tia import import_stain_modules, tiatoolbox_version

    stainnorm = import_stain_modules()
    normalizer = stainnorm.get_normalizer(method)
    try:
        with np.errstate(invalid="raise", divide="raise"):
            normalizer.fit(target_pixels.copy())  # tiatoolbox's rgb2od writes into its argument
    except (ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
        raise StainTargetError(f"{target_name}: tiatoolbox's {method} normaliser cannot be fitted on the stain "
                               f"target: {exc}") from exc
    if method == "reinhard":
        fitted = {"target_lab_mean": list(normalizer.target_means), "target_lab_std": list(normalizer.target_stds)}
    else:
        fitted = {"stain_matrix": normalizer.stain_matrix_target.tolist(),
                  "max_concentrations": normalizer.maxC_target.ravel().tolist()}
    values = np.asarray([v for value in fitted.values() for v in np.ravel(value)], dtype=np.float64)
    if not np.isfinite(values).all():
        raise StainTargetError(f"{target_name}: tiatoolbox's {method} normaliser fitted non-finite values on the "
                               f"stain target: {fitted}")
    return FittedNormalizer(method, lambda rgb: normalizer.transform(rgb.copy()), fitted, tiatoolbox_version())


def normalize_patch(rgb: np.ndarray, normalizer: FittedNormalizer, settings: StainSettings) -> tuple[np.ndarray | None, str | None, float]:
    """(normalised patch or None, why it passed through unchanged or None, stained fraction)."""
    fraction = stained_fraction(rgb)
    if fraction < settings.min_stained_fraction:
        return None, BACKGROUND, fraction
    try:
        # NaN and division by zero (e.g. a patch with one colour) would silently become black pixels.
        with np.errstate(invalid="raise", divide="raise"):
            result = normalizer.transform(rgb)
    except (ValueError, FloatingPointError, np.linalg.LinAlgError):
        return None, ESTIMATION_FAILED, fraction
    return result, None, fraction


def stain_shard(source: Path, target: Path, normalizer: FittedNormalizer, record: dict[str, Any],
                settings: StainSettings, jpeg_quality: int, progress=None) -> int:
    """Normalise one tiling shard into ``target`` (atomic); returns the number of samples."""
    out = []
    for sample in read_shard(source):
        field = image_field(sample)
        normalized, skipped, fraction = normalize_patch(decode_image(sample[field]), normalizer, settings)
        meta = json.loads(sample["json"])
        meta["stain"] = {**record, "normalized": normalized is not None, "skipped": skipped,
                         "stained_fraction": round(fraction, 4)}
        image = sample[field] if normalized is None else encode_image(normalized, field, jpeg_quality)
        out.append({"__key__": sample["__key__"], field: image, "json": encode_json(meta)})
        if progress is not None:
            progress.update(1)
    write_shard(target, out)
    return len(out)


def shard_outcomes(folder: Path) -> pd.DataFrame:
    """The ``stain`` record of every sample of a stain folder's shards: key, normalized, skipped (why it
    passed through; "" for a normalised patch, so that the column is text whatever pandas' version), fraction."""
    rows = []
    for shard in sorted(folder.glob("patches-*.tar")):
        for sample in iter_shard(shard):
            stain = json.loads(sample["json"])["stain"]
            rows.append({"key": sample["__key__"], "stain_normalized": stain["normalized"],
                         "stain_skipped": stain["skipped"] or "", "stain_stained_fraction": stain["stained_fraction"]})
    return pd.DataFrame(rows, columns=["key", "stain_normalized", "stain_skipped", "stain_stained_fraction"])


def stain_input(tiles_dir: str | Path, out_dir: str | Path, settings: StainSettings, jpeg_quality: int = 95,
                normalizer: FittedNormalizer | None = None) -> dict[str, Any]:
    """Normalise every patch of one tiled input into ``out_dir`` (shards, manifest.parquet, stain.json);
    returns the stain.json record. ``normalizer``: an already fitted one (tests), else tiatoolbox's."""
    tiles_dir, out_dir = Path(tiles_dir), Path(out_dir)
    started = time.perf_counter()
    pixels, target_sha256 = load_target(settings.target, settings.min_stained_fraction)
    normalizer = normalizer or fit_normalizer(settings.method, pixels, settings.target)
    record = {"method": settings.method, "target_sha256": target_sha256, **normalizer.fitted,
              "min_stained_fraction": settings.min_stained_fraction, "tiatoolbox": normalizer.tiatoolbox_version}
    # Finished shards are kept only for the same record, output format and tiles.
    tiles_manifest = file_sha256(tiles_dir / MANIFEST_FILE)
    fingerprint = hashlib.sha256(json.dumps([record, jpeg_quality, tiles_manifest], sort_keys=True).encode())
    partial = out_dir.parent / f".{out_dir.name}.partial-{fingerprint.hexdigest()[:12]}"
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.parent.glob(f".{out_dir.name}.partial-*"):
        if stale != partial:
            remove_path(stale)

    def normalize(source: Path, target: Path, progress) -> int:
        return stain_shard(source, target, normalizer, record, settings, jpeg_quality, progress)

    def add_outcomes(manifest: pd.DataFrame) -> pd.DataFrame:
        outcomes = shard_outcomes(partial).set_index("key")
        for column in outcomes.columns:
            manifest[column] = outcomes[column].reindex(manifest.key).to_numpy() if len(manifest) else []
        manifest["stain_method"] = settings.method
        manifest["stain_target_sha256"] = target_sha256
        return manifest

    manifest = process_shards(tiles_dir, partial, normalize, add_outcomes)
    skipped = Counter(reason for reason in manifest.get("stain_skipped", []) if reason)
    status = {"input_id": out_dir.name, "target": str(settings.target), **record, "patch_count": len(manifest),
              "normalized": int(manifest["stain_normalized"].sum()) if len(manifest) else 0,
              "passed_through": {BACKGROUND: skipped.get(BACKGROUND, 0),
                                 ESTIMATION_FAILED: skipped.get(ESTIMATION_FAILED, 0)},
              "seconds": round(time.perf_counter() - started, 2)}
    write_text_atomic(partial / STATUS_FILE, json.dumps(status, indent=1, sort_keys=True))
    move_dir_into_place(partial, out_dir)
    return status


def describe(status: dict[str, Any]) -> str:
    passed = status["passed_through"]
    return (f"{status['input_id']}: {status['patch_count']} patches, {status['normalized']} normalised ({status['method']}, "
            f"target {Path(status['target']).name} sha256 {status['target_sha256'][:12]}), passed through unchanged: "
            f"{passed[BACKGROUND]} background, {passed[ESTIMATION_FAILED]} where estimation failed; "
            f"{status['seconds']:.1f} s")
