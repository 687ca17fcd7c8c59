"""Build and run the Lightning trainer; resume from ``<run_dir>/checkpoints/last.ckpt``.

Run folder::

    <run_dir>/checkpoints/step-NNNNNN.ckpt   every `checkpoint_every` steps (kept)
    <run_dir>/checkpoints/last.ckpt          the newest state (also written when training ends)
    (each written under a temporary name and renamed: a kill never leaves a truncated checkpoint)
    <run_dir>/logs/version_K/metrics.csv     train/loss and train/lr per logged step, one version per (re)start
    (read with pipeline.training.outputs.read_training_log; the CLI adds done.json, read_training_done)

Calling :func:`train` again with the same run folder continues from ``last.ckpt``: weights,
optimizer, learning-rate schedule, EMA and step are restored, and the data stream starts at the
restored step (see :mod:`pipeline.training.data`), so the losses that follow are those of an
uninterrupted run (exactly on CPU; on GPU up to non-deterministic kernels).

Multi-GPU: with ``devices > 1`` Lightning's DDP launcher re-runs the *command line* of the parent
process once per extra GPU (see :mod:`pipeline.training.environment` for when it does, and when
SLURM does), so :func:`train` must be called from a CLI command or a ``__main__``-guarded script,
and everything before it must be safe to repeat.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from pipeline.errors import PipelineError
from pipeline.io.lightning_run import AtomicCheckpointIO, remove_stale_temporaries
from pipeline.models.condition import PatchEmbeddingCondition
from pipeline.models.lid_release import find_config, load_lid_release
from pipeline.models.lid_config import read_lid_config
from pipeline.training.config import TrainConfig
from pipeline.training.data import LatentDataModule
from pipeline.training.environment import choose_cluster_environment, cluster_plugins
from pipeline.training.outputs import LOGS_DIR
from pipeline.training.module import LatentDiffusion

log = logging.getLogger(__name__)

# The EMA copies are deliberately in eval mode; Lightning warns about every such module.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode", category=UserWarning)
# Raised inside Lightning's own loops about torch's pytree API: nothing a user can act on.
warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


class _DropAdvertisements(logging.Filter):
    """Lightning's hints to install its hosted loggers and model registry."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "\N{ELECTRIC LIGHT BULB} Tip:" not in record.getMessage()


logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(_DropAdvertisements())
# Lightning adds a handler of its own and propagates too, so every line came twice: one handler.
if logging.getLogger().handlers:
    logging.getLogger("lightning").handlers.clear()
# We choose the launch environment ourselves (pipeline.training.environment; logged above each run).
warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system but is not used")

CHECKPOINT_DIR = "checkpoints"
# Settings that may differ when a run is continued; any other change needs a new run folder.
RESUMABLE_CHANGES = ("max_steps", "checkpoint_every", "log_every", "num_workers")
LAST = "last.ckpt"


def resolve_precision(config: Any) -> str:
    """``auto``: bf16 mixed precision on CUDA, full float32 on the CPU."""
    if config.precision != "auto":
        return config.precision
    on_gpu = config.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    return "bf16-mixed" if on_gpu else "32-true"


def _check_lid_init(config: TrainConfig, folder: str) -> None:
    release = read_lid_config(find_config(Path(folder)))
    unet, condition = release.unet, release.condition
    if condition.patch_embed_dim != config.patch_embed_dim:
        raise PipelineError(f"{folder}: its condition stage takes {condition.patch_embed_dim}-d embeddings, "
                         f"but patch_embed_dim is {config.patch_embed_dim}")
    if unet.in_channels != config.latent_channels:
        raise PipelineError(f"{folder}: its UNet takes {unet.in_channels} latent channels, but latent_channels "
                         f"is {config.latent_channels}")


def build_module(config: TrainConfig, load_init_weights: bool = True) -> LatentDiffusion:
    """The model; initialised from ``config.init_from`` (a LID release folder) when set.

    With ``init_from`` the architecture is the release's (its config), whatever ``preset`` says.
    """
    if config.init_from is None:
        return LatentDiffusion(config)
    _check_lid_init(config, config.init_from)
    if load_init_weights:
        release = load_lid_release(config.init_from)
        return LatentDiffusion(config, release.unet, release.condition)
    from diffusers import UNet2DConditionModel

    from pipeline.models.presets import unet_kwargs

    release_config = read_lid_config(find_config(Path(config.init_from)))
    return LatentDiffusion(config, UNet2DConditionModel(**unet_kwargs(release_config.unet)),
                           PatchEmbeddingCondition.from_spec(release_config.condition))


def module_from_checkpoint(path: str | Path, map_location: str = "cpu") -> LatentDiffusion:
    """Rebuild the module from a training checkpoint (config from its hyper-parameters)."""
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    config = TrainConfig.from_dict(checkpoint["hyper_parameters"]["train_config"])
    module = build_module(config, load_init_weights=False)
    module.load_state_dict(checkpoint["state_dict"], strict=True)
    # LightningModule.global_step reads the trainer; keep the checkpoint's step for export records.
    module._exported_step = int(checkpoint.get("global_step", 0))
    return module


class LossHistory(Callback):
    """Keeps (global step before the update, loss) of every training batch on this rank."""

    def __init__(self) -> None:
        self.steps: list[int] = []
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(int(batch["step"]))
        self.losses.append(float(outputs["loss"].detach()))


def build_trainer(config: Any, run_dir: str | Path, callbacks: Sequence[Callback] = (),
                  env: Mapping[str, str] | None = None, **overrides: Any) -> L.Trainer:
    run_dir = Path(run_dir)
    decision = choose_cluster_environment(os.environ if env is None else env, config.devices, config.num_nodes)
    log.info("process launch: %s (%s)", decision.environment, decision.reason)
    checkpoints = ModelCheckpoint(
        dirpath=run_dir / CHECKPOINT_DIR, filename="step-{step:06d}", auto_insert_metric_name=False,
        every_n_train_steps=config.checkpoint_every, save_top_k=-1, save_last=True,
    )
    multi = config.devices * config.num_nodes > 1
    settings: dict[str, Any] = {
        "default_root_dir": str(run_dir),
        "max_steps": config.max_steps,
        "max_epochs": -1,
        "accelerator": config.accelerator,
        "devices": config.devices,
        "num_nodes": config.num_nodes,
        "strategy": "ddp" if multi else "auto",
        "plugins": [*cluster_plugins(decision), AtomicCheckpointIO()],
        "precision": resolve_precision(config),
        "callbacks": [checkpoints, *callbacks],
        "logger": CSVLogger(str(run_dir), name=LOGS_DIR),
        "log_every_n_steps": config.log_every,
        "accumulate_grad_batches": config.accumulate_grad_batches,
        "gradient_clip_val": config.gradient_clip_val,
        "use_distributed_sampler": False,  # each rank's stream is split by node already
        "limit_val_batches": 0,
        "num_sanity_val_steps": 0,
        "enable_model_summary": False,
        # tqdm's redrawn line fills a log file with carriage returns; ProgressLines reports instead.
        "enable_progress_bar": False,
    }
    settings.update(overrides)
    return L.Trainer(**settings)


class ResumeCheckpointError(PipelineError):
    """A run folder's last.ckpt that training cannot continue from; the message names the file and why."""


def read_resume_checkpoint(path: Path, config: Any) -> dict[str, Any]:
    """The checkpoint to continue from, checked: readable, written by this stage, same settings.

    ``config``: the run's settings (TrainConfig, or another training's dataclass with ``from_dict``
    and ``to_dict``), saved in the checkpoint's hyper-parameters as ``train_config``."""
    try:
        saved = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as exc:  # noqa: BLE001 - truncated, foreign or not a torch file at all
        raise ResumeCheckpointError(f"{path}: cannot be read as a training checkpoint ({type(exc).__name__}: "
                                    f"{exc}); move it away to start the run over") from exc
    settings = saved.get("hyper_parameters", {}).get("train_config") if isinstance(saved, dict) else None
    if not isinstance(settings, dict) or not isinstance(saved.get("state_dict"), Mapping):
        raise ResumeCheckpointError(f"{path}: not a checkpoint of this training stage (no train_config and "
                                    "state_dict); move it away to start the run over")
    try:
        settings = type(config).from_dict(settings).to_dict()  # older spellings renewed
    except PipelineError as exc:
        raise ResumeCheckpointError(f"{path}: its training settings are no longer valid ({exc}); use a new "
                                    "run folder") from exc
    changed = {k: (settings.get(k), v) for k, v in config.to_dict().items()
               if k not in RESUMABLE_CHANGES and _norm(settings.get(k)) != _norm(v)}
    if changed:
        raise ResumeCheckpointError(f"{path}: the run was started with other settings (saved, now): {changed}; "
                                    "use a new run folder")
    return saved


def check_weights_fit(state: Mapping[str, torch.Tensor], module: L.LightningModule, path: Path) -> None:
    """Name the keys and shapes that differ, before Lightning's load fails without naming the file."""
    expected = module.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    shapes = [f"{k} {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
              if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if missing or unexpected or shapes:
        problems = [f"{label} ({len(items)}): {items[:5]}" for label, items in
                    (("missing keys", missing), ("unexpected keys", unexpected), ("wrong shapes", shapes)) if items]
        raise ResumeCheckpointError(f"{path}: its weights do not fit the model: " + "; ".join(problems))


def last_checkpoint(run_dir: str | Path) -> Path | None:
    path = Path(run_dir) / CHECKPOINT_DIR / LAST
    return path if path.is_file() else None


def train(config: TrainConfig, shard_paths: Sequence[str | Path], run_dir: str | Path,
          callbacks: Sequence[Callback] = (), env: Mapping[str, str] | None = None,
          **trainer_overrides: Any) -> tuple[L.Trainer, LatentDiffusion]:
    """Train (or continue training) until ``config.max_steps``; returns the trainer and the module."""
    return fit_resumable(config, run_dir, lambda resuming: build_module(config, load_init_weights=not resuming),
                         LatentDataModule(shard_paths, config), callbacks, env, **trainer_overrides)


def fit_resumable(config: Any, run_dir: str | Path, build: Callable[[bool], L.LightningModule],
                  data: L.LightningDataModule, callbacks: Sequence[Callback] = (),
                  env: Mapping[str, str] | None = None, **trainer_overrides: Any) -> tuple[L.Trainer, Any]:
    """Fit ``build(resuming)`` on ``data`` until ``config.max_steps``, continuing from the run folder's
    ``last.ckpt`` (checked against ``config``) when there is one; ``last.ckpt`` is the final state.
    Shared by every model trained here: the data module must resume at the trainer's global step."""
    run_dir = Path(run_dir)
    remove_stale_temporaries(run_dir / CHECKPOINT_DIR)
    resume = last_checkpoint(run_dir)
    saved = read_resume_checkpoint(resume, config) if resume is not None else None
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    module = build(resume is not None)
    if saved is not None:
        check_weights_fit(saved["state_dict"], module, resume)
    trainer = build_trainer(config, run_dir, callbacks, env, **trainer_overrides)
    trainer.fit(module, datamodule=data, ckpt_path=str(resume) if resume else None, weights_only=False)
    # The periodic checkpoint may not fall on the last step: make last.ckpt the final state.
    trainer.save_checkpoint(run_dir / CHECKPOINT_DIR / LAST, weights_only=False)
    return trainer, module


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value
