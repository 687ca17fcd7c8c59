"""What every Lightning training stage (the autoencoder, the diffusion model) shares: checkpoints
written atomically, the clean-up of a killed save, and one progress line every so many steps."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import TorchCheckpointIO

from pipeline.io.atomic import atomic_file, remove_path


class ProgressLines(Callback):
    """One line per ``every`` optimizer steps (and at the end): step, mean loss since the last line,
    speed and time left. Written to ``stream`` (stdout: the Snakemake console shows it while the
    rule's log keeps everything else)."""

    def __init__(self, label: str, total_steps: int, every: int, stream: Any = None) -> None:
        self.label, self.total, self.every = label, total_steps, max(1, every)
        self.stream = stream
        self.losses: list[float] = []
        self.started: float | None = None
        self.first_step = self.reported = 0

    def _print(self, text: str) -> None:
        print(text, file=self.stream or sys.stdout, flush=True)

    def on_train_start(self, trainer, pl_module) -> None:
        self.started, self.first_step = time.perf_counter(), int(trainer.global_step)
        resumed = f", continuing at step {self.first_step}" if self.first_step else ""
        if trainer.is_global_zero:
            self._print(f"{self.label}: training to step {self.total}{resumed}")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.losses.append(float(outputs["loss"].detach()))
        step = int(trainer.global_step)
        due = step % self.every == 0 or step >= self.total
        if not trainer.is_global_zero or not due or step == self.reported:  # (accumulation: one step, many batches)
            return
        self.reported = step
        elapsed = time.perf_counter() - self.started
        rate = (step - self.first_step) / max(elapsed, 1e-9)
        left = (self.total - step) / rate if rate > 0 else float("nan")
        self._print(f"{self.label}: step {step}/{self.total} ({100 * step / self.total:.0f} %), loss "
                    f"{sum(self.losses) / len(self.losses):.4g}, {rate:.2f} steps/s, {_duration(left)} left")
        self.losses.clear()


def _duration(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {seconds:02d} s" if minutes else f"{seconds} s"


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written under a temporary name in their own folder, then renamed, so a job killed
    while saving keeps the previous complete ``last.ckpt``. (Lightning's own writer moves a file
    from the system temp folder: a copy, not a rename, when that is another file system.)"""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} takes no storage_options")
        with atomic_file(path) as temp:
            torch.save(checkpoint, temp)


def remove_stale_temporaries(checkpoint_dir: Path) -> None:
    """Half-written checkpoints of a killed run (atomic_file's temporary names)."""
    for stale in checkpoint_dir.glob(".*.tmp-*"):
        remove_path(stale)
