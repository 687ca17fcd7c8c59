"""One loader for every model folder the samplers accept, into `RLDiffPipeline`."""

from __future__ import annotations

from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.models.diffusion_pipeline import RLDiffPipeline
from pipeline.models.lid_release import CONFIG_GLOB, load_lid_release

PIPELINE_INDEX = "model_index.json"


def load_pipeline(folder: str | Path) -> RLDiffPipeline:
    """A pipeline export (``model_index.json``: diffusers ``save_pretrained``) or a LID release folder
    (``configs/*-project.yaml`` + ``checkpoints/last.ckpt``), on the CPU in float32, eval mode,
    without gradients. Never downloads."""
    folder = Path(folder)
    if (folder / PIPELINE_INDEX).is_file():
        pipe = from_pretrained_quietly(RLDiffPipeline, folder)
    elif any(folder.glob(CONFIG_GLOB)):
        pipe = load_lid_release(folder)
    elif not folder.is_dir():
        raise FileNotFoundError(f"{folder}: model folder not found")
    elif (folder / "rldiff.json").is_file():
        raise PipelineError(f"{folder}: an export of an earlier version (rldiff.json); export the training run "
                            f"again (`pipeline export-model`) to get a diffusers pipeline folder")
    else:
        raise PipelineError(f"{folder}: neither a pipeline export ({PIPELINE_INDEX}) nor a LID release folder "
                            f"({CONFIG_GLOB})")
    pipe.set_progress_bar_config(disable=True)
    for part in (pipe.unet, pipe.vae, pipe.condition):
        part.eval().requires_grad_(False)
    pipe.source = str(folder)
    return pipe


def from_pretrained_quietly(cls, folder: Path):
    """`from_pretrained` without its per-component progress bar (a redrawn line in job logs) and,
    by saying low_cpu_mem_usage=False, without its advice to install `accelerate` on every load."""
    from diffusers.utils import logging as diffusers_logging

    shown = diffusers_logging.is_progress_bar_enabled()
    diffusers_logging.disable_progress_bar()
    try:
        return cls.from_pretrained(folder, local_files_only=True, low_cpu_mem_usage=False)
    finally:
        if shown:
            diffusers_logging.enable_progress_bar()
