"""The config's `prior:` table: the grid prior's architecture, objective and training."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from pipeline.errors import PipelineError

BETA_SCHEDULES = ("squaredcos_cap_v2", "linear", "scaled_linear")


class PriorSettingsError(PipelineError):
    """A `prior:` table that cannot train a prior; the message names the key."""


@dataclass(frozen=True)
class PriorSettings:
    """The config's `prior:` table plus what the pipeline derives (the encoder key, the run seed)."""

    crop: int = 4  # k: training grids are k x k crops of the slides' embedding grids
    min_tissue: float = 0.25  # crops with less tissue than this share of positions are not trained on
    components: int | None = 64  # principal components of the embeddings modelled (None: all D)
    layers: int = 6  # DiT blocks
    heads: int = 4
    head_dim: int = 64  # width = heads x head_dim
    batch_size: int = 64
    max_steps: int = 20000
    learning_rate: float = 0.0001
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 500
    cfg_dropout: float = 0.1  # share of dataset labels replaced by the null label
    ema_decay: float | None = 0.999
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    gradient_clip_val: float | None = 1.0
    precision: str = "auto"  # auto: bf16 mixed on CUDA, 32-true on a CPU; or any Lightning precision
    accelerator: str = "auto"
    devices: int = 1
    checkpoint_every: int = 2000
    log_every: int = 50
    embedding_key: str = "hipt_vit_s16"  # derived: the datasets' first encoder
    seed: int = 0  # derived: the config's top-level seed

    # What pipeline.training.run's trainer also asks of a run's settings (fixed for the prior).
    num_nodes = 1
    accumulate_grad_batches = 1
    num_workers = 0

    def __post_init__(self) -> None:
        if self.components is not None and self.components < 1:
            raise PriorSettingsError(f"prior.components must be at least 1 or null, got {self.components}")
        for name in ("crop", "layers", "heads", "head_dim", "batch_size", "max_steps", "checkpoint_every",
                     "log_every", "devices", "num_train_timesteps"):
            if getattr(self, name) < 1:
                raise PriorSettingsError(f"prior.{name} must be at least 1, got {getattr(self, name)}")
        if not 0.0 <= self.min_tissue <= 1.0 or not 0.0 <= self.cfg_dropout < 1.0:
            raise PriorSettingsError("prior.min_tissue must be in [0, 1] and prior.cfg_dropout in [0, 1)")
        if self.beta_schedule not in BETA_SCHEDULES:
            raise PriorSettingsError(f"prior.beta_schedule {self.beta_schedule!r}: expected one of {BETA_SCHEDULES}")
        if self.learning_rate <= 0 or self.warmup_steps < 0:
            raise PriorSettingsError("prior.learning_rate must be > 0 and prior.warmup_steps >= 0")

    def scheduler_config(self) -> dict[str, Any]:
        return {"num_train_timesteps": self.num_train_timesteps, "beta_schedule": self.beta_schedule,
                "prediction_type": "epsilon", "clip_sample": False}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PriorSettings:
        from pipeline.config import settings_from_table

        return settings_from_table(cls, data, "prior")
