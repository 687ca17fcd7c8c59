"""Stage 3: first-stage latents of the embedded patches (precomputed once for training).

The autoencoders themselves live in `pipeline.models.autoencoder`."""

from pipeline.latents.encode import EncodeSettings, encode_input, flip_equivariance_error

__all__ = ["EncodeSettings", "encode_input", "flip_equivariance_error"]
