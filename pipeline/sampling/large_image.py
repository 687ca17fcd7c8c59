"""Large-image generation from an embedding grid: windows, fusion and steps wired by one config."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

from pipeline.io.precision import autocast
from pipeline.models.diffusion_pipeline import RLDiffPipeline
from pipeline.models.guidance import needs_unconditional
from pipeline.sampling.conditions import fill_background, window_contexts
from pipeline.sampling.config import LargeImageConfig
from pipeline.sampling.decode import Glass, blended_bands, decode_large_image, fitting_decode_batch
from pipeline.sampling.denoiser import WindowDenoiser
from pipeline.sampling.fusion import WindowFusion, distributed_rank
from pipeline.sampling.seams import seam_score, window_boundaries
from pipeline.sampling.steppers import make_stepper
from pipeline.sampling.weights import window_weights
from pipeline.sampling.windows import WindowLayout, WindowSubset, max_shift

SHIFT_STREAM = 0x5D1F7  # the window-shift generator's seed offset: its own stream, apart from the noise


@dataclass
class SamplingStats:
    windows: int  # per step (the mean, when windows shift)
    steps: int
    unet_evaluations: int  # one window through the UNet once (conditional and unconditional count apart)
    unet_calls: int
    seconds: float


@dataclass
class LargeImage:
    latent: torch.Tensor  # (1, C, rows * window, cols * window)
    image: np.ndarray | None  # (H, W, 3) uint8, or None when not decoded
    stats: SamplingStats


def as_grid(embeddings: torch.Tensor | np.ndarray) -> torch.Tensor:
    grid = embeddings if torch.is_tensor(embeddings) else torch.from_numpy(np.asarray(embeddings))
    if grid.ndim != 3:
        raise ValueError(f"embedding grid must be (rows, cols, D), got shape {tuple(grid.shape)}")
    return grid.float()


def evaluated_windows(layout: WindowLayout, glass: Glass | None, pinned_rows: int = 0) -> WindowLayout | WindowSubset:
    """The windows of `layout` that are sampled: not lying on the first `pinned_rows` latent rows
    entirely, and (with a glass mask) overlapping a tissue cell in their unpinned part."""
    if glass is None and not pinned_rows:
        return layout
    window = layout.window

    def keep(row: int, column: int) -> bool:
        if row + window <= pinned_rows:
            return False
        if glass is None:
            return True
        top = max(row, pinned_rows)  # only the unpinned part of the window counts
        return glass.has_tissue(top, column, row + window - top, window)

    return WindowSubset(layout, keep)


class LargeImageSampler:
    """Samples the latent canvas of a [rows, cols, D] embedding grid.

    Window conditions are computed once; every trajectory starts a fresh generator (config.seed)
    and a fresh step rule, so repeated runs give the same canvases.

    tissue: the grid's (rows, cols) presence mask, or None (all tissue). Windows that overlap no
    tissue cell are never evaluated (their pixels are glass: x0 0, decoded white), and background
    cells lend the SLERP the embedding of their nearest tissue cell.
    pinned: (1, C, p, W) latents known for the canvas's first p rows (the finished band above a
    band of a whole slide): their x0 is that latent at every step, and windows that lie on them
    entirely are not evaluated, so the new rows are sampled in the context of the fixed ones.
    """

    def __init__(self, model: RLDiffPipeline, embeddings: torch.Tensor | np.ndarray, config: LargeImageConfig,
                 tissue: np.ndarray | None = None, pinned: torch.Tensor | None = None) -> None:
        if model.latent_size != config.window:
            raise ValueError(f"the model samples {model.latent_size}x{model.latent_size} latents, but the "
                             f"configured window is {config.window}")
        self.model = model
        self.config = config
        self.grid = as_grid(embeddings)
        rows, cols, _ = self.grid.shape
        window = config.window
        self.layout = WindowLayout(rows * window, cols * window, window, config.stride)
        self.tissue = None if tissue is None else np.asarray(tissue, dtype=bool)
        if self.tissue is not None:
            self.grid = fill_background(self.grid, self.tissue)
        if pinned is not None and (pinned.shape[3] != self.layout.width or pinned.shape[2] % window):
            raise ValueError(f"pinned latents of shape {tuple(pinned.shape)}: whole cell rows of the "
                             f"{self.layout.width}-wide canvas expected")
        self.pinned = pinned
        self.glass = Glass(self.tissue, window) if self.tissue is not None else None
        condition = model.condition
        denoiser = WindowDenoiser(model.unet, config.precision, config.feature_reuse, config.reuse_depth,
                                  config.compile_unet, config.channels_last)
        self.fused_layout, active = self.layout, self.active(self.layout)  # the windows the fusion holds
        self.fusion = WindowFusion(
            unet=denoiser,
            layout=active,
            contexts=self.contexts(active),
            unconditional=condition.null_context(1),
            guidance_scale=config.guidance_scale,
            window_batch=config.window_batch,
            # None: plain window counts, exactly LID's mean.
            window_weights=(None if config.fusion_weights == "uniform"
                            else window_weights(config.fusion_weights, window, config.fusion_sigma)),
        )
        self.device = next(model.unet.parameters()).device

    def active(self, layout: WindowLayout) -> WindowLayout | WindowSubset:
        """The windows that are evaluated: those over tissue cells below the pinned rows."""
        return evaluated_windows(layout, self.glass, 0 if self.pinned is None else self.pinned.shape[2])

    @property
    def evaluations_per_window(self) -> int:
        return 2 if needs_unconditional(self.config.guidance_scale) else 1

    def contexts(self, layout: WindowLayout | WindowSubset) -> torch.Tensor:
        return window_contexts(self.model.condition, self.grid, layout.origins, self.config.window)

    def shifted_layouts(self) -> Iterator[WindowLayout]:
        """The window layout of each step: fixed, or shifted at random (config.shift_windows)."""
        if not self.config.shift_windows:
            while True:
                yield self.layout
        limit = max_shift(self.config.window, self.config.stride)
        generator = torch.Generator().manual_seed(self.config.seed + SHIFT_STREAM)
        while True:
            row_shift, column_shift = torch.randint(0, limit + 1, (2,), generator=generator).tolist()
            yield replace(self.layout, row_shift=row_shift, column_shift=column_shift)

    @property
    def canvas_shape(self) -> tuple[int, int, int, int]:
        return (1, self.model.unet.config.in_channels, self.layout.height, self.layout.width)

    def trajectory(self) -> Iterator[torch.Tensor]:
        """Yield the start canvas, then the canvas after each step (the last one is the sample)."""
        stepper = make_stepper(self.config, self.model.training_betas, self.model.scheduler_config)
        # One generator for every draw, on the CPU, so a seed gives the same noise on any device.
        generator = torch.Generator().manual_seed(self.config.seed)
        canvas = stepper.initial_canvas(self.canvas_shape, generator).to(self.device)
        yield canvas
        layouts = self.shifted_layouts()
        pinned = None if self.pinned is None else self.pinned.to(self.device, canvas.dtype)
        for step, t in enumerate(stepper.timesteps):
            self.fusion.denoiser.begin_step(step)
            layout = next(layouts)
            if layout is not self.fused_layout:
                self.fused_layout, active = layout, self.active(layout)
                self.fusion.set_layout(active, self.contexts(active))
            x0 = self.fusion.predict_x0(canvas, stepper.model_timestep(t), stepper.alpha_bar(t))
            if pinned is not None:
                x0[:, :, : pinned.shape[2]] = pinned
            canvas = stepper.step(t, canvas, x0, generator)
            yield canvas

    def sample(self, on_step: Callable[[int], None] | None = None) -> tuple[torch.Tensor, SamplingStats]:
        """The final canvas (1, C, H, W) and what producing it cost; on_step(windows) after each step."""
        started = time.perf_counter()
        evaluations, calls = self.fusion.evaluations, self.fusion.calls
        steps = -1  # the first canvas is the start, not a step
        for canvas in self.trajectory():
            steps += 1
            if steps and on_step is not None:
                on_step(len(self.fusion.origins))
        if self.pinned is not None:  # exactly the known latents (the last x0 is, up to the step rule)
            canvas[:, :, : self.pinned.shape[2]] = self.pinned.to(canvas.device, canvas.dtype)
        # Each rank counted its own windows; the sample's cost is their sum.
        counts = torch.tensor([self.fusion.evaluations - evaluations, self.fusion.calls - calls])
        if distributed_rank()[1] > 1:
            dist.all_reduce(counts)
        stats = SamplingStats(
            windows=round(int(counts[0]) / max(steps, 1) / self.evaluations_per_window),
            steps=steps,
            unet_evaluations=int(counts[0]),
            unet_calls=int(counts[1]),
            seconds=time.perf_counter() - started,
        )
        return canvas, stats


def _decode_arguments(model: RLDiffPipeline, latent: torch.Tensor, config: LargeImageConfig) -> tuple:
    """The positional arguments both decode entry points pass to pipeline.sampling.decode."""
    factor = model.downsampling_factor
    weights = window_weights(config.decode_weights, config.window * factor, config.decode_sigma)
    device = next(model.vae.parameters()).device

    def decode(latents: torch.Tensor) -> torch.Tensor:
        with autocast(config.precision, device):
            return model.decode_latents(latents).float()

    batch = config.decode_batch or fitting_decode_batch(decode, latent, config.window, device)
    return (decode, latent, factor, config.window, config.decode_stride, batch, weights)


def decode_canvas(
    model: RLDiffPipeline, latent: torch.Tensor, config: LargeImageConfig, out: np.ndarray | None = None,
    glass: Glass | None = None,
) -> np.ndarray:
    """The window-blended uint8 image of a latent canvas (written into `out` when given), glass white."""
    return decode_large_image(*_decode_arguments(model, latent, config), out=out, bands=model.image_bands,
                              glass=glass)


def decoded_bands(
    model: RLDiffPipeline, latent: torch.Tensor, config: LargeImageConfig, glass: Glass | None = None
) -> Iterator[tuple[int, np.ndarray]]:
    """Stream of (first row, uint8 rows) bands, glass white; see decode.blended_bands."""
    return blended_bands(*_decode_arguments(model, latent, config), glass=glass, bands=model.image_bands)


def generate_large_image(
    model: RLDiffPipeline,
    embeddings: torch.Tensor | np.ndarray,
    config: LargeImageConfig,
    decode: bool = True,
    out: np.ndarray | None = None,
    tissue: np.ndarray | None = None,
) -> LargeImage:
    """Sample the canvas for an embedding grid and (optionally) decode it; `tissue` (rows, cols):
    the presence mask, background cells cost no UNet call and are white (see LargeImageSampler)."""
    sampler = LargeImageSampler(model, embeddings, config, tissue=tissue)
    latent, stats = sampler.sample()
    image = decode_canvas(model, latent, config, out=out, glass=sampler.glass) if decode else None
    return LargeImage(latent=latent, image=image, stats=stats)


EDGE_CLASSES = ("both", "sampling_only", "decoding_only")


def window_edge_classes(size: int, config: LargeImageConfig, factor: int) -> dict[str, list[int]]:
    """Output-pixel edge lines along one axis of `size` latents, by class: edges of both the
    sampling and the decoding windows, of the sampling windows only, of the decoding windows only."""
    sampling = set(window_boundaries(size, config.window, config.stride, factor))
    decoding = set(window_boundaries(size, config.window, config.decode_stride, factor))
    return dict(zip(EDGE_CLASSES, map(sorted, (sampling & decoding, sampling - decoding, decoding - sampling))))


def large_image_seam_score(
    image: np.ndarray, latent_shape: tuple[int, ...], config: LargeImageConfig, factor: int
) -> float:
    """The worst seam_score over the three classes of window_edge_classes.

    Scored apart, a jump at one class of edges and flattened texture at another cannot cancel.
    An image of a single window has no edges and scores 1.0.
    (With shift_windows the sampling edges move every step; the unshifted ones are scored.)
    """
    height, width = latent_shape[-2:]
    rows, columns = window_edge_classes(height, config, factor), window_edge_classes(width, config, factor)
    scores = [seam_score(image, rows[name], columns[name]) for name in EDGE_CLASSES if rows[name] or columns[name]]
    return max(scores, default=1.0)  # one window: no edges, nothing to see
