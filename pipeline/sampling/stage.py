"""The `sample` and `large_image` stages: real held-out embeddings in, images and manifests out.

Outputs (see docs/data_contract.md, stages 5 and 6; names and readers in
`pipeline.sampling.outputs`):

- ``OUT/samples/<dataset>/``: ``generated/<key>.png``, ``real/<key>.png``, ``conditions.npy``,
  ``manifest.parquet``, ``grid.jpg``, ``sample.json``; written as one folder, atomically.
- ``OUT/large_images/<dataset>/``: ``region-NNN/`` folders (each atomic, reused by a re-run with the
  same settings) and ``manifest.parquet``, written last. Images are RGB (PNG, pyramidal TIFF: the
  first three bands); an aerial region also gets ``generated.geo.tif`` and ``reference.geo.tif``,
  every band, georeferenced (the region's CRS and affine).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from pipeline.embedding.outputs import read_embedding_index, read_patches
from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_dir, atomic_file, remove_path, write_text_atomic
from pipeline.io.device import resolve_device
from pipeline.io.geotiff import write_geotiff
from pipeline.io.large_image_files import StreamedRows, release_mapped_pages, rgb_view, write_png, write_pyramid_tiff
from pipeline.io.sheets import pair_sheet, write_jpeg
from pipeline.models import RLDiffPipeline, load_pipeline
from pipeline.sampling.config import LargeImageConfig, LargeImageSettings
from pipeline.sampling.fusion import distributed_rank
from pipeline.sampling.large_image import LargeImageSampler, decoded_bands, large_image_seam_score
from pipeline.sampling.outputs import (CONDITIONS, GENERATED_DIR, GENERATED_GEOTIFF, GRID, IMAGE_COLUMNS,
                                       LARGE_IMAGES_SUMMARY, MANIFEST, REAL_DIR, REFERENCE_GEOTIFF, REGION_EMBEDDINGS,
                                       REGION_RECORD, SAMPLES_SUMMARY, region_folder)
from pipeline.sampling.patches import PatchSampler, PatchSamplingConfig
from pipeline.sampling.references import (Georeference, find_regions, held_out_rows, region_georeference, region_grid,
                                          region_rows)


def embedding_key_of(model: RLDiffPipeline, fallback: str | None) -> str:
    """The embedding the model was trained on (recorded in its export), else the given one."""
    key = model.embedding_key or fallback
    if not key:
        raise PipelineError(f"{model.source}: the model does not record its embedding key; name the encoder")
    return key


def sample_patches(model_dir: str | Path, embeddings_dir: str | Path, out_dir: str | Path, *, dataset: str,
                   mpp: float, holdout_inputs: tuple[str, ...], holdout_fraction: float,
                   config: PatchSamplingConfig, embedding_key: str | None = None,
                   grid_pairs: int = 16) -> pd.DataFrame:
    """One generated patch per held-out real patch (at most config.max_samples), conditioned on its embedding."""
    device = resolve_device(config.device)
    model = load_pipeline(model_dir).to(device)
    key = embedding_key_of(model, embedding_key)
    index = read_embedding_index(embeddings_dir)
    rows = held_out_rows(index.rows, holdout_inputs, holdout_fraction, config.max_samples)
    if rows.empty:
        raise PipelineError(f"{embeddings_dir}: no held-out patches (holdout inputs {list(holdout_inputs)}, "
                            f"fraction {holdout_fraction}); hold out an input or raise holdout.fraction")
    patches = read_patches(index, rows, key)
    ordered = [patches[k] for k in rows.key]
    conditions = np.stack([p.embedding for p in ordered])
    started = time.perf_counter()
    evaluations = 0
    records, grid_pairs_shown = [], []
    with atomic_dir(out_dir) as temp:
        (temp / GENERATED_DIR).mkdir()
        (temp / REAL_DIR).mkdir()
        sampler = PatchSampler(model, config)
        for batch in sampler.batches(conditions):
            evaluations += batch.unet_evaluations
            for offset, image in enumerate(batch.images):
                patch = ordered[batch.first_index + offset]
                generated, real = f"{GENERATED_DIR}/{patch.key}.png", f"{REAL_DIR}/{patch.key}.png"
                Image.fromarray(rgb_view(image)[:]).save(temp / generated)  # the RGB of R, G, B, NIR
                Image.fromarray(patch.image).save(temp / real)
                records.append({"sample_id": patch.key, "key": patch.key, "input_id": patch.input_id,
                                "col": patch.col, "row": patch.row, "generated": generated, "real": real,
                                "seed_index": batch.first_index + offset})
                if len(grid_pairs_shown) < grid_pairs:
                    grid_pairs_shown.append((patch.image, rgb_view(image)[:], patch.key))
        manifest = pd.DataFrame.from_records(records)
        manifest.to_parquet(temp / MANIFEST, index=False)
        np.save(temp / CONDITIONS, conditions.astype(np.float32))
        write_jpeg(pair_sheet(grid_pairs_shown, side=ordered[0].image.shape[0]), temp / GRID, quality=92)
        summary = {
            "dataset": dataset, "mpp": mpp, "model": str(model_dir), "embedding_key": key,
            "random_weights": model.random_weights, "random_parts": model.random_parts, "samples": len(manifest),
            "held_out": {"inputs": list(holdout_inputs), "fraction": holdout_fraction},
            "sampler": asdict(config), "unet_evaluations": evaluations,
            "seconds": round(time.perf_counter() - started, 3), "device": str(device),
        }
        (temp / SAMPLES_SUMMARY).write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return manifest


def _settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]


def pixel_size_um(resolution: float, kind: str) -> float:
    """Micrometres per pixel, as TIFF readers want it: slides give um/px, aerial datasets m/px."""
    return resolution * 1e6 if kind == "aerial" else resolution


def write_generated_image(sampler: LargeImageSampler, folder: Path, pixel_um: float, png_max_side: int,
                          tiff: bool, jpeg_quality: int, georeference: Georeference | None = None,
                          band_names: list[str] | None = None) -> dict[str, Any]:
    """Sample, decode (streamed into a disk memmap, glass white) and write `generated.png` (up to
    png_max_side) and/or the pyramidal `generated.tif` into `folder`; returns the files and costs.

    PNG and pyramidal TIFF are RGB (the first three bands of the decoder's output); with a
    georeference, every band also goes into a GeoTIFF."""
    model, config = sampler.model, sampler.config
    latent, stats = sampler.sample()
    factor = model.downsampling_factor
    height, width = latent.shape[2] * factor, latent.shape[3] * factor
    canvas_path = folder / "generated.uint8"
    image = np.lib.format.open_memmap(canvas_path, mode="w+", dtype=np.uint8,
                                      shape=(height, width, model.image_bands))
    decode_started = time.perf_counter()
    for top, rows in decoded_bands(model, latent, config, sampler.glass):
        image[top : top + len(rows)] = rows
        image.flush()
        release_mapped_pages(image)  # written rows live on in the file, not in this process
    decode_seconds = time.perf_counter() - decode_started
    files = {}
    if max(height, width) <= png_max_side:
        write_png(folder / "generated.png", rgb_view(image))
        files["generated_png"] = "generated.png"
    if tiff or "generated_png" not in files:
        write_pyramid_tiff(folder / "generated.tif", rgb_view(image), pixel_um, jpeg_quality=jpeg_quality,
                           description="rldiff generated image")
        files["generated_tif"] = "generated.tif"
    if georeference is not None:
        write_geotiff(folder / GENERATED_GEOTIFF, image, georeference.crs, georeference.transform,
                      band_descriptions=band_names, description="rldiff generated image")
        files["generated_geotiff"] = GENERATED_GEOTIFF
    # Glass (white, flat) would read as texture jumps at its edges: scored only for all-tissue images.
    all_tissue = sampler.tissue is None or bool(sampler.tissue.all())
    seam = large_image_seam_score(StreamedRows(image), tuple(latent.shape), config, factor) if all_tissue else None
    del image
    remove_path(canvas_path)
    return {**files, "width": width, "height": height, "seam_score": seam, "windows": stats.windows,
            "steps": stats.steps, "unet_evaluations": stats.unet_evaluations, "unet_calls": stats.unet_calls,
            "sampling_seconds": round(stats.seconds, 3), "decode_seconds": round(decode_seconds, 3)}


def generate_region(model: RLDiffPipeline, grid: np.ndarray, reference: np.ndarray, folder: Path,
                    config: LargeImageConfig, pixel_um: float, png_max_side: int, tiff: bool,
                    jpeg_quality: int, georeference: Georeference | None = None,
                    band_names: list[str] | None = None) -> dict[str, Any]:
    """One region's generated image, reference and embeddings, written into `folder`. PNG and
    pyramidal TIFF are RGB (the first three bands); with a georeference, every band of both also
    goes into a GeoTIFF."""
    record = write_generated_image(LargeImageSampler(model, grid, config), folder, pixel_um, png_max_side, tiff,
                                   jpeg_quality, georeference, band_names)
    files = {}
    if max(reference.shape[:2]) <= png_max_side:
        write_png(folder / "reference.png", rgb_view(reference))
        files["reference_png"] = "reference.png"
    else:
        write_pyramid_tiff(folder / "reference.tif", rgb_view(reference), pixel_um, jpeg_quality=jpeg_quality,
                           description="rldiff reference region")
        files["reference_tif"] = "reference.tif"
    if georeference is not None:
        write_geotiff(folder / REFERENCE_GEOTIFF, reference, georeference.crs, georeference.transform,
                      band_descriptions=band_names, description="rldiff reference region")
        files["reference_geotiff"] = REFERENCE_GEOTIFF
    np.save(folder / REGION_EMBEDDINGS, grid)
    generated = {name: record.pop(name) for name in IMAGE_COLUMNS if name in record}
    return {**generated, **files, **record}


def generate_large_images(model_dir: str | Path, embeddings_dir: str | Path, out_dir: str | Path, *, dataset: str,
                          kind: str, mpp: float, holdout_inputs: tuple[str, ...], settings: LargeImageSettings,
                          seed: int, embedding_key: str | None = None,
                          source_bands: tuple[int, ...] = ()) -> pd.DataFrame:
    """Large images for up to `settings.regions` real k x k regions (held-out inputs first); region
    number i is sampled with seed + i. Aerial regions also get georeferenced GeoTIFFs of every band
    (`source_bands`: the source's band numbers, which name the GeoTIFFs' bands)."""
    out_dir = Path(out_dir)
    k, mode, png_max_side, tiff = settings.k, settings.mode, settings.png_max_side, settings.tiff
    rank, _ = distributed_rank()
    model = load_pipeline(model_dir).to(resolve_device(settings.device))
    key = embedding_key_of(model, embedding_key)
    index = read_embedding_index(embeddings_dir)
    regions = find_regions(index.rows, k, settings.regions, holdout_inputs)
    if not regions:
        raise PipelineError(f"{embeddings_dir}: no {k}x{k} block of adjacent patches in any input; lower large_image.k")
    base = settings.sampler_config(model.latent_size)
    records = []
    for number, region in enumerate(regions):
        config = base.with_(seed=seed + number)
        georeference = region_georeference(index.rows, region) if kind == "aerial" else None
        identity = {"model": str(model_dir), "region": asdict(region), "config": asdict(config), "mpp": mpp,
                    "png_max_side": png_max_side, "tiff": tiff, "embedding_key": key,
                    "jpeg_quality": settings.jpeg_quality}
        if georeference is not None:  # slides' digests stay what they were
            identity["georeference"] = asdict(georeference)
        digest = _settings_digest(identity)
        folder = out_dir / region_folder(number)
        record_path = folder / REGION_RECORD
        if record_path.is_file() and json.loads(record_path.read_text()).get("settings_sha") == digest:
            record = json.loads(record_path.read_text())  # finished by an earlier run with these settings
        else:
            patches = read_patches(index, region_rows(index.rows, region), key)
            grid, reference = region_grid(region, patches, all_bands=georeference is not None)
            if rank > 0:  # under torchrun: the other ranks sample their share of the windows, rank 0 writes
                LargeImageSampler(model, grid, config).sample()
                continue
            with atomic_dir(folder) as temp:
                band_names = [f"source band {band}" for band in source_bands] or None
                files = generate_region(model, grid, reference, temp, config, pixel_size_um(mpp, kind),
                                        png_max_side, tiff, settings.jpeg_quality, georeference, band_names)
                record = {"region": region_folder(number), "input_id": region.input_id, "col": region.col,
                          "row": region.row, "k": region.k, "held_out": region.held_out, "mpp": mpp,
                          "dataset": dataset, "mode": mode, "sampler": config.sampler, "steps": config.steps,
                          "stride": config.stride, "guidance_scale": config.guidance_scale, "seed": config.seed,
                          "random_weights": model.random_weights, "random_parts": model.random_parts,
                          "settings_sha": digest, "embedding_key": key,
                          "keys": [list(row) for row in region.keys], "config": asdict(config), **files}
                if georeference is not None:
                    record["georeference"] = {**asdict(georeference), "transform": list(georeference.transform)}
                (temp / REGION_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        records.append(record)
    if rank > 0:
        return pd.DataFrame()
    manifest = pd.DataFrame.from_records(
        [{name: value for name, value in r.items() if name not in ("keys", "config", "georeference")}
         for r in records])
    for column in IMAGE_COLUMNS:
        if column in manifest:
            manifest[column] = [f"{r}/{v}" if isinstance(v, str) else None for r, v in zip(manifest.region, manifest[column])]
    manifest["embeddings"] = [f"{r}/{REGION_EMBEDDINGS}" for r in manifest.region]
    with atomic_file(out_dir / MANIFEST) as temp:
        manifest.to_parquet(temp, index=False)
    write_text_atomic(out_dir / LARGE_IMAGES_SUMMARY, json.dumps(
        {"dataset": dataset, "regions": len(manifest), "k": k, "mode": mode, "model": str(model_dir),
         "embedding_key": key, "mpp": mpp},
        indent=2, sort_keys=True) + "\n")
    return manifest
