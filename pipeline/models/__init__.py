"""Seed (Large-Image-Diffusion) models as diffusers modules: config presets, conversion, loading."""

from pipeline.models.errors import SeedFormatError
from pipeline.models.seed_checkpoint import SeedModel, load_seed_checkpoint

__all__ = ["SeedFormatError", "SeedModel", "load_seed_checkpoint"]
