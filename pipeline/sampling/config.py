"""Plain-data settings of the large-image sampler; lid mode and fast mode are two values of one type."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any

from pipeline.io.precision import PRECISIONS
from pipeline.sampling.weights import WINDOW_WEIGHTS

LID_SAMPLER = "lid_ddim"
DIFFUSERS_SAMPLERS = ("ddim", "dpmsolver++", "unipc")


@dataclass(frozen=True)
class LargeImageConfig:
    """How to sample and decode a large latent canvas with a 64x64-latent model.

    sampler: "lid_ddim" (LID's own DDIM loop with its quirks) or a diffusers scheduler name.
    steps: denoising steps (for "lid_ddim" they must divide the training timesteps).
    stride: latent pixels between the origins of neighbouring sampling windows.
    window: latent side of a window (the size the UNet was trained on).
    guidance_scale: classifier-free guidance s in eps_u + s (eps_c - eps_u) (pipeline.models.guidance);
        LID's large-image code writes (1 + g) eps_c - g eps_u with g = 3, i.e. s = 4.
    eta: noise multiplier of the step (lid_ddim: scales its beta~; ddim: diffusers' eta).
    window_batch: windows per UNet call (with guidance the call holds twice as many samples);
        None: as many as fit in the free GPU memory (32 on a CPU).
    decode_stride / decode_batch: windows of the blended decode (stride in latent pixels; batch
        None: sized from free GPU memory, 4 on a CPU).
    precision: "auto" (bfloat16 autocast on CUDA, float32 elsewhere), "float32" or "bfloat16".
    feature_reuse: 1 runs the whole UNet every step; N > 1 runs it every N-th step and only its
        outermost `reuse_depth` down/up blocks in between, on cached deep features (DeepCache).
    compile_unet: torch.compile the UNet (off until measured worth its compile time).
    channels_last: the UNet's weights and windows in channels_last layout (NHWC: cuDNN's tensor
        core convolutions; off until measured on a card).
    decode_weights: how overlapping decoded windows are blended: "gaussian" (LID's; its
        decode_sigma), "hann" (sin^2 tapers that give a window's border pixels, where a decoder
        sees zero padding instead of context, almost no weight) or "uniform".
    seed: seeds the one torch.Generator that every Gaussian draw comes from.
    timestep_spacing: diffusers schedulers only.
    shift_windows: before every step, move the interior window edges by a random offset (from
        their own generator, seeded by seed), so that no edge stays at one place through the
        trajectory; the windows at the canvas borders stay. Off in lid mode.
    fusion_weights: how overlapping windows' x0 are averaged: "uniform" (LID's), "gaussian"
        (each window weighted by exp(-d^2 / fusion_sigma^2), d on a [-1, 1] grid, as the decode)
        or "hann" (sin^2 tapers that reach ~0 at the window's edges; at stride = window / 2 they sum
        to 1, so every pixel is a smooth cross-fade and no window edge can show as a step).
    """

    sampler: str = LID_SAMPLER
    steps: int = 50
    stride: int = 16
    window: int = 64
    guidance_scale: float = 4.0
    eta: float = 1.0
    window_batch: int | None = None
    decode_stride: int = 16
    decode_batch: int | None = None
    decode_sigma: float = 0.8
    decode_weights: str = "gaussian"
    seed: int = 1234
    timestep_spacing: str = "trailing"
    shift_windows: bool = False
    fusion_weights: str = "uniform"
    fusion_sigma: float = 0.8
    precision: str = "auto"
    feature_reuse: int = 1
    reuse_depth: int = 1
    compile_unet: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.sampler != LID_SAMPLER and self.sampler not in DIFFUSERS_SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r}: expected {LID_SAMPLER!r} or one of {DIFFUSERS_SAMPLERS}")
        for name in ("steps", "stride", "window", "window_batch", "decode_stride", "decode_batch", "feature_reuse",
                     "reuse_depth"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision {self.precision!r}: expected one of {PRECISIONS}")
        if self.feature_reuse > 1 and self.shift_windows:
            raise ValueError("feature_reuse caches each window's features, so the windows cannot shift")
        for name in ("stride", "decode_stride"):
            if getattr(self, name) > self.window:
                raise ValueError(f"{name} {getattr(self, name)} exceeds the window {self.window}: pixels would be skipped")
        for name in ("fusion_weights", "decode_weights"):
            if getattr(self, name) not in WINDOW_WEIGHTS:
                raise ValueError(f"{name} {getattr(self, name)!r}: expected one of {WINDOW_WEIGHTS}")
        if self.eta < 0 or self.guidance_scale < 0 or self.decode_sigma <= 0 or self.fusion_sigma <= 0:
            raise ValueError("eta and guidance_scale must be >= 0, decode_sigma and fusion_sigma > 0")

    def with_(self, **changes: object) -> LargeImageConfig:
        return replace(self, **changes)


# LID's notebook settings: get_panorama + vis_panorama_window_weighted, unchanged.
LID_MODE = LargeImageConfig()

# Same windows, fusion, step and decode code: half as many windows per axis (stride 32), 20 of the
# LID's own stochastic DDIM steps instead of 50, each window's x0 faded towards its edges
# (Gaussian fusion), and decoded windows blended with Hann tapers: 49 x 20 x 2 = 1,960 UNet
# evaluations per 1024 px against 16,900 (1/8.6). Chosen by measurement on the LID fixture
# (BENCHMARKS.md, bench/seams.py): LID's Gaussian decode blend leaves flattened texture along
# the decode-window edges (r = 0.95-0.97 on fast-mode canvases; on lid mode's canvas it cancels
# the jumps its uniform fusion leaves on the same lines); the Hann blend gives a window's border
# pixels, which a decoder computes from zero padding, almost no weight.
FAST_MODE = LargeImageConfig(steps=20, stride=32, fusion_weights="gaussian", decode_weights="hann")


MODES = {"lid": LID_MODE, "fast": FAST_MODE}


def large_image_config(mode: str, window: int, overrides: dict[str, Any] | None = None) -> LargeImageConfig:
    """A mode's settings for a model with `window`-latent windows, then the user's overrides.

    The modes are defined for LID's 64-latent windows; for other window sizes their strides
    keep the same fraction of the window. Overrides (latent pixels) are taken as given.
    """
    if mode not in MODES:
        raise ValueError(f"large-image mode {mode!r}: expected one of {sorted(MODES)}")
    base = MODES[mode]
    scale = window / base.window
    config = base.with_(window=window, stride=max(1, round(base.stride * scale)),
                        decode_stride=max(1, round(base.decode_stride * scale)))
    chosen = {name: value for name, value in (overrides or {}).items() if value is not None}
    return config.with_(**chosen) if chosen else config


PNG_MAX_SIDE = 4096  # Pillow holds a PNG whole in memory; larger images are TIFF only


@dataclass(frozen=True)
class RenderSettings:
    """How a config table asks for large-image sampling: a mode and its overrides (None: the mode's
    value). The `large_image:`, `generate:` and `synthesize_slide:` tables all start with these."""

    mode: str = "fast"
    sampler: str | None = None
    steps: int | None = None
    stride: int | None = None
    decode_stride: int | None = None
    guidance_scale: float | None = None
    window_batch: int | None = None
    shift_windows: bool | None = None
    fusion_weights: str | None = None
    decode_weights: str | None = None
    feature_reuse: int | None = None
    precision: str = "auto"
    compile_unet: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: expected one of {sorted(MODES)}")

    def overrides(self) -> dict[str, Any]:
        """The sampler settings that replace the mode's (those that are set)."""
        names = {f.name for f in fields(LargeImageConfig)}
        return {f.name: getattr(self, f.name) for f in fields(self)
                if f.name in names and getattr(self, f.name) is not None}

    def sampler_config(self, window: int) -> LargeImageConfig:
        """The mode's sampler settings for a model with `window`-latent windows, overrides applied."""
        return large_image_config(self.mode, window, self.overrides())


@dataclass(frozen=True)
class LargeImageSettings(RenderSettings):
    """The config's `large_image:` table: which regions, the mode and its overrides, what is
    written, and where it runs."""

    k: int = 4
    regions: int = 4
    png_max_side: int = PNG_MAX_SIDE
    tiff: bool = True
    jpeg_quality: int = 95  # of the pyramidal TIFFs' JPEG tiles (4:4:4, as the patches)
    device: str = "auto"
    devices: int = 1  # GPUs of one node that share every step's windows (torchrun)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.k < 1 or self.regions < 1:
            raise ValueError("k and regions must be positive")
        if self.png_max_side > PNG_MAX_SIDE:
            raise ValueError(f"png_max_side {self.png_max_side}: PNGs are written up to {PNG_MAX_SIDE} px")
