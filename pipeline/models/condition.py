"""The seed's condition stage (`PatchEmbedder`): one SSL embedding -> one cross-attention token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.models.seed_config import ConditionSpec


class PatchEmbeddingCondition(nn.Module):
    """L2-normalise an SSL patch embedding (if the model was trained so) and project it.

    The attribute name `patch_fc` matches the checkpoint (`cond_stage_model.patch_fc.*`).
    """

    def __init__(self, spec: ConditionSpec) -> None:
        super().__init__()
        self.normalize = spec.normalize_ssl
        self.patch_fc = nn.Linear(spec.patch_embed_dim, spec.target_dim)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, patch_embed_dim) -> (B, 1, target_dim): the UNet's cross-attention context."""
        if self.normalize:
            embedding = F.normalize(embedding, dim=-1)
        return self.patch_fc(embedding).unsqueeze(1)
