"""`synthesize-slide`: a whole synthetic slide from a slide's embedding grid (docs/data_contract.md,
"Synthetic slides").

The grid is sampled in bands of `band_rows` cell rows, top to bottom. Band b (b > 0) is sampled on
a canvas that starts one cell row higher, with that row pinned to the finished latents of band
b - 1, so each band continues the one above it; band b uses seed + b. Only the current band's
canvas is in memory, and each finished band's latents are saved (atomically) in the work folder
``.<out name>.work/`` beside the output, so a killed run resumes at the first unfinished band and,
everything being deterministic, writes the same bytes. Decoding then goes band by band too (each
band with one latent cell row of context above and below) into a disk memmap, from which the
pyramidal TIFF and the thumbnail are written; glass (cells without tissue) is white and costs no
UNet call and no decoder call.

Outputs (``--out``, written atomically as one folder): ``slide.tif``, ``thumbnail.jpg``,
``slide.json``.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_dir, atomic_file, remove_path
from pipeline.io.device import resolve_device
from pipeline.io.large_image_files import release_mapped_pages, write_pyramid_tiff
from pipeline.models import RLDiffPipeline, load_pipeline
from pipeline.models.guidance import needs_unconditional
from pipeline.sampling.config import PNG_MAX_SIDE, RenderSettings
from pipeline.sampling.decode import Glass
from pipeline.sampling.large_image import LargeImageSampler, SamplingStats, decoded_bands, evaluated_windows
from pipeline.embedding.grids import SlideGrid, grid_from_embeddings, grid_from_h5, load_grid
from pipeline.sampling.windows import WindowLayout

SLIDE_TIFF = "slide.tif"
SLIDE_THUMBNAIL = "thumbnail.jpg"
SLIDE_RECORD = "slide.json"
SETTINGS_FILE = "settings.json"


@dataclass(frozen=True)
class SlideSettings(RenderSettings):
    """The config's `synthesize_slide:` table: the sampling mode and its overrides, bands, files."""

    band_rows: int = 2  # cell rows sampled together (memory: one band plus a context row)
    thumbnail_side: int = 1024
    jpeg_quality: int = 95
    device: str = "auto"
    # Which slides the workflow's `synthesize` target renders (see pipeline.config.selected_slides); not part of
    # a slide's identity, so changing the selection never restarts a slide in progress.
    slides: str | tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.band_rows < 1 or not 16 <= self.thumbnail_side <= PNG_MAX_SIDE:
            raise ValueError("band_rows must be positive and thumbnail_side within 16..4096")


def band_starts(rows: int, band_rows: int) -> list[int]:
    return list(range(0, rows, band_rows))


def band_file(folder: Path, band: int) -> Path:
    return folder / f"band-{band:05d}.npy"


class Progress:
    """Windows done / total and an ETA from the windows sampled in this process, on stderr."""

    def __init__(self, total: int, done: int, stream=None, every: float = 5.0) -> None:
        self.total, self.done, self.stream, self.every = total, done, stream or sys.stderr, every
        self.started, self.start_done, self.last = time.perf_counter(), done, 0.0

    def __call__(self, windows: int) -> None:
        self.done += windows
        now = time.perf_counter()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        rate = (self.done - self.start_done) / max(now - self.started, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("nan")
        print(f"synthesize-slide: windows {self.done}/{self.total}, ETA {eta:.0f} s", file=self.stream, flush=True)


def band_windows(grid: SlideGrid, top: int, stop: int, context: int, window: int, stride: int) -> int:
    """Windows one step of band [top, stop) samples (the unshifted layout)."""
    tissue = grid.tissue[top - context : stop]
    layout = WindowLayout(len(tissue) * window, tissue.shape[1] * window, window, stride)
    return len(evaluated_windows(layout, Glass(tissue, window), context * window))


def sample_band(model: RLDiffPipeline, grid: SlideGrid, top: int, stop: int, pinned: torch.Tensor | None,
                config, on_step: Callable[[int], None] | None) -> tuple[torch.Tensor, SamplingStats]:
    """Latents (1, C, (stop - top) * window, cols * window) of cell rows [top, stop), and their cost."""
    context = 0 if pinned is None else pinned.shape[2] // config.window
    embeddings = np.array(grid.embeddings[top - context : stop], dtype=np.float32)  # a copy of the band only
    sampler = LargeImageSampler(model, embeddings, config, tissue=grid.tissue[top - context : stop], pinned=pinned)
    canvas, stats = sampler.sample(on_step)
    return canvas[:, :, context * config.window :].float().cpu(), stats


def _settings_digest(identity: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def synthesize_slide(model_dir: str | Path, out_dir: str | Path, *, mpp: float, settings: SlideSettings, seed: int,
                     embeddings_dir: str | Path | None = None, input_id: str | None = None, h5: str | Path | None = None,
                     embedding_key: str | None = None, dataset: str | None = None,
                     progress_every: float = 5.0,
                     on_band: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Sample, decode and write one whole synthetic slide; returns its record (slide.json).

    on_band(band): called after each band's latents are saved (a test stops a run there)."""
    from pipeline.sampling.stage import embedding_key_of

    if (h5 is None) == (embeddings_dir is None):
        raise PipelineError("give either an embedding-stage folder (and input id) or an .h5 feature file")
    if embeddings_dir is not None and input_id is None:
        raise PipelineError(f"{embeddings_dir}: name the input (slide) whose grid to synthesise")
    if not (np.isfinite(mpp) and mpp > 0):
        raise PipelineError(f"mpp {mpp}: expected a positive number of micrometres per pixel")
    out_dir = Path(out_dir)
    work = out_dir.parent / f".{out_dir.name}.work"
    device = resolve_device(settings.device)
    model = load_pipeline(model_dir).to(device)
    config = settings.sampler_config(model.latent_size)
    window = config.window
    source = str(h5) if h5 is not None else f"{embeddings_dir}:{input_id}"
    key = None if h5 is not None else embedding_key_of(model, embedding_key)
    identity = {"model": str(model_dir), "source": source, "embedding_key": key, "mpp": mpp, "seed": seed,
                "settings": {k: v for k, v in asdict(settings).items() if k != "slides"}, "config": asdict(config)}
    digest = _settings_digest(identity)
    settings_path = work / SETTINGS_FILE
    if not (settings_path.is_file() and json.loads(settings_path.read_text()).get("sha") == digest):
        remove_path(work)  # another run's bands (or none): start over
        work.mkdir(parents=True)
        try:
            if h5 is not None:
                grid_from_h5(h5, work, model.embedding_dim)
            else:
                grid_from_embeddings(embeddings_dir, str(input_id), key, work, model.embedding_dim)
        except Exception:
            remove_path(work)  # a bad input leaves nothing behind
            raise
        with atomic_file(settings_path) as temp:
            temp.write_text(json.dumps({"sha": digest, **identity}, indent=2, sort_keys=True, default=str) + "\n")
    grid = load_grid(work, source)
    rows, cols = grid.shape
    starts = band_starts(rows, settings.band_rows)
    spans = [(top, min(top + settings.band_rows, rows)) for top in starts]
    per_band = [band_windows(grid, top, stop, int(top > 0), window, config.stride) * config.steps
                for top, stop in spans]
    finished = 0
    while finished < len(spans) and band_file(work, finished).is_file():
        finished += 1
    progress = Progress(sum(per_band), sum(per_band[:finished]), every=progress_every)
    started, evaluated = time.perf_counter(), 0
    for band in range(finished, len(spans)):
        top, stop = spans[band]
        pinned = None
        if band:
            above = np.load(band_file(work, band - 1), mmap_mode="r")
            pinned = torch.from_numpy(np.array(above[:, :, -window:]))
        latent, stats = sample_band(model, grid, top, stop, pinned, config.with_(seed=seed + band), progress)
        evaluated += stats.unet_evaluations
        with atomic_file(band_file(work, band)) as temp, open(temp, "wb") as handle:
            np.save(handle, latent.numpy())
        if on_band is not None:
            on_band(band)
    sampling_seconds = time.perf_counter() - started

    factor = model.downsampling_factor
    cell_px = window * factor
    height, width = rows * cell_px, cols * cell_px
    decode_started = time.perf_counter()
    canvas_path = work / "slide.uint8"
    image = np.lib.format.open_memmap(canvas_path, mode="w+", dtype=np.uint8, shape=(height, width, 3))
    for band, (top, stop) in enumerate(spans):
        parts = [np.load(band_file(work, band))]
        above = int(band > 0)
        below = int(band + 1 < len(spans))
        if above:
            parts.insert(0, np.load(band_file(work, band - 1), mmap_mode="r")[:, :, -window:])
        if below:
            parts.append(np.load(band_file(work, band + 1), mmap_mode="r")[:, :, :window])
        latent = torch.from_numpy(np.concatenate(parts, axis=2)).to(device)
        glass = Glass(grid.tissue[top - above : stop + below], window)
        first, last = above * cell_px, (above + stop - top) * cell_px
        for row, pixels in decoded_bands(model, latent, config, glass):
            lo, hi = max(row, first), min(row + len(pixels), last)
            if lo < hi:
                image[top * cell_px + lo - first : top * cell_px + hi - first] = pixels[lo - row : hi - row]
        image.flush()
        release_mapped_pages(image)
    decode_seconds = time.perf_counter() - decode_started
    tissue_cells = int(grid.tissue.sum())
    record = {"dataset": dataset, "source": source, "model": str(model_dir), "embedding_key": key,
              "mpp": mpp, "seed": seed, "width": width, "height": height, "grid_rows": rows, "grid_cols": cols,
              "tissue_cells": tissue_cells, "bands": len(spans), "band_rows": settings.band_rows,
              "windows": sum(per_band) // config.steps,
              "unet_evaluations": sum(per_band) * (2 if needs_unconditional(config.guidance_scale) else 1),
              "mode": settings.mode, "sampler": config.sampler,
              "steps": config.steps, "stride": config.stride, "guidance_scale": config.guidance_scale,
              "random_weights": model.random_weights, "random_parts": model.random_parts,
              "files": {"tiff": SLIDE_TIFF, "thumbnail": SLIDE_THUMBNAIL}}
    with atomic_dir(out_dir) as temp:
        levels = write_pyramid_tiff(temp / SLIDE_TIFF, image, mpp, jpeg_quality=settings.jpeg_quality,
                                    description="rldiff synthetic slide")
        write_thumbnail(image, temp / SLIDE_THUMBNAIL, settings.thumbnail_side)
        # Timings vary run to run: they go to stdout, not into the (reproducible) record.
        record["levels"] = [list(level) for level in levels]
        (temp / SLIDE_RECORD).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    del image
    remove_path(work)
    print(f"{out_dir}: {width}x{height} px, {tissue_cells} tissue cells of {rows * cols}, "
          f"{record['unet_evaluations']} UNet evaluations ({evaluated} in this process); sampling {sampling_seconds:.1f} s, decoding {decode_seconds:.1f} s")
    return record


def write_thumbnail(image: np.ndarray, path: Path, side: int) -> None:
    """A JPEG whose longer side is at most `side`, by strided rows (never the whole image in memory)."""
    height, width = image.shape[:2]
    step = max(1, -(-max(height, width) // side))
    rows = [np.asarray(image[y, ::step]) for y in range(0, height, step)]
    Image.fromarray(np.stack(rows)).save(path, quality=90)


def read_slide_record(out_dir: str | Path) -> dict[str, Any]:
    """A synthetic slide's slide.json (the reader beside the writer)."""
    from pipeline.errors import StageOutputError

    path = Path(out_dir) / SLIDE_RECORD
    if not path.is_file():
        raise StageOutputError(f"{path}: not found (run synthesize-slide first)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise StageOutputError(f"{path}: not JSON ({exc})") from exc
