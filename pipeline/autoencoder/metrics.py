"""Held-out reconstruction figures: PSNR and SSIM of an autoencoder's encode -> decode (the path
the pipeline uses: latents scaled, VQ latents quantised before decoding) and of the trivial answer
at the same latent size, a bicubic down-up resize.

"The same latent size" counts numbers: a latent of c channels at (H/f)² holds c·(H/f)² values, so the
bicubic baseline keeps an image of side round(H/f · sqrt(c / bands)) (for c = bands: the latent side).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchmetrics.functional.image import structural_similarity_index_measure

from pipeline.models import first_stage


def baseline_side(height: int, downsampling: int, latent_channels: int, bands: int) -> int:
    """Side of the bicubic baseline's small image: as many values as the latent."""
    return max(1, round(height / downsampling * math.sqrt(latent_channels / bands)))


def psnr_ssim(reconstructed: torch.Tensor, target: torch.Tensor) -> tuple[float, float]:
    """Mean per-image PSNR (dB) and mean SSIM of images in [0, 1], (N, C, H, W)."""
    mse = (reconstructed - target).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    psnr = float((10 * torch.log10(1.0 / mse)).mean())
    ssim = float(structural_similarity_index_measure(reconstructed, target, data_range=1.0))
    return psnr, ssim


def _unit(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 255.0


@torch.no_grad()
def reconstruct(model, images_uint8: torch.Tensor, batch_size: int) -> torch.Tensor:
    """encode_latents -> decode_latents of every image; [0, 1] float32 (N, C, H, W), on the CPU."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for batch in images_uint8.split(batch_size):
        x = batch.to(device).float() / 127.5 - 1.0
        decoded = first_stage.decode_latents(model, first_stage.encode_latents(model, x))
        out.append(((decoded.float().cpu() + 1) / 2).clamp(0, 1))
    return torch.cat(out)


def bicubic(images_uint8: torch.Tensor, side: int) -> torch.Tensor:
    """Down to side² (antialiased) and back up, bicubic; [0, 1] (N, C, H, W)."""
    x = _unit(images_uint8)
    small = F.interpolate(x, size=(side, side), mode="bicubic", antialias=True, align_corners=False)
    return F.interpolate(small, size=x.shape[-2:], mode="bicubic", align_corners=False).clamp(0, 1)


def reconstruction_metrics(model, images_uint8: torch.Tensor, batch_size: int, prefix: str) -> dict[str, float]:
    psnr, ssim = psnr_ssim(reconstruct(model, images_uint8, batch_size), _unit(images_uint8))
    return {f"psnr_{prefix}": psnr, f"ssim_{prefix}": ssim}


def bicubic_metrics(images_uint8: torch.Tensor, side: int) -> dict[str, float]:
    psnr, ssim = psnr_ssim(bicubic(images_uint8, side), _unit(images_uint8))
    return {"psnr_bicubic": psnr, "ssim_bicubic": ssim}


@torch.no_grad()
def latent_std(model, images_uint8: torch.Tensor, batch_size: int) -> float:
    """Standard deviation of the unscaled latents (the scaling factor is its inverse, as SD's)."""
    device = next(model.parameters()).device
    scale = float(model.config.scaling_factor)
    latents = [first_stage.encode_latents(model, b.to(device).float() / 127.5 - 1.0).cpu() / scale
               for b in images_uint8.split(batch_size)]
    return float(torch.cat(latents).std())
