"""Representation-guided latent diffusion for large histopathology and aerial images."""

__version__ = "0.1.0"
