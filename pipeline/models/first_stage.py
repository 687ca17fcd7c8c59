"""Seed-compatible use of the diffusers VQModel.

The seed encodes without quantising (`quant_conv(encoder(x))`) and quantises only when decoding.
diffusers' `VQModel.encode` already stops before quantisation, and `decode(..., force_not_quantize=True)`
runs post_quant_conv + decoder on its input as is; quantisation is done here with the seed's
distance formula so that ties between codebook entries resolve as in the seed.
No latent scaling is applied: the seed's models use scale_factor 1.0 (see SeedModel.scale_factor).
"""

from __future__ import annotations

import torch
from diffusers import VQModel


def encode(vae: VQModel, images: torch.Tensor) -> torch.Tensor:
    """Images in [-1, 1], (B, 3, H, W) -> unquantised latents (B, embed_dim, H/f, W/f)."""
    return vae.encode(images).latents


# Latent pixels per distance matrix: 4096 x 8192 codes x 4 bytes = 128 MiB for the seed's codebook.
QUANTIZE_CHUNK = 4096


def quantize(vae: VQModel, latents: torch.Tensor) -> torch.Tensor:
    """Replace every latent pixel by its nearest codebook vector (squared Euclidean distance)."""
    codebook = vae.quantize.embedding.weight
    flat = latents.permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    codebook_norms = codebook.pow(2).sum(dim=1)
    indices = []
    for chunk in flat.split(QUANTIZE_CHUNK):
        # |z|^2 + |e|^2 - 2 z.e, the seed's (taming VectorQuantizer2) formula, so near-ties resolve alike.
        distances = chunk.pow(2).sum(dim=1, keepdim=True) + codebook_norms - 2 * chunk @ codebook.t()
        indices.append(distances.argmin(dim=1))
    nearest = codebook[torch.cat(indices)]
    b, c, h, w = latents.shape
    return nearest.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous()


def decode(vae: VQModel, latents: torch.Tensor, quantize_first: bool = True) -> torch.Tensor:
    """Latents -> images in about [-1, 1]; quantises first, as the seed's decode does."""
    if quantize_first:
        latents = quantize(vae, latents)
    return vae.decode(latents, force_not_quantize=True).sample
