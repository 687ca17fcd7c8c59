"""The prior's training data: k x k crops of the training slides' embedding grids, and the
deterministic, resumable stream of batches (batch ``s`` is a function of the run seed and ``s``
alone: its crops, their symmetry, the label dropout, the noise and the timesteps).

A crop is [d + 1, k, k] (pipeline.models.prior: unit embeddings on the training positions' d
leading principal components, whitened, then the mask channel, +1 tissue / -1 background). Crops with less tissue than ``min_tissue`` of their positions
are not drawn. Each drawn crop gets one of the grid's 8 symmetries (4 rotations, with or without
a transpose): tissue has no preferred orientation.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from pipeline.embedding.grids import SlideGrid, crop_origins, grid_from_embeddings
from pipeline.embedding.outputs import read_embedding_index
from pipeline.errors import PipelineError
from pipeline.models.prior import EmbeddingProjection, unit_rows
from pipeline.prior.settings import PriorSettings

_STEP_STREAM = 0x9A1D
SYMMETRIES = 8


class NoCropsError(PipelineError):
    """No k x k crop of any training grid has enough tissue."""


@dataclass(frozen=True, eq=False)
class TrainingGrid:
    dataset: str
    input_id: str
    grid: SlideGrid


def unit_moments(grids: Sequence[TrainingGrid]) -> tuple[np.ndarray, np.ndarray]:
    """Mean (D,) and covariance (D, D) of the unit-normalised embeddings at every tissue position,
    accumulated a grid row at a time."""
    total = products = None
    count = 0
    for item in grids:
        for row in range(item.grid.shape[0]):
            present = item.grid.tissue[row]
            if not present.any():
                continue
            unit = unit_rows(np.asarray(item.grid.embeddings[row][present], dtype=np.float64))
            total = unit.sum(0) if total is None else total + unit.sum(0)
            products = unit.T @ unit if products is None else products + unit.T @ unit
            count += len(unit)
    if not count:
        raise NoCropsError("no tissue position in any training grid")
    mean = total / count
    return mean, products / count - np.outer(mean, mean)


def apply_symmetry(crop: np.ndarray, symmetry: int) -> np.ndarray:
    """One of the 8 symmetries of a square grid on a [C, k, k] crop: rot90 by symmetry % 4, then
    a transpose when symmetry >= 4."""
    out = np.rot90(crop, symmetry % 4, axes=(1, 2))
    if symmetry >= 4:
        out = out.transpose(0, 2, 1)
    return np.ascontiguousarray(out)


def crop_sample(grid: SlideGrid, row: int, col: int, crop: int, projection: EmbeddingProjection) -> np.ndarray:
    """The [d + 1, k, k] training sample of the crop at (row, col)."""
    embeddings = np.asarray(grid.embeddings[row : row + crop, col : col + crop], dtype=np.float32)
    tissue = grid.tissue[row : row + crop, col : col + crop]
    channels = np.where(tissue[..., None], projection.encode(unit_rows(embeddings)), 0.0)
    mask = np.where(tissue, 1.0, -1.0)[..., None]
    return np.concatenate([channels, mask], axis=-1).transpose(2, 0, 1).astype(np.float32)


class CropIndex:
    """Every usable crop of the training grids, with the dataset label of its grid."""

    def __init__(self, grids: Sequence[TrainingGrid], datasets: Sequence[str], settings: PriorSettings) -> None:
        self.grids, self.settings = list(grids), settings
        found = [(i, origin) for i, item in enumerate(self.grids)
                 for origin in crop_origins(item.grid.tissue, settings.crop, settings.min_tissue)]
        if not found:
            sizes = {f"{g.dataset}/{g.input_id}": g.grid.shape for g in self.grids}
            raise NoCropsError(f"no {settings.crop}x{settings.crop} crop with at least {settings.min_tissue:.0%} "
                               f"tissue in the training grids {sizes}: lower prior.crop or prior.min_tissue")
        self.grid_of = np.array([i for i, _ in found], dtype=np.int64)
        self.origins = np.stack([origin for _, origin in found])
        self.labels = np.array([list(datasets).index(self.grids[i].dataset) for i in self.grid_of], dtype=np.int64)
        self.null_label = len(datasets)
        self.projection, self.kept_variance = EmbeddingProjection.from_moments(*unit_moments(self.grids),
                                                                               settings.components)

    def __len__(self) -> int:
        return len(self.origins)

    def crop(self, index: int, symmetry: int = 0) -> np.ndarray:
        row, col = self.origins[index]
        grid = self.grids[self.grid_of[index]].grid
        return apply_symmetry(crop_sample(grid, int(row), int(col), self.settings.crop, self.projection), symmetry)


def step_batch(index: CropIndex, settings: PriorSettings, step: int) -> dict[str, torch.Tensor]:
    """Batch number `step`: a function of (seed, step) only."""
    rng = np.random.default_rng([settings.seed, _STEP_STREAM, step])
    size = settings.batch_size
    picks = rng.integers(0, len(index), size)
    symmetries = rng.integers(0, SYMMETRIES, size)
    samples = np.stack([index.crop(int(i), int(s)) for i, s in zip(picks, symmetries)])
    labels = np.where(rng.random(size) < settings.cfg_dropout, index.null_label, index.labels[picks])
    noise = rng.standard_normal(samples.shape, dtype=np.float32)
    timesteps = rng.integers(0, settings.num_train_timesteps, size)
    return {"grids": torch.from_numpy(samples), "labels": torch.from_numpy(labels),
            "noise": torch.from_numpy(noise), "timesteps": torch.from_numpy(timesteps), "step": torch.tensor(step)}


class CropBatches(IterableDataset):
    def __init__(self, index: CropIndex, settings: PriorSettings, start_step: int = 0) -> None:
        super().__init__()
        self.index, self.settings, self.start_step = index, settings, start_step

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        step = self.start_step
        while True:
            yield step_batch(self.index, self.settings, step)
            step += 1


class CropDataModule(L.LightningDataModule):
    """The crop stream for Lightning, starting where the (restored) run stands."""

    def __init__(self, index: CropIndex, settings: PriorSettings) -> None:
        super().__init__()
        self.index, self.settings = index, settings

    def train_dataloader(self) -> DataLoader:
        # Called after a resumed run's loops are restored: global_step is the step to continue with.
        start = self.trainer.global_step if self.trainer is not None else 0
        return DataLoader(CropBatches(self.index, self.settings, start), batch_size=None, num_workers=0)


def read_training_grids(embeddings: Mapping[str, str | Path], holdout_inputs: Mapping[str, Sequence[str]],
                        work: Path, embedding_key: str) -> tuple[list[TrainingGrid], dict[str, list[str]]]:
    """The grids of every input not held out, per dataset (written as memmaps under `work`), and
    the held-out inputs that were left out."""
    grids, left_out = [], {}
    for dataset, folder in embeddings.items():
        held = set(holdout_inputs.get(dataset, ()))
        inputs = sorted(set(read_embedding_index(folder).rows.input_id.astype(str)))
        left_out[dataset] = [i for i in inputs if i in held]
        for input_id in inputs:
            if input_id in held:
                continue
            grid = grid_from_embeddings(folder, input_id, embedding_key, work / dataset / input_id)
            grids.append(TrainingGrid(dataset, input_id, grid))
    if not grids:
        raise NoCropsError(f"no input left to train the prior on (held out: {left_out})")
    return grids, left_out
