"""Classifier-free guidance: one scale, one meaning, everywhere.

`scale` is the standard s of eps_u + s (eps_c - eps_u): 1 is the conditional model alone, 0 the
unconditional one. LID's large-image code writes (1 + g) eps_c - g eps_u; that is s = 1 + g.
"""

from __future__ import annotations

import torch


def guided_epsilon(conditional: torch.Tensor, unconditional: torch.Tensor, scale: float) -> torch.Tensor:
    """eps_u + s (eps_c - eps_u), computed as s eps_c - (s - 1) eps_u: the same number, and for
    s = 1 + g bit for bit LID's (1 + g) eps_c - g eps_u."""
    return scale * conditional - (scale - 1) * unconditional


def needs_unconditional(scale: float) -> bool:
    """False where guidance is the conditional prediction alone (s = 1)."""
    return scale != 1.0
