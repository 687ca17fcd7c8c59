"""The first stage (diffusers VQModel or AutoencoderKL) with LID's encode/decode conventions.

LID encodes without quantising (`quant_conv(encoder(x))`) and quantises only when decoding.
diffusers' `VQModel.encode` already stops before quantisation, and `decode(..., force_not_quantize=True)`
runs post_quant_conv + decoder on its input as is; quantisation is done here with LID's
distance formula so that ties between codebook entries resolve as in LID.
`encode`, `quantize` and `decode` apply no latent scaling (LID's models use scale_factor 1.0);
`encode_latents` / `decode_latents` are what the stages use: either kind of autoencoder, latents
scaled by the model's `scaling_factor` (a KL autoencoder's posterior mean is taken).
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL, VQModel


def encode(vae: VQModel, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, H, W) -> unquantised latents (B, embed_dim, H/f, W/f)."""
    return vae.encode(images).latents


# Latent pixels per distance matrix: 4096 x 8192 codes x 4 bytes = 128 MiB for LID's codebook.
QUANTIZE_CHUNK = 4096


def quantize(vae: VQModel, latents: torch.Tensor) -> torch.Tensor:
    """Replace every latent pixel by its nearest codebook vector (squared Euclidean distance)."""
    codebook = vae.quantize.embedding.weight
    flat = latents.permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    codebook_norms = codebook.pow(2).sum(dim=1)
    indices = []
    for chunk in flat.split(QUANTIZE_CHUNK):
        # |z|^2 + |e|^2 - 2 z.e, LID's (taming VectorQuantizer2) formula, so near-ties resolve alike.
        distances = chunk.pow(2).sum(dim=1, keepdim=True) + codebook_norms - 2 * chunk @ codebook.t()
        indices.append(distances.argmin(dim=1))
    nearest = codebook[torch.cat(indices)]
    b, c, h, w = latents.shape
    return nearest.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()


def decode(vae: VQModel, latents: torch.Tensor, quantize_first: bool = True) -> torch.Tensor:
    """Latents -> images in about [-1, 1]; quantises first, as LID's decode does."""
    if quantize_first:
        latents = quantize(vae, latents)
    return vae.decode(latents, force_not_quantize=True).sample


def encode_latents(vae: VQModel | AutoencoderKL, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], (B, C, H, W) -> scaled latents (B, c, H/f, W/f), float32."""
    if isinstance(vae, VQModel):
        latents = encode(vae, images)
    else:
        latents = vae.encode(images).latent_dist.mode()
    return latents.float() * float(vae.config.scaling_factor)


def decode_latents(vae: VQModel | AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents -> images in about [-1, 1]; VQ latents are quantised first, as LID does."""
    weight = next(vae.parameters())
    latents = latents.to(weight.device, torch.float32) / float(vae.config.scaling_factor)
    if isinstance(vae, VQModel):
        return decode(vae, latents)
    return vae.decode(latents).sample


def latent_channels(vae: VQModel | AutoencoderKL) -> int:
    if isinstance(vae, VQModel):
        return int(vae.config.vq_embed_dim or vae.config.latent_channels)
    return int(vae.config.latent_channels)


def downsampling_factor(vae: VQModel | AutoencoderKL) -> int:
    return 2 ** (len(vae.config.block_out_channels) - 1)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8, truncating as LID's `.to(torch.uint8)`."""
    scaled = ((images + 1) / 2).clamp(0, 1) * 255
    return scaled.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
