"""Architecture presets: LID config numbers -> diffusers constructor kwargs and scheduler config.

All functions return plain dicts, so they can be inspected, logged and compared without building
a network.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.models.lid_config import ScheduleSpec, LidConfig, UNetSpec, VQSpec, parse_lid_config


def unet_kwargs(spec: UNetSpec) -> dict[str, Any]:
    """Kwargs for diffusers `UNet2DConditionModel` that rebuild LID's CompVis UNet."""
    channels = [spec.model_channels * mult for mult in spec.channel_mult]
    # Level i of the CompVis UNet runs at downsampling factor 2**i; attention_resolutions lists factors.
    attends = [2**level in spec.attention_resolutions for level in range(len(channels))]
    heads = [spec.heads_at(c) for c in channels]
    return {
        "sample_size": spec.image_size,
        "in_channels": spec.in_channels,
        "out_channels": spec.out_channels,
        "down_block_types": tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        "mid_block_type": "UNetMidBlock2DCrossAttn",  # LID's middle block always has a transformer
        "up_block_types": tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        "block_out_channels": tuple(channels),
        "layers_per_block": spec.num_res_blocks,
        "cross_attention_dim": spec.context_dim,
        # diffusers' legacy name: for UNet2DConditionModel this is the number of heads per block.
        "attention_head_dim": heads[0] if len(set(heads)) == 1 else tuple(heads),
        "transformer_layers_per_block": spec.transformer_depth,
        "use_linear_projection": False,  # CompVis proj_in/proj_out are 1x1 convolutions
        "flip_sin_to_cos": True,  # CompVis timestep embedding is [cos, sin]
        "freq_shift": 0,
        "norm_num_groups": 32,
        "norm_eps": 1e-5,
        "act_fn": "silu",
    }


def vq_kwargs(spec: VQSpec, scaling_factor: float) -> dict[str, Any]:
    """Kwargs for diffusers `VQModel` that rebuild LID's CompVis VQ autoencoder.

    `scaling_factor` must come from the LID config (1.0 for LID's models); diffusers'
    default 0.18215 belongs to Stable Diffusion's KL autoencoder and would be wrong here.
    """
    levels = len(spec.ch_mult)
    return {
        "in_channels": spec.in_channels,
        "out_channels": spec.out_channels,
        "down_block_types": ("DownEncoderBlock2D",) * levels,
        "up_block_types": ("UpDecoderBlock2D",) * levels,
        "block_out_channels": tuple(spec.ch * mult for mult in spec.ch_mult),
        "layers_per_block": spec.num_res_blocks,
        "act_fn": "silu",
        "latent_channels": spec.z_channels,
        "vq_embed_dim": spec.embed_dim,
        "num_vq_embeddings": spec.n_embed,
        "sample_size": spec.resolution,
        "norm_num_groups": 32,
        "norm_type": "group",
        "mid_block_add_attention": True,
        "scaling_factor": scaling_factor,
    }


def compvis_betas(spec: ScheduleSpec) -> np.ndarray:
    """LID's training betas in float64 (the checkpoint stores them cast to float32)."""
    root = np.linspace(spec.linear_start**0.5, spec.linear_end**0.5, spec.timesteps, dtype=np.float64)
    return root**2


def scheduler_config(spec: ScheduleSpec) -> dict[str, Any]:
    """Config for diffusers DDPM/DDIM schedulers matching LID's training schedule.

    CompVis "linear" is diffusers "scaled_linear" (linear in sqrt(beta)). diffusers computes it in
    float32, so its betas may differ from `compvis_betas` in the last float32 bit.
    """
    return {
        "num_train_timesteps": spec.timesteps,
        "beta_start": spec.linear_start,
        "beta_end": spec.linear_end,
        "beta_schedule": "scaled_linear",
        "prediction_type": "epsilon",
        "clip_sample": False,
    }


def lid_full_size_config_dict(patch_embed_dim: int = 384) -> dict[str, Any]:
    """The `model` section of LID's released configs (BRCA/CRC/NAIP), as the YAML would load.

    `patch_embed_dim` is the SSL embedding size of the dataset's encoder (384 HIPT, 768 iBOT/ViT-B).
    """
    return {
        "model": {
            "target": "ldm.models.diffusion.ddpm.LatentDiffusion",
            "params": {
                "linear_start": 0.0015, "linear_end": 0.0195, "timesteps": 1000,
                "num_timesteps_cond": 1, "log_every_t": 200, "first_stage_key": "image",
                "cond_stage_key": "hybrid", "image_size": 64, "channels": 3,
                "cond_stage_trainable": True, "conditioning_key": "crossattn", "use_ema": False,
                "unet_config": {
                    "target": "ldm.modules.diffusionmodules.openaimodel.UNetModel",
                    "params": {
                        "use_checkpoint": True, "use_fp16": True, "image_size": 64,
                        "in_channels": 3, "out_channels": 3, "model_channels": 192,
                        "attention_resolutions": [8, 4, 2], "num_res_blocks": 2,
                        "channel_mult": [1, 2, 3, 5], "num_heads": 1,
                        "use_spatial_transformer": True, "transformer_depth": 1, "context_dim": 512,
                    },
                },
                "first_stage_config": {
                    "target": "ldm.models.autoencoder.VQModelInterface",
                    "params": {
                        "embed_dim": 3, "n_embed": 8192,
                        "ddconfig": {
                            "double_z": False, "z_channels": 3, "resolution": 256, "in_channels": 3,
                            "out_ch": 3, "ch": 128, "ch_mult": [1, 2, 4], "num_res_blocks": 2,
                            "attn_resolutions": [], "dropout": 0.0,
                        },
                        "lossconfig": {"target": "torch.nn.Identity"},
                    },
                },
                "cond_stage_config": {
                    "target": "ldm.modules.encoders.modules.PatchEmbedder",
                    "params": {"patch_ssl_key": "feat_patch", "patch_embed_dim": patch_embed_dim,
                               "target_dim": 512, "normalize_ssl": True},
                },
            },
        }
    }


LID_FULL_SIZE: LidConfig = parse_lid_config(lid_full_size_config_dict(), "<LID full-size preset>")
