"""The one model type: a diffusers `DiffusionPipeline` that turns SSL embeddings into patches.

Components (each saved by its own `save_pretrained`, safetensors, no pickle):

- ``unet``: `UNet2DConditionModel`, epsilon prediction, conditioned by cross-attention;
- ``vae``: the first stage, `VQModel` (LID's VQ-f4) or `AutoencoderKL`;
- ``condition``: `PatchEmbeddingCondition`, one SSL embedding -> one context token;
- ``scheduler``: `DDPMScheduler`, the training schedule; samplers are built from its config.

Config (in ``model_index.json``): ``embedding_key``, the encoder whose embeddings condition the
model, and ``provenance``: where every part came from (a LID release or a training run, the
autoencoder's record, ``random_weights`` of the parts that were randomly initialised).

Load a folder with `pipeline.models.load_pipeline` (also LID release folders), or with plain
diffusers::

    RLDiffPipeline.from_pretrained(folder)
    DiffusionPipeline.from_pretrained(folder, custom_pipeline=<this file>, trust_remote_code=True)

This file is also loaded as a diffusers custom pipeline: it uses absolute imports only.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.utils import BaseOutput

from pipeline.io.precision import autocast
from pipeline.models import first_stage
from pipeline.models.condition import PatchEmbeddingCondition
from pipeline.models.guidance import guided_epsilon, needs_unconditional
from pipeline.models.schedulers import build_scheduler

PIPELINE_FORMAT = "rldiff-pipeline/1"
PATCH_SAMPLERS = ("plms", "ddim", "dpmsolver++")


@dataclass
class PatchOutput(BaseOutput):
    images: np.ndarray | None  # (B, H, W, bands) uint8; None for output_type "latent"
    latents: torch.Tensor  # (B, C, h, w) float32, on the CPU
    unet_evaluations: int  # one latent through the UNet once (conditional and unconditional count apart)


class RLDiffPipeline(DiffusionPipeline):
    """Representation-guided latent diffusion (LID's model): SSL embedding -> image patch."""

    model_cpu_offload_seq = "condition->unet->vae"
    source = ""  # the folder it was loaded from (set by load_pipeline), for messages and records

    def __init__(self, unet: UNet2DConditionModel, vae, condition: PatchEmbeddingCondition,
                 scheduler: DDPMScheduler, embedding_key: str | None = None,
                 provenance: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.register_modules(unet=unet, vae=vae, condition=condition, scheduler=scheduler)
        self.register_to_config(embedding_key=embedding_key, provenance=dict(provenance or {}))

    # --- what the samplers need to know ------------------------------------------------------------
    @property
    def latent_size(self) -> int:
        return int(self.unet.config.sample_size)

    @property
    def latent_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def image_bands(self) -> int:
        """Bands of the decoded images: the autoencoder's output channels (3 for RGB; 4 for R, G, B, NIR)."""
        return int(self.vae.config.out_channels)

    @property
    def embedding_dim(self) -> int:
        return self.condition.embedding_dim

    @property
    def downsampling_factor(self) -> int:
        return first_stage.downsampling_factor(self.vae)

    @property
    def embedding_key(self) -> str | None:
        return self.config.embedding_key

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.config.provenance or {})

    @property
    def random_parts(self) -> list[str]:
        """The parts that were randomly initialised (their outputs mean nothing), e.g. ['autoencoder']."""
        return list(self.provenance.get("random_weights") or [])

    @property
    def random_weights(self) -> bool:
        return bool(self.random_parts)

    @property
    def scheduler_config(self) -> dict[str, Any]:
        """The training schedule as a diffusers scheduler config (epsilon prediction)."""
        return {key: value for key, value in dict(self.scheduler.config).items() if not key.startswith("_")}

    @property
    def training_betas(self) -> np.ndarray:
        """The training betas in float64: LID's own values where the release gave them (its
        float64 schedule), else the scheduler's."""
        trained = self.scheduler.config.get("trained_betas")
        if trained is not None:
            return np.asarray(trained, dtype=np.float64)
        return self.scheduler.betas.double().numpy()

    # --- the parts ---------------------------------------------------------------------------------
    def context(self, embeddings: torch.Tensor) -> torch.Tensor:
        weight = self.condition.patch_fc.weight
        return self.condition(embeddings.to(weight.device, weight.dtype))

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in about [-1, 1] (VQ latents quantised first, as LID does)."""
        return first_stage.decode_latents(self.vae, latents)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents, as the latents stage stores them."""
        return first_stage.encode_latents(self.vae, images)

    # --- patches -----------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, embeddings: torch.Tensor | np.ndarray, num_inference_steps: int = 50,
                 guidance_scale: float = 2.0, sampler: str = "plms", eta: float = 0.0,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 timestep_spacing: str = "leading", steps_offset: int = 1, precision: str = "float32",
                 output_type: str = "np", return_dict: bool = True) -> PatchOutput | tuple:
        """One patch per (D,) embedding. The defaults are LID's patch sampling: PLMS, 50 steps,
        classifier-free guidance s = 2, CompVis timesteps 1, 21, ..., 981.

        generator: one CPU generator per patch (or one for all): a patch's noise comes from its
        own generator only, so it does not depend on the batch it is sampled in.
        precision: "float32", "bfloat16" (autocast) or "auto" (bfloat16 on CUDA).
        output_type: "np" (uint8 arrays), "pil", or "latent" (no decoding; images is None).
        """
        if sampler not in PATCH_SAMPLERS:
            raise ValueError(f"sampler {sampler!r}: expected one of {PATCH_SAMPLERS}")
        embeddings = torch.as_tensor(np.asarray(embeddings, dtype=np.float32))
        if embeddings.ndim == 1:
            embeddings = embeddings[None]
        if embeddings.ndim != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(f"embeddings of shape {tuple(embeddings.shape)}: the model's condition stage "
                             f"takes ({self.embedding_dim},) vectors")
        count = len(embeddings)
        generators = generator if isinstance(generator, list) else [generator] * count
        if len(generators) != count:
            raise ValueError(f"{len(generators)} generators for {count} embeddings")
        device = self.unet.device
        scheduler = build_scheduler(sampler, self.scheduler_config, num_inference_steps, prediction_type="epsilon",
                                    timestep_spacing=timestep_spacing, steps_offset=steps_offset)
        shape = (self.latent_channels, self.latent_size, self.latent_size)
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators])
        latents = (latents * scheduler.init_noise_sigma).to(device)
        context = self.context(embeddings)
        guided = needs_unconditional(guidance_scale)
        if guided:
            context = torch.cat([context, self.condition.null_context(count)])
        step_options: dict[str, Any] = {}
        accepted = inspect.signature(scheduler.step).parameters
        if "eta" in accepted:
            step_options["eta"] = eta
        if "generator" in accepted and eta > 0:
            # One noise stream per patch; diffusers draws from CPU generators on the CPU, then moves.
            step_options["generator"] = generators
        evaluations = 0
        for t in self.progress_bar(scheduler.timesteps):
            model_input = scheduler.scale_model_input(latents, t)
            if guided:
                model_input = torch.cat([model_input, model_input])
            timesteps = torch.full((len(model_input),), int(t), device=device)
            with autocast(precision, device):
                epsilon = self.unet(model_input, timesteps, encoder_hidden_states=context).sample.float()
            evaluations += len(model_input)
            if guided:
                conditional, unconditional = epsilon.chunk(2)
                epsilon = guided_epsilon(conditional, unconditional, guidance_scale)
            latents = scheduler.step(epsilon, t, latents, **step_options).prev_sample
        latents = latents.float().cpu()
        if output_type == "latent":
            images = None
        else:
            with autocast(precision, device):
                images = first_stage.to_uint8(self.decode_latents(latents).float())
        if output_type == "pil":
            from PIL import Image

            images = [Image.fromarray(image) for image in images]
        if not return_dict:
            return images, latents, evaluations
        return PatchOutput(images=images, latents=latents, unet_evaluations=evaluations)
