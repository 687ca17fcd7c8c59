"""Per-window weights for averaging overlapping windows (x0 fusion while sampling, pixels while decoding)."""

from __future__ import annotations

import torch

WINDOW_WEIGHTS = ("uniform", "gaussian", "hann")


def gaussian_window_weights(size: int, sigma: float) -> torch.Tensor:
    """(size, size) weights exp(-d^2 / sigma^2) / max, d = distance from the centre on a
    linspace(-1, 1, size) grid in both axes (LID's `gaussian_kernel`). At sigma 0.8 an
    edge pixel still weighs 0.21, a corner 0.04."""
    axis = torch.linspace(-1, 1, size)
    squared_distance = axis[:, None] ** 2 + axis[None, :] ** 2
    weights = torch.exp(-squared_distance / sigma**2)
    return weights / weights.max()


def hann_window_weights(size: int) -> torch.Tensor:
    """(size, size) separable sin^2 taper, sin^2(pi (i + 1/2) / size) per axis: ~0 at the edges
    (never exactly 0), 1 in the middle; shifted by size / 2 the tapers of one axis sum to exactly 1."""
    axis = torch.sin(torch.pi * (torch.arange(size, dtype=torch.float64) + 0.5) / size) ** 2
    return (axis[:, None] * axis[None, :]).float()


def window_weights(kind: str, size: int, sigma: float) -> torch.Tensor:
    """The (size, size) weights of a config's "uniform", "gaussian" (with sigma) or "hann"."""
    if kind == "uniform":
        return torch.ones(size, size)
    if kind == "gaussian":
        return gaussian_window_weights(size, sigma)
    if kind == "hann":
        return hann_window_weights(size)
    raise ValueError(f"window weights {kind!r}: expected one of {WINDOW_WEIGHTS}")
