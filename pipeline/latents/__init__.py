"""Stage 3: first-stage latents of the embedded patches (precomputed once for training)."""

from pipeline.latents.autoencoder import Autoencoder, load_autoencoder, random_vq
from pipeline.latents.encode import EncodeSettings, encode_input, flip_equivariance_error

__all__ = ["Autoencoder", "EncodeSettings", "encode_input", "flip_equivariance_error", "load_autoencoder",
           "random_vq"]
