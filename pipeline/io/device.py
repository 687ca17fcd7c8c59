"""The torch device a stage's `device:` setting names."""

from __future__ import annotations

import torch


def resolve_device(name: str) -> torch.device:
    """'auto' means the first GPU when there is one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
