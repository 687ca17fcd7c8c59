"""A trained LightningModule -> the pipeline's model folder (`RLDiffPipeline.save_pretrained`).

The folder (written atomically as a whole) is a diffusers pipeline: ``model_index.json`` (with the
embedding key and the provenance: training step, EMA or not, the training config, the
autoencoder's record and which parts have random weights), ``unet/``, ``vae/`` (the first stage the
latents were made with), ``condition/`` and ``scheduler/`` (the training schedule). Load it with
:func:`pipeline.models.load_pipeline` or diffusers' ``from_pretrained``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler

from pipeline.errors import PipelineError
from pipeline.io.atomic import atomic_dir
from pipeline.models.autoencoder import Autoencoder
from pipeline.models.diffusion_pipeline import PIPELINE_FORMAT, RLDiffPipeline


def export_module(module, folder: str | Path, autoencoder: Autoencoder, use_ema: bool = True,
                  encoder: dict[str, Any] | None = None) -> Path:
    """Export a trained :class:`~pipeline.training.module.LatentDiffusion` (EMA weights if it has them).

    encoder: the record of the encoder whose embeddings it was trained on (name, weights_sha256,
    random_weights: pipeline.embedding.outputs.recorded_encoder), when known.
    """
    unet, condition = module.export_models(use_ema)
    config = module.config
    if autoencoder.latent_channels != config.latent_channels:
        raise PipelineError(f"the autoencoder ({autoencoder.source}) has {autoencoder.latent_channels} latent "
                            f"channels, the model was trained on {config.latent_channels}")
    step = getattr(module, "_exported_step", None)
    provenance = {
        "format": PIPELINE_FORMAT,
        "training": {"global_step": int(module.global_step if step is None else step),
                     "ema": bool(use_ema and module.ema is not None), "train_config": config.to_dict()},
        "autoencoder": autoencoder.record(),
        "encoder": encoder,
        "random_weights": (["autoencoder"] if autoencoder.random_weights else [])
        + ([f"conditioning encoder {encoder['name']}"] if encoder and encoder.get("random_weights") else []),
    }
    pipe = RLDiffPipeline(unet=unet, vae=autoencoder.model, condition=condition,
                          scheduler=DDPMScheduler.from_config(config.scheduler_config()),
                          embedding_key=config.embedding_key, provenance=provenance)
    folder = Path(folder)
    with atomic_dir(folder) as temp:
        pipe.save_pretrained(temp, safe_serialization=True)
    return folder


def export_checkpoint(checkpoint: str | Path, folder: str | Path, autoencoder: Autoencoder,
                      use_ema: bool = True, encoder: dict[str, Any] | None = None) -> Path:
    """Export from a training checkpoint (``last.ckpt`` or ``step-NNNNNN.ckpt``)."""
    from pipeline.training.run import module_from_checkpoint

    module = module_from_checkpoint(checkpoint)
    return export_module(module, folder, autoencoder, use_ema, encoder)
