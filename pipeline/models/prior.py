"""The embedding-grid prior: a diffusers `DiffusionPipeline` over k x k grids of SSL embeddings.

A grid sample is a tensor [d + 1, k, k]: channels 0..d-1 hold each position's embedding,
L2-normalised (as the LDM's condition stage sees it) and projected on the training positions' d
leading principal components, whitened (``projection``); channel d is the presence mask, +1 where
the position is tissue and -1 where it is background (whose embedding channels are 0). The
projection keeps the DiT's tokens narrow: a token of width w can carry only w of the noise's
channels, so a 384- or 1536-wide embedding through a 256-wide DiT cannot be denoised whole (the
noise left in the other channels is what the loss would plateau at).

Components: ``transformer``, a `DiTTransformer2DModel` with patch size 1 (one token per grid
position), conditioned on the dataset (class label = its index in ``datasets``; label
``len(datasets)`` is the null label of classifier-free guidance), epsilon prediction;
``projection``, an `EmbeddingProjection` (mean, basis and scales as safetensors buffers); and
``scheduler``, the `DDPMScheduler` it was trained with. Saved with ``save_pretrained``
(``model_index.json``, safetensors); load with :func:`load_prior` or ``from_pretrained``.
Sampling grids larger than k x k: `pipeline.sampling.prior_grid`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, DiffusionPipeline, DiTTransformer2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from pipeline.errors import PipelineError

PRIOR_FORMAT = "rldiff-grid-prior/1"
PRIOR_INDEX = "model_index.json"


class PriorError(PipelineError):
    """A prior folder that cannot be used as asked: the message names it and why."""


def unit_rows(embeddings: np.ndarray | torch.Tensor):
    """Rows scaled to unit L2 norm (a zero row stays zero), as the condition stage normalises."""
    if isinstance(embeddings, torch.Tensor):
        return torch.nn.functional.normalize(embeddings, dim=-1)
    norms = np.linalg.norm(embeddings, axis=-1, keepdims=True)
    return np.divide(embeddings, norms, out=np.zeros_like(embeddings), where=norms > 0)


class EmbeddingProjection(ModelMixin, ConfigMixin):
    """Unit embeddings (width D) <-> whitened coordinates on their d leading principal components."""

    @register_to_config
    def __init__(self, width: int, components: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(width))
        self.register_buffer("basis", torch.zeros(components, width))  # rows: principal directions
        self.register_buffer("scale", torch.ones(components))  # their standard deviations

    @classmethod
    def from_moments(cls, mean: np.ndarray, covariance: np.ndarray,
                     components: int | None) -> tuple[EmbeddingProjection, float]:
        """PCA from the unit embeddings' mean (D,) and covariance (D, D): at most `components`
        directions, only those with variance (the data's rank bounds them). Returns the projection
        and the share of the variance it keeps."""
        variances, vectors = np.linalg.eigh(np.asarray(covariance, dtype=np.float64))
        variances, vectors = np.clip(variances[::-1], 0.0, None), vectors[:, ::-1]
        rank = int((variances > variances[0] * 1e-6).sum()) if variances[0] > 0 else 0
        keep = max(1, min(rank, components or len(variances)))
        projection = cls(width=len(variances), components=keep)
        projection.mean.copy_(torch.from_numpy(np.asarray(mean, dtype=np.float32)))
        projection.basis.copy_(torch.from_numpy(vectors[:, :keep].T.astype(np.float32)))
        projection.scale.copy_(torch.from_numpy(np.sqrt(np.maximum(variances[:keep], 1e-16)).astype(np.float32)))
        kept = float(variances[:keep].sum() / variances.sum()) if variances.sum() > 0 else 1.0
        return projection, kept

    def encode(self, unit: np.ndarray) -> np.ndarray:
        """(..., D) unit embeddings -> (..., d) whitened coordinates."""
        data = torch.from_numpy(np.asarray(unit, dtype=np.float32))
        return (((data - self.mean) @ self.basis.T) / self.scale).numpy()

    def decode(self, coordinates: np.ndarray) -> np.ndarray:
        """(..., d) whitened coordinates -> (..., D) unit embeddings."""
        data = torch.from_numpy(np.asarray(coordinates, dtype=np.float32))
        return unit_rows((self.mean + (data * self.scale) @ self.basis).numpy())


class EmbeddingGridPrior(DiffusionPipeline):
    """A diffusion model of k x k grids of SSL embeddings with their tissue mask."""

    source = ""  # the folder it was loaded from (set by load_prior)

    def __init__(self, transformer: DiTTransformer2DModel, projection: EmbeddingProjection, scheduler: DDPMScheduler,
                 embedding_key: str | None = None, datasets: list[str] | None = None,
                 provenance: dict[str, Any] | None = None) -> None:
        super().__init__()
        if int(transformer.config.in_channels) != int(projection.config.components) + 1:
            raise PriorError(f"a transformer of {transformer.config.in_channels} channels for a projection on "
                             f"{projection.config.components} components (+1 mask channel expected)")
        self.register_modules(transformer=transformer, projection=projection, scheduler=scheduler)
        self.register_to_config(embedding_key=embedding_key, datasets=list(datasets or []),
                                provenance=dict(provenance or {}))

    @property
    def embedding_dim(self) -> int:
        """D: the width of the embeddings it samples."""
        return int(self.projection.config.width)

    @property
    def channels(self) -> int:
        """d + 1: the model's channels per grid position (projected embedding, then the mask)."""
        return int(self.transformer.config.in_channels)

    @property
    def crop(self) -> int:
        """k: the side of the grids it was trained on (and of its sampling windows)."""
        return int(self.transformer.config.sample_size)

    @property
    def datasets(self) -> list[str]:
        return list(self.config.datasets)

    @property
    def provenance(self) -> dict[str, Any]:
        return dict(self.config.provenance or {})

    def label(self, dataset: str | None) -> int:
        """The class label of a dataset; None: the null label (unconditional)."""
        if dataset is None:
            return len(self.datasets)
        if dataset not in self.datasets:
            raise PriorError(f"{self.source or 'prior'}: trained on datasets {self.datasets}, not {dataset!r}")
        return self.datasets.index(dataset)

    def to_channels(self, embeddings: np.ndarray) -> np.ndarray:
        """(..., D) raw embeddings -> (..., d) model channels (zero rows stay zero)."""
        unit = unit_rows(np.asarray(embeddings, dtype=np.float32))
        present = np.linalg.norm(unit, axis=-1, keepdims=True) > 0
        return np.where(present, self.projection.encode(unit), 0.0).astype(np.float32)

    def to_embeddings(self, channels: np.ndarray) -> np.ndarray:
        """(..., d) model channels -> (..., D) unit-norm embeddings (what the condition stage sees)."""
        return self.projection.decode(channels).astype(np.float32)

    def predict_noise(self, sample: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        weight = next(self.transformer.parameters())
        return self.transformer(sample.to(weight.device, weight.dtype), timesteps.to(weight.device),
                                class_labels=labels.to(weight.device)).sample.float()


def build_transformer(channels: int, crop: int, datasets: int, layers: int, heads: int,
                      head_dim: int) -> DiTTransformer2DModel:
    """A DiT over [channels, crop, crop] grids, one token per position, `datasets` class labels."""
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=head_dim, in_channels=channels,
                                 out_channels=channels, num_layers=layers, sample_size=crop, patch_size=1,
                                 num_embeds_ada_norm=datasets, norm_num_groups=1)


def without_label_dropout(transformer: DiTTransformer2DModel) -> DiTTransformer2DModel:
    """DiT drops class labels at random inside forward (torch's global RNG); training drops them
    itself, from the step's own generator, so that a resumed run repeats an uninterrupted one."""
    for module in transformer.modules():
        if hasattr(module, "token_drop") and hasattr(module, "dropout_prob"):
            module.dropout_prob = 0.0
    return transformer


def load_prior(folder: str | Path) -> EmbeddingGridPrior:
    """A prior export, on the CPU in float32, eval mode, without gradients. Never downloads."""
    folder = Path(folder)
    if not (folder / PRIOR_INDEX).is_file():
        raise PriorError(f"{folder}: not a prior export (no {PRIOR_INDEX}); train one with `snakemake prior`")
    from pipeline.models.loading import from_pretrained_quietly

    prior = from_pretrained_quietly(EmbeddingGridPrior, folder)
    if not isinstance(prior, EmbeddingGridPrior):
        raise PriorError(f"{folder}: {PRIOR_INDEX} names {type(prior).__name__}, not an embedding-grid prior")
    for part in (prior.transformer, prior.projection):
        part.eval().requires_grad_(False)
    prior.set_progress_bar_config(disable=True)
    prior.source = str(folder)
    return prior
