"""Plain-data settings of the large-image sampler; seed mode and fast mode are two values of one type."""

from __future__ import annotations

from dataclasses import dataclass, replace

from pipeline.sampling.weights import WINDOW_WEIGHTS

SEED_SAMPLER = "seed_ddim"
DIFFUSERS_SAMPLERS = ("ddim", "dpmsolver++", "unipc")
GUIDANCE_FORMS = ("seed", "standard")


@dataclass(frozen=True)
class LargeImageConfig:
    """How to sample and decode a large latent canvas with a 64x64-latent model.

    sampler: "seed_ddim" (the seed's own DDIM loop with its quirks) or a diffusers scheduler name.
    steps: denoising steps (for "seed_ddim" they must divide the training timesteps).
    stride: latent pixels between the origins of neighbouring sampling windows.
    window: latent side of a window (the size the UNet was trained on).
    guidance_form: "seed" gives (1+g)*eps_c - g*eps_u; "standard" gives eps_u + g*(eps_c - eps_u).
        The two agree when standard g = seed g + 1.
    eta: noise multiplier of the step (seed_ddim: scales its beta~; ddim: diffusers' eta).
    window_batch: windows per UNet call; with guidance the call holds twice as many samples.
    decode_stride / decode_batch: windows of the blended decode (stride in latent pixels).
    decode_weights: how overlapping decoded windows are blended: "gaussian" (the seed; its
        decode_sigma), "hann" (sin^2 tapers that give a window's border pixels, where a decoder
        sees zero padding instead of context, almost no weight) or "uniform".
    seed: seeds the one torch.Generator that every Gaussian draw comes from.
    timestep_spacing: diffusers schedulers only.
    shift_windows: before every step, move the interior window edges by a random offset (from
        their own generator, seeded by seed), so that no edge stays at one place through the
        trajectory; the windows at the canvas borders stay. Off in seed mode.
    fusion_weights: how overlapping windows' x0 are averaged: "uniform" (the seed), "gaussian"
        (each window weighted by exp(-d^2 / fusion_sigma^2), d on a [-1, 1] grid, as the decode)
        or "hann" (sin^2 tapers that reach ~0 at the window's edges; at stride = window / 2 they sum
        to 1, so every pixel is a smooth cross-fade and no window edge can show as a step).
    """

    sampler: str = SEED_SAMPLER
    steps: int = 50
    stride: int = 16
    window: int = 64
    guidance_scale: float = 3.0
    guidance_form: str = "seed"
    eta: float = 1.0
    window_batch: int = 32
    decode_stride: int = 16
    decode_batch: int = 4
    decode_sigma: float = 0.8
    decode_weights: str = "gaussian"
    seed: int = 1234
    timestep_spacing: str = "trailing"
    shift_windows: bool = False
    fusion_weights: str = "uniform"
    fusion_sigma: float = 0.8

    def __post_init__(self) -> None:
        if self.sampler != SEED_SAMPLER and self.sampler not in DIFFUSERS_SAMPLERS:
            raise ValueError(f"sampler {self.sampler!r}: expected {SEED_SAMPLER!r} or one of {DIFFUSERS_SAMPLERS}")
        if self.guidance_form not in GUIDANCE_FORMS:
            raise ValueError(f"guidance_form {self.guidance_form!r}: expected one of {GUIDANCE_FORMS}")
        for name in ("steps", "stride", "window", "window_batch", "decode_stride", "decode_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        for name in ("stride", "decode_stride"):
            if getattr(self, name) > self.window:
                raise ValueError(f"{name} {getattr(self, name)} exceeds the window {self.window}: pixels would be skipped")
        for name in ("fusion_weights", "decode_weights"):
            if getattr(self, name) not in WINDOW_WEIGHTS:
                raise ValueError(f"{name} {getattr(self, name)!r}: expected one of {WINDOW_WEIGHTS}")
        if self.eta < 0 or self.decode_sigma <= 0 or self.fusion_sigma <= 0:
            raise ValueError("eta must be >= 0, decode_sigma and fusion_sigma > 0")

    def with_(self, **changes: object) -> LargeImageConfig:
        return replace(self, **changes)


# The seed's notebook settings: get_panorama + vis_panorama_window_weighted, unchanged.
SEED_MODE = LargeImageConfig()

# Same windows, fusion, step and decode code: half as many windows per axis (stride 32), 20 of the
# seed's own stochastic DDIM steps instead of 50, each window's x0 faded towards its edges
# (Gaussian fusion), and decoded windows blended with Hann tapers: 49 x 20 x 2 = 1,960 UNet
# evaluations per 1024 px against 16,900 (1/8.6). Chosen by measurement on the seed fixture
# (BENCHMARKS.md, bench/seams.py): the seed's Gaussian decode blend leaves flattened texture along
# the decode-window edges (r = 0.95-0.97 on fast-mode canvases; on seed mode's canvas it cancels
# the jumps its uniform fusion leaves on the same lines); the Hann blend gives a window's border
# pixels, which a decoder computes from zero padding, almost no weight.
FAST_MODE = LargeImageConfig(steps=20, stride=32, fusion_weights="gaussian", decode_weights="hann")
