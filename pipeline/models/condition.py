"""LID's condition stage (`PatchEmbedder`): one SSL embedding -> one cross-attention token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from torch import nn

from pipeline.models.lid_config import ConditionSpec


class PatchEmbeddingCondition(ModelMixin, ConfigMixin):
    """L2-normalise an SSL patch embedding (if the model was trained so) and project it.

    A diffusers model (config.json + safetensors through save_pretrained / from_pretrained). The
    attribute name `patch_fc` matches LID's checkpoints (`cond_stage_model.patch_fc.*`).
    """

    @register_to_config
    def __init__(self, patch_embed_dim: int = 768, target_dim: int = 512, normalize_ssl: bool = False) -> None:
        # Defaults are those of LID's PatchEmbedder.
        super().__init__()
        self.normalize = normalize_ssl
        self.patch_fc = nn.Linear(patch_embed_dim, target_dim)

    @classmethod
    def from_spec(cls, spec: ConditionSpec) -> PatchEmbeddingCondition:
        return cls(patch_embed_dim=spec.patch_embed_dim, target_dim=spec.target_dim, normalize_ssl=spec.normalize_ssl)

    @property
    def embedding_dim(self) -> int:
        return int(self.config.patch_embed_dim)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        """(B, patch_embed_dim) -> (B, 1, target_dim): the UNet's cross-attention context."""
        if self.normalize:
            embedding = F.normalize(embedding, dim=-1)
        return self.patch_fc(embedding).unsqueeze(1)

    def null_context(self, batch_size: int = 1) -> torch.Tensor:
        """The unconditional context the model was trained with: the condition stage of a zero
        embedding (classifier-free dropout replaces embeddings by zeros; see training.module)."""
        weight = self.patch_fc.weight
        return self(torch.zeros(batch_size, self.embedding_dim, dtype=weight.dtype, device=weight.device))
