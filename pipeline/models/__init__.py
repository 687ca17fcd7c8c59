"""The model: `RLDiffPipeline` (diffusers UNet + first stage + condition stage + scheduler), how
LID's released checkpoints convert into it, and the first-stage autoencoders."""

from pipeline.models.diffusion_pipeline import PatchOutput, RLDiffPipeline
from pipeline.models.errors import LidFormatError
from pipeline.models.lid_release import load_lid_release
from pipeline.models.loading import load_pipeline

__all__ = ["LidFormatError", "PatchOutput", "RLDiffPipeline", "load_lid_release", "load_pipeline"]
