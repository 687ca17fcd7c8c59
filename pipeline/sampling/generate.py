"""The `generate` stage: reference-free large images. For image i (seed + i): sample a rows x cols
embedding grid and its tissue mask from the grid prior (pipeline.sampling.prior_grid), then render
it with the large-image sampler; positions the mask calls background are glass (white, no UNet
call). A grid without any tissue is drawn again (next seed, up to ``max_draws`` times).

Outputs, ``OUT/generated/<dataset>/`` (docs/data_contract.md, "Stage 6b"; names and reader in
`pipeline.sampling.outputs`): ``image-NNN/`` folders (each atomic, reused by a re-run with the same
settings) with ``generated.png`` and/or ``generated.tif`` (aerial: and ``generated.geo.tif``), ``grid.npy`` (rows, cols, D: unit
embeddings, zeros at background), ``tissue.npy`` (rows, cols bool) and ``image.json``; then
``manifest.parquet`` and ``generated.json``.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_dir, atomic_file, write_text_atomic
from pipeline.io.device import resolve_device
from pipeline.models import load_pipeline
from pipeline.models.prior import load_prior
from pipeline.prior.outputs import read_prior_record
from pipeline.sampling.config import PNG_MAX_SIDE, RenderSettings
from pipeline.sampling.large_image import LargeImageSampler
from pipeline.sampling.outputs import (GENERATED_IMAGES_SUMMARY, GENERATED_IMAGE_RECORD, GRID_EMBEDDINGS,
                                       GRID_TISSUE, MANIFEST, image_folder)
from pipeline.sampling.prior_grid import sample_grids
from pipeline.sampling.references import Georeference
from pipeline.sampling.stage import pixel_size_um, write_generated_image


@dataclass(frozen=True)
class GenerateSettings(RenderSettings):
    """The config's `generate:` table: how many images, their grid, the prior's sampling, the render."""

    count: int = 4
    rows: int = 8  # grid positions (patches) per image side: 8 gives 2048 px at 256 px patches
    cols: int = 8
    prior_steps: int = 50
    prior_guidance_scale: float = 1.0  # classifier-free guidance s of the dataset label (1: none)
    max_draws: int = 8  # grids drawn per image at most, until one has tissue
    png_max_side: int = PNG_MAX_SIDE
    tiff: bool = True
    jpeg_quality: int = 95
    device: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if min(self.count, self.rows, self.cols, self.prior_steps, self.max_draws) < 1:
            raise ValueError("count, rows, cols, prior_steps and max_draws must be positive")
        if self.png_max_side > PNG_MAX_SIDE:
            raise ValueError(f"png_max_side {self.png_max_side}: PNGs are written up to {PNG_MAX_SIDE} px")


class NoTissueDrawnError(PipelineError):
    """The prior gave only background grids for an image."""


def draw_grid(prior, settings: GenerateSettings, dataset: str, seed: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """A grid with tissue: (embeddings, tissue, seed used, draws)."""
    for draw in range(settings.max_draws):
        draw_seed = seed + draw * settings.count  # never another image's first seed
        grids = sample_grids(prior, settings.rows, settings.cols, 1, dataset, steps=settings.prior_steps,
                             guidance_scale=settings.prior_guidance_scale, seed=draw_seed)
        if grids.tissue[0].any():
            return grids.embeddings[0], grids.tissue[0], draw_seed, draw + 1
    raise NoTissueDrawnError(f"{prior.source}: {settings.max_draws} grids of {settings.rows}x{settings.cols} drawn "
                             f"from seed {seed} had no tissue position; train the prior longer")


def generate_images(model_dir: str | Path, prior_dir: str | Path, out_dir: str | Path, *, dataset: str, kind: str,
                    mpp: float, settings: GenerateSettings, seed: int,
                    source_bands: tuple[int, ...] = ()) -> pd.DataFrame:
    """`settings.count` reference-free large images of `dataset`. Aerial images also get a GeoTIFF
    of every band (`source_bands` name them) at the dataset's ground resolution, placed nowhere: no
    CRS, an affine that only scales (a generated image has a pixel size, not a location)."""
    out_dir = Path(out_dir)
    device = resolve_device(settings.device)
    model = load_pipeline(model_dir).to(device)
    prior = load_prior(read_prior_record(prior_dir).model)
    if prior.embedding_dim != model.embedding_dim:
        raise PipelineError(f"{prior_dir}: the prior samples {prior.embedding_dim}-wide embeddings, but the model "
                            f"{model_dir} is conditioned on {model.embedding_dim}-wide ones")
    config = settings.sampler_config(model.latent_size)
    georeference = Georeference.unplaced(mpp) if kind == "aerial" else None
    band_names = [f"source band {band}" for band in source_bands] or None
    records = []
    for number in range(settings.count):
        identity = {"model": str(model_dir), "prior": str(prior_dir), "settings": asdict(settings),
                    "seed": seed + number, "mpp": mpp}
        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        folder = out_dir / image_folder(number)
        record_path = folder / GENERATED_IMAGE_RECORD
        if record_path.is_file() and json.loads(record_path.read_text()).get("settings_sha") == digest:
            records.append(json.loads(record_path.read_text()))  # finished by an earlier run with these settings
            continue
        grid, tissue, grid_seed, draws = draw_grid(prior, settings, dataset, seed + number)
        image_config = config.with_(seed=seed + number)
        with atomic_dir(folder) as temp:
            files = write_generated_image(LargeImageSampler(model, grid, image_config, tissue=tissue), temp,
                                          pixel_size_um(mpp, kind), settings.png_max_side, settings.tiff,
                                          settings.jpeg_quality, georeference, band_names)
            np.save(temp / GRID_EMBEDDINGS, grid)
            np.save(temp / GRID_TISSUE, tissue)
            record = {"image": image_folder(number), "dataset": dataset, "seed": seed + number,
                      "grid_seed": grid_seed, "grid_draws": draws, "rows": settings.rows, "cols": settings.cols,
                      "tissue_fraction": float(tissue.mean()), "mpp": mpp, "mode": settings.mode,
                      "sampler": image_config.sampler, "steps": image_config.steps,
                      "guidance_scale": image_config.guidance_scale, "prior_steps": settings.prior_steps,
                      "random_parts": model.random_parts, "settings_sha": digest, "grid": GRID_EMBEDDINGS,
                      "tissue": GRID_TISSUE, "config": asdict(image_config), **files}
            (temp / GENERATED_IMAGE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
        records.append(record)
    manifest = pd.DataFrame.from_records([{k: v for k, v in r.items() if k != "config"} for r in records])
    for column in ("generated_png", "generated_tif", "generated_geotiff", "grid", "tissue"):
        if column in manifest:
            manifest[column] = [f"{i}/{v}" if isinstance(v, str) else None for i, v in zip(manifest.image, manifest[column])]
    with atomic_file(out_dir / MANIFEST) as temp:
        manifest.to_parquet(temp, index=False)
    write_text_atomic(out_dir / GENERATED_IMAGES_SUMMARY, json.dumps(
        {"dataset": dataset, "images": len(manifest), "model": str(model_dir), "prior": str(prior_dir),
         "rows": settings.rows, "cols": settings.cols, "mode": settings.mode, "mpp": mpp},
        indent=2, sort_keys=True) + "\n")
    return manifest
