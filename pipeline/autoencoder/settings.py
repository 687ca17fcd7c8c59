"""The config's `autoencoder:` table (how the first stage is trained) and the diffusers model it
builds: a VQModel (LID's kind of first stage) or an AutoencoderKL, mapped through an explicit
table, never from a class name in the config."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from diffusers import AutoencoderKL, VQModel

from pipeline.errors import PipelineError

# kind -> the diffusers class it builds (the only classes this stage ever instantiates)
MODEL_CLASSES: dict[str, type] = {"vq": VQModel, "kl": AutoencoderKL}
DOWNSAMPLING_FACTORS = (4, 8, 16)
PRECISIONS = ("auto", "float32", "bfloat16")
# GroupNorm groups: the largest divisor of every block width up to this (diffusers' default).
MAX_NORM_GROUPS = 32


class AutoencoderSettingsError(PipelineError):
    """An `autoencoder:` table that cannot build a model; the message names the key."""


@dataclass(frozen=True)
class AutoencoderTrainSettings:
    """The config's `autoencoder:` table plus what the dataset implies (its bands) and the run seed."""

    kind: str = "vq"  # vq | kl
    downsampling: int = 4  # f: latents are (patch / f) on a side
    channels: int = 64  # width of the first block; block i has channels * channel_multipliers[i]
    channel_multipliers: tuple[int, ...] = (1, 2, 4, 4, 4)  # the first log2(f) + 1 are used
    layers_per_block: int = 2
    latent_channels: int = 3
    codebook_size: int = 8192  # vq only
    attention: bool = True  # self-attention in the middle block
    crop_size: int | None = None  # random square crops for training (null: whole patches)
    batch_size: int = 16
    max_steps: int = 20000
    learning_rate: float = 0.0001
    l1_weight: float = 1.0
    ssim_weight: float = 1.0
    kl_weight: float = 1.0e-6  # kl only
    ema_decay: float | None = None
    precision: str = "auto"  # auto: bf16 mixed on CUDA, float32 on a CPU
    accelerator: str = "auto"
    checkpoint_every: int = 1000
    log_every: int = 50
    in_channels: int = 3  # derived: the dataset's bands
    seed: int = 0  # derived: the config's top-level seed

    def __post_init__(self) -> None:
        if self.kind not in MODEL_CLASSES:
            raise AutoencoderSettingsError(f"autoencoder.kind: {self.kind!r}, expected one of {sorted(MODEL_CLASSES)}")
        if self.downsampling not in DOWNSAMPLING_FACTORS:
            raise AutoencoderSettingsError(f"autoencoder.downsampling: {self.downsampling}, expected one of "
                                           f"{DOWNSAMPLING_FACTORS}")
        if len(self.channel_multipliers) < self.levels:
            raise AutoencoderSettingsError(
                f"autoencoder.channel_multipliers: {len(self.channel_multipliers)} given, but downsampling "
                f"{self.downsampling} needs {self.levels} (one per block)")
        if self.precision not in PRECISIONS:
            raise AutoencoderSettingsError(f"autoencoder.precision: {self.precision!r}, expected one of {PRECISIONS}")

    @property
    def levels(self) -> int:
        return int(math.log2(self.downsampling)) + 1

    @property
    def block_channels(self) -> tuple[int, ...]:
        return tuple(self.channels * m for m in self.channel_multipliers[: self.levels])

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["channel_multipliers"] = list(self.channel_multipliers)
        return out

    def model_kwargs(self, sample_size: int) -> dict[str, Any]:
        """The diffusers constructor arguments (scaling factor 1 until the latents are measured)."""
        blocks = self.block_channels
        groups = math.gcd(MAX_NORM_GROUPS, *blocks)
        kwargs: dict[str, Any] = {
            "in_channels": self.in_channels,
            "out_channels": self.in_channels,
            "down_block_types": ("DownEncoderBlock2D",) * len(blocks),
            "up_block_types": ("UpDecoderBlock2D",) * len(blocks),
            "block_out_channels": blocks,
            "layers_per_block": self.layers_per_block,
            "latent_channels": self.latent_channels,
            "norm_num_groups": groups,
            "sample_size": sample_size,
            "scaling_factor": 1.0,
            "mid_block_add_attention": self.attention,
        }
        if self.kind == "vq":
            kwargs |= {"num_vq_embeddings": self.codebook_size, "vq_embed_dim": self.latent_channels}
        return kwargs

    def build_model(self, sample_size: int) -> VQModel | AutoencoderKL:
        return MODEL_CLASSES[self.kind](**self.model_kwargs(sample_size))
