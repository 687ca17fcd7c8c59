"""A killed latents or training run (SIGKILL of a real `python -m pipeline` process) re-run to the
end gives what an uninterrupted run gives: byte-identical latent shards and manifest; the same
losses after the last checkpoint and the same final weights. (Tiling and embedding: the kill tests
in test_tiling_slide.py and test_embedding.py.)
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import run_pipeline, run_pipeline_killed
from pipeline.cli import training_config
from pipeline.latents import EncodeSettings, encode_input
from pipeline.models.autoencoder import random_vq
from pipeline.training import train
from test_latents import make_embedding_input, real_patches

AUTOENCODER = {"kind": "random", "preset": "tiny-vq-f16", "allow_random_weights": True}
ENCODE_SETTINGS = {"batch_size": 4, "num_workers": 0, "device": "cpu", "flips": "all"}
TRAIN_SETTINGS = {"preset": "small", "latent_size": 16, "batch_size": 8, "learning_rate": 1e-3, "warmup_steps": 5,
                  "max_steps": 12, "checkpoint_every": 4, "log_every": 1, "num_workers": 0, "ema_decay": 0.99,
                  "accelerator": "cpu"}
RUN_SEED = 3

pytestmark = pytest.mark.usefixtures("single_thread_torch")  # as the CLI runs: OMP_NUM_THREADS=1


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Path:
    """An input in the embedding stage's layout: 12 real H&E patches in 4 shards."""
    folder = tmp_path_factory.mktemp("embeddings") / "inputs" / "slideA"
    make_embedding_input(folder, real_patches()[:12], per_shard=3)
    return folder


def encode_latents_args(embeddings: Path, out: Path) -> list[str]:
    return ["encode-latents", "--embeddings", str(embeddings), "--out", str(out),
            "--settings", json.dumps({**ENCODE_SETTINGS, "autoencoder": AUTOENCODER})]


def test_killed_latents_run_resumes_to_identical_bytes(embedded, latent_manifest, tmp_path):
    reference, resumed = latent_manifest.parent, tmp_path / "resumed"  # reference: the same settings, in-process
    run_pipeline_killed("pipeline.latents.encode:encode_shard", 2, encode_latents_args(embedded, resumed))
    assert sorted(p.name for p in resumed.iterdir()) == ["patches-000000.tar", "patches-000001.tar"]  # no manifest
    finished = (resumed / "patches-000000.tar").stat().st_mtime_ns
    run_pipeline(encode_latents_args(embedded, resumed))
    assert (resumed / "patches-000000.tar").stat().st_mtime_ns == finished  # finished shards are kept
    names = sorted(p.name for p in reference.iterdir())
    assert names == sorted(p.name for p in resumed.iterdir()) and "manifest.parquet" in names and len(names) == 5
    for name in names:
        assert (resumed / name).read_bytes() == (reference / name).read_bytes(), name


@pytest.fixture(scope="module")
def latent_manifest(embedded, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents") / "inputs" / "slideA"
    encode_input(embedded, out, random_vq("tiny-vq-f16", seed=0, allow_random_weights=True),
                 EncodeSettings(**ENCODE_SETTINGS))
    return out / "manifest.parquet"


def train_args(run: Path, latents: Path) -> list[str]:
    return ["train", "--run", str(run), "--embedding-key", "hipt_vit_s16", "--seed", str(RUN_SEED),
            "--settings", json.dumps(TRAIN_SETTINGS), "--done", str(run / "done.json"), str(latents)]


def logged_losses(run: Path, version: int) -> dict[int, float]:
    """train/loss by global step from one (re)start's CSV log."""
    metrics = pd.read_csv(run / "logs" / f"version_{version}" / "metrics.csv")
    losses = metrics.dropna(subset=["train/loss"])
    return dict(zip(losses["step"].astype(int), losses["train/loss"]))


@pytest.fixture(scope="module")
def uninterrupted_run(latent_manifest, tmp_path_factory) -> Path:
    """The reference, in this process: the CLI builds the same TrainConfig from the same settings."""
    run = tmp_path_factory.mktemp("uninterrupted")
    train(training_config(TRAIN_SETTINGS, "hipt_vit_s16", seed=RUN_SEED), [latent_manifest.parent], run,
          enable_progress_bar=False)
    return run


# Where the run is killed; either way the newest complete checkpoint is that of step 4.
KILL_POINTS = {
    "during_step_7": ("pipeline.training.module:LatentDiffusion.training_step", 7),
    # torch.save calls: step-4 and last at step 4, step-8, then last at step 8, killed before its rename
    "while_saving_last_ckpt_at_step_8": ("torch:save", 4),
}


@pytest.mark.parametrize("kill_point", sorted(KILL_POINTS))
def test_killed_training_continues_from_the_last_checkpoint_with_the_same_losses(kill_point, latent_manifest,
                                                                                uninterrupted_run, tmp_path):
    resumed = tmp_path / "resumed"
    run_pipeline_killed(*KILL_POINTS[kill_point], train_args(resumed, latent_manifest))
    assert not (resumed / "done.json").exists()
    assert torch.load(resumed / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4
    if kill_point.startswith("while_saving"):
        assert list((resumed / "checkpoints").glob(".last.ckpt.tmp-*"))  # killed mid-save indeed
    finished = run_pipeline(train_args(resumed, latent_manifest), text=True)
    # Progress on stdout (the console, under Snakemake), one line per 1/20 of the run: every step here.
    assert "resumed: training to step 12, continuing at step 4" in finished.stdout
    assert "resumed: step 12/12 (100 %), loss " in finished.stdout and "steps/s" in finished.stdout
    assert json.loads((resumed / "done.json").read_text())["max_steps"] == 12
    assert not list((resumed / "checkpoints").glob(".*"))  # the half-written checkpoint was removed
    expected = logged_losses(uninterrupted_run, 0)
    killed, continued = logged_losses(resumed, 0), logged_losses(resumed, 1)
    assert sorted(expected) == list(range(12)) and sorted(continued) == list(range(4, 12))
    for losses in (killed, continued):
        steps = sorted(losses)
        np.testing.assert_allclose([losses[s] for s in steps], [expected[s] for s in steps], rtol=0, atol=1e-6)
    final, reference = (torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
                        for run in (resumed, uninterrupted_run))
    assert final.keys() == reference.keys()
    for key, value in final.items():
        assert torch.allclose(value, reference[key], rtol=0, atol=1e-6), key
