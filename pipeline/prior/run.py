"""Train the grid prior on datasets' embedding grids (held-out inputs never trained on) and export
it (see :mod:`pipeline.prior.outputs` for the folder).

A re-run with the same output folder continues from ``checkpoints/last.ckpt`` (weights,
optimiser, EMA, step; the batch stream restarts at the restored step), so a killed run ends with
the weights of an uninterrupted one (exactly on a CPU). The trainer, its atomic checkpoints and
the resume checks are the diffusion model's (pipeline.training.run.fit_resumable).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from diffusers import DDPMScheduler
from lightning.pytorch.callbacks import Callback

from pipeline.io.atomic import atomic_dir, remove_path
from pipeline.models.prior import PRIOR_FORMAT, EmbeddingGridPrior
from pipeline.prior.data import CropDataModule, CropIndex, read_training_grids
from pipeline.prior.module import GridPriorModule
from pipeline.prior.outputs import GRIDS_WORK_DIR, MODEL_DIR, write_prior_record
from pipeline.prior.settings import PriorSettings
from pipeline.training.run import LossHistory, fit_resumable


def export_prior(module: GridPriorModule, index: CropIndex, datasets: Sequence[str], folder: Path,
                 provenance: dict[str, Any], use_ema: bool = True) -> EmbeddingGridPrior:
    settings = module.config
    prior = EmbeddingGridPrior(
        transformer=module.export_transformer(use_ema), projection=index.projection,
        scheduler=DDPMScheduler.from_config(settings.scheduler_config()), embedding_key=settings.embedding_key,
        datasets=list(datasets),
        provenance={"format": PRIOR_FORMAT, "ema": bool(use_ema and module.ema is not None), **provenance})
    with atomic_dir(folder) as temp:
        prior.save_pretrained(temp, safe_serialization=True)
    return prior


def train_prior(embeddings: Mapping[str, str | Path], out_dir: str | Path, settings: PriorSettings, *,
                holdout_inputs: Mapping[str, Sequence[str]] | None = None, callbacks: Sequence[Callback] = (),
                **trainer_overrides: Any) -> dict[str, Any]:
    """The whole stage for one prior over `embeddings` ({dataset: its embeddings folder}): read the
    grids, train, export ``model/``, then write ``prior.json``. Returns that record."""
    out_dir = Path(out_dir)
    started = time.perf_counter()
    datasets = sorted(embeddings)
    work = out_dir / GRIDS_WORK_DIR
    remove_path(work)
    grids, left_out = read_training_grids(embeddings, holdout_inputs or {}, work, settings.embedding_key)
    try:
        index = CropIndex(grids, datasets, settings)
        width = int(grids[0].grid.embeddings.shape[2])
        channels = int(index.projection.config.components) + 1
        history = LossHistory()
        _, module = fit_resumable(settings, out_dir, lambda resuming: GridPriorModule(settings, channels, len(datasets)),
                                  CropDataModule(index, settings), [history, *callbacks], **trainer_overrides)
        step = int(module.global_step)
        provenance = {"settings": settings.to_dict(), "global_step": step,
                      "inputs": {d: sorted(g.input_id for g in grids if g.dataset == d) for d in datasets},
                      "heldout_inputs": left_out, "crops": len(index), "components": channels - 1,
                      "kept_variance": index.kept_variance}
        export_prior(module.cpu(), index, datasets, out_dir / MODEL_DIR, provenance)
    finally:
        remove_path(work)
    losses = history.losses[-max(1, settings.log_every):]
    record = {"datasets": datasets, "embedding_key": settings.embedding_key, "crop": settings.crop,
              "width": width, "components": channels - 1, "kept_variance": round(index.kept_variance, 6), "steps": step, "crops": len(index), "inputs": provenance["inputs"],
              "heldout_inputs": left_out, "final_loss": sum(losses) / len(losses) if losses else None,
              "seconds": round(time.perf_counter() - started, 1), "model": MODEL_DIR}
    write_prior_record(out_dir, record)
    return record
