"""Stage 4: train the latent diffusion model (LID's UNet + condition stage) on latent shards."""

from pipeline.training.config import TrainConfig, model_specs
from pipeline.training.data import EmbeddingWidthError, LatentDataModule, find_latent_shards
from pipeline.training.environment import LaunchDecision, choose_cluster_environment
from pipeline.training.export import export_checkpoint, export_module
from pipeline.training.module import LatentDiffusion
from pipeline.training.run import build_trainer, module_from_checkpoint, train

__all__ = [
    "EmbeddingWidthError", "LatentDataModule", "LatentDiffusion", "LaunchDecision", "TrainConfig",
    "build_trainer", "choose_cluster_environment", "export_checkpoint", "export_module", "find_latent_shards",
    "model_specs", "module_from_checkpoint", "train",
]
