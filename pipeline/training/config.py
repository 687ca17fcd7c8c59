"""Training settings and the model architectures they name.

Architectures come from LID's own numbers (`pipeline.models.presets`), so a model trained
here has exactly LID's UNet and condition stage, and a LID release can initialise it:

- ``lid``: LID's released BRCA/CRC/NAIP models: UNet 192 channels, multipliers [1,2,3,5], 2 residual
  blocks per level, attention at downsampling 2/4/8, one head, one transformer layer, context 512,
  3x64x64 latents (VQ-f4); condition stage: L2-normalise the SSL embedding, Linear -> 512, one token.
- ``small``: the same block structure at 32 channels, multipliers [1,2], 1 residual block, attention
  at downsampling 2, context 64: trains on a CPU in seconds (tests, demo). Not for real use.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipeline.errors import PipelineError
from pipeline.models.lid_config import ConditionSpec, ScheduleSpec, UNetSpec, parse_lid_config
from pipeline.models.presets import lid_full_size_config_dict, scheduler_config

PRESETS = ("lid", "small")


def model_specs(preset: str, patch_embed_dim: int, latent_channels: int = 3,
                latent_size: int = 64) -> tuple[UNetSpec, ConditionSpec]:
    """(UNet, condition stage) architecture of a preset, for the given embedding and latent sizes."""
    if preset == "lid":
        config = parse_lid_config(lid_full_size_config_dict(patch_embed_dim), "<LID preset>")
        unet = dataclasses.replace(config.unet, in_channels=latent_channels, out_channels=latent_channels,
                                   image_size=latent_size)
        return unet, config.condition
    if preset == "small":
        unet = UNetSpec(in_channels=latent_channels, out_channels=latent_channels, model_channels=32,
                        channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(2,), num_heads=1,
                        num_head_channels=-1, transformer_depth=1, context_dim=64, image_size=latent_size)
        return unet, ConditionSpec(patch_embed_dim=patch_embed_dim, target_dim=64, normalize_ssl=True)
    raise PipelineError(f"unknown model preset {preset!r}; known: {list(PRESETS)}")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that defines a training run (also stored in every checkpoint): the config's
    `training:` table plus embedding_key, patch_embed_dim, holdout_fraction and seed, which the
    pipeline derives from the dataset and the top-level seed.

    Learning rate: used as given. LID's main.py multiplied its base rate (1e-4) by
    batch size x GPUs x accumulation; nothing is scaled here, so set the rate you mean.
    """

    # data
    embedding_key: str = "hipt_vit_s16"  # the shards' `<key>.<embedding_key>.npy` field
    patch_embed_dim: int = 384  # its width; must match the condition stage
    latent_channels: int = 3  # 3 for VQ-f4, 4 for a KL (sd-vae) autoencoder
    latent_size: int = 64  # latent side length (sample_size of the UNet config)
    augment: str = "stored"  # stored: random pick of the stored flip encodings | latent: flip the latent | none
    batch_size: int = 64  # per device
    shards_per_block: int = 4  # shards mixed into one shuffle block per rank
    holdout_fraction: float = 0.0  # share of patch keys never trained on (pipeline.splits)
    num_workers: int = 1  # loader processes per rank: 0 (main process) or 1
    # model
    preset: str = "lid"
    init_from: str | None = None  # converted LID release folder (configs/ + checkpoints/last.ckpt)
    gradient_checkpointing: bool = False
    # objective
    num_train_timesteps: int = 1000
    beta_start: float = 0.0015
    beta_end: float = 0.0195
    cfg_dropout: float = 0.1  # share of conditions replaced by zeros before the condition stage
    # optimisation
    learning_rate: float = 1e-4
    weight_decay: float = 0.01  # torch AdamW's default, which LID used
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10000  # linear from 0 to learning_rate, then constant (LID's schedule)
    max_steps: int = 100000
    accumulate_grad_batches: int = 1
    gradient_clip_val: float | None = None
    ema_decay: float | None = None  # e.g. 0.9999; EMA of UNet + condition stage, exported if set
    seed: int = 0
    # hardware
    precision: str = "auto"  # auto: bf16-mixed on GPU, 32-true on CPU; or any Lightning precision
    accelerator: str = "auto"
    devices: int = 1  # per node
    num_nodes: int = 1
    # bookkeeping
    checkpoint_every: int = 5000  # steps between kept checkpoints (last.ckpt is refreshed as well)
    log_every: int = 50

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown model preset {self.preset!r}; known: {list(PRESETS)}")
        if self.augment not in ("stored", "latent", "none"):
            raise ValueError(f"augment must be stored, latent or none, got {self.augment!r}")
        if not 0.0 <= self.cfg_dropout < 1.0:
            raise ValueError(f"cfg_dropout must be in [0, 1), got {self.cfg_dropout}")
        if self.num_workers not in (0, 1):
            raise ValueError("num_workers must be 0 or 1: one ordered stream per rank keeps resuming exact; "
                             "loading precomputed latents needs no more")
        for name in ("batch_size", "max_steps", "accumulate_grad_batches", "checkpoint_every", "devices",
                     "num_nodes", "shards_per_block", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
        if self.learning_rate <= 0 or self.warmup_steps < 0:
            raise ValueError("learning_rate must be > 0 and warmup_steps >= 0")

    def specs(self) -> tuple[UNetSpec, ConditionSpec]:
        return model_specs(self.preset, self.patch_embed_dim, self.latent_channels, self.latent_size)

    def scheduler_config(self) -> dict[str, Any]:
        """diffusers DDPMScheduler config: CompVis 'linear' = diffusers 'scaled_linear', epsilon."""
        return scheduler_config(ScheduleSpec(self.num_train_timesteps, self.beta_start, self.beta_end))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """The config stored in a checkpoint (`to_dict`), older spellings of values renewed."""
        from pipeline.config import renamed_value, settings_from_table

        data = dict(data)
        if "preset" in data:
            data["preset"] = renamed_value(("training", "preset"), data["preset"])
        return settings_from_table(cls, data, "training")
