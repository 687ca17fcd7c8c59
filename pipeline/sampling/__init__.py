"""Sampling: patches from embeddings, and large images from embedding grids (overlapping windows)."""

from pipeline.sampling.config import FAST_MODE, LID_MODE, LargeImageConfig
from pipeline.sampling.large_image import (
    LargeImage,
    LargeImageSampler,
    SamplingStats,
    decode_canvas,
    decoded_bands,
    generate_large_image,
    large_image_seam_score,
)
from pipeline.sampling.seams import seam_score, window_boundaries

__all__ = [
    "FAST_MODE",
    "LID_MODE",
    "LargeImage",
    "LargeImageConfig",
    "LargeImageSampler",
    "SamplingStats",
    "decode_canvas",
    "decoded_bands",
    "generate_large_image",
    "large_image_seam_score",
    "seam_score",
    "window_boundaries",
]
