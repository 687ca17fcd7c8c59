"""Hostile inputs past the slide table: GeoTIFFs, what training is fed, checkpoints that do not fit.

Each case ends in a typed error whose message names the file and the reason, and leaves nothing
that looks finished; or, where the input is merely unusual, completes. Slides (zero-byte, absurd
resolution, all background, JPEG 2000, DICOM, scenes, associated images, non-ASCII paths) are the
table of tests/test_tiling_bad_inputs.py, more GeoTIFFs that of tests/test_tiling_aerial.py; the
whole list: docs/hostile_inputs.md.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import SHARED_DATA, make_spec
from pipeline.embedding.checkpoints import CheckpointError
from pipeline.embedding.encoders import build_encoder
from pipeline.io.shards import encode_npy, read_shard, write_shard
from pipeline.latents import EncodeSettings, encode_input
from pipeline.models.autoencoder import random_vq
from pipeline.tiling.aerial import open_aerial_source
from pipeline.tiling.outputs import tile_input
from pipeline.training import TrainConfig, train
from pipeline.training.data import EmbeddingWidthError
from pipeline.training.run import ResumeCheckpointError
from test_latents import make_embedding_input, real_patches

NAIP = SHARED_DATA / "aerial" / "m_4709963_se_14_1_20190904.tif"  # R,G,B,NIR uint8, EPSG:26914, 5 m
CONFIG = TrainConfig(preset="small", latent_size=16, batch_size=4, learning_rate=1e-3, warmup_steps=1, max_steps=2,
                     checkpoint_every=1, log_every=1, num_workers=0, seed=1, accelerator="cpu",
                     embedding_key="hipt_vit_s16", patch_embed_dim=384)
QUIET = {"enable_progress_bar": False}

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@dataclasses.dataclass
class Outcome:
    error: Exception | None  # what the stage's entry point raised
    file: Path  # the hostile file, which the message must name
    leftovers: list[Path]  # outputs that must not exist after a failure


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> Path:
    """One input of latent shards of 8 real H&E patches (2 shards)."""
    root = tmp_path_factory.mktemp("hostile")
    make_embedding_input(root / "embeddings" / "slideA", real_patches()[:8], per_shard=4)
    encode_input(root / "embeddings" / "slideA", root / "latents" / "inputs" / "slideA",
                 random_vq("tiny-vq-f16", seed=0, allow_random_weights=True),
                 EncodeSettings(batch_size=8, num_workers=0, device="cpu", flips="none"))
    return root / "latents"


def raised(action: Callable[[], object]) -> Exception | None:
    try:
        action()
    except Exception as exc:  # noqa: BLE001 - the test inspects what was raised
        return exc
    return None


def tile_geotiff(path: Path, out: Path) -> Outcome:
    status = tile_input(make_spec(kind="aerial", target_mpp=5.0), "x", path, out, open_aerial_source)
    error = None if status["status"] == "done" else RuntimeError(status["message"])
    assert status["band_count"] == 4 and status["bands"] == [1, 2, 3]
    return Outcome(error, path, [])


def geotiff_with_four_bands(tmp_path, latents) -> Outcome:
    """RGB + near-infrared: the configured bands become R, G, B."""
    return tile_geotiff(NAIP, tmp_path / "out")


def geotiff_path_with_spaces_and_non_ascii(tmp_path, latents) -> Outcome:
    path = tmp_path / "NAIP tile ÿ é (copy).tif"
    shutil.copy(NAIP, path)
    return tile_geotiff(path, tmp_path / "out")


def embeddings_of_the_wrong_width(tmp_path, latents) -> Outcome:
    """768-d embeddings where the model takes 384-d (another encoder's shards under the same key)."""
    bad = tmp_path / "latents" / "inputs" / "wide" / "patches-000000.tar"
    source = sorted((latents / "inputs" / "slideA").glob("patches-*.tar"))[0]
    write_shard(bad, [{**s, "hipt_vit_s16.npy": encode_npy(np.ones(768, np.float16))} for s in read_shard(source)])
    run = tmp_path / "run"
    return Outcome(raised(lambda: train(CONFIG, [tmp_path / "latents"], run, **QUIET)), bad,
                   [run / "checkpoints", run / "done.json"])


def resume(tmp_path, latents, write_checkpoint: Callable[[Path], None]) -> Outcome:
    """A run folder whose last.ckpt was written by ``write_checkpoint``; training must not touch it."""
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    write_checkpoint(last)
    before = last.read_bytes()
    error = raised(lambda: train(CONFIG, [latents], tmp_path / "run", **QUIET))
    assert last.read_bytes() == before
    return Outcome(error, last, [tmp_path / "run" / "checkpoints" / "step-000002.ckpt"])


def training_checkpoint_with_foreign_keys(tmp_path, latents) -> Outcome:
    def foreign(path):
        torch.save({"hyper_parameters": {"train_config": CONFIG.to_dict()}, "global_step": 1,
                    "state_dict": {"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3)}}, path)
    return resume(tmp_path, latents, foreign)


def truncated_training_checkpoint(tmp_path, latents) -> Outcome:
    def truncated(path):
        torch.save({"hyper_parameters": {"train_config": CONFIG.to_dict()}, "state_dict": {"x": torch.zeros(4096)}},
                   path)
        path.write_bytes(path.read_bytes()[:5000])  # a node lost while the checkpoint was copied
    return resume(tmp_path, latents, truncated)


def encoder_checkpoint_with_foreign_keys(tmp_path, latents) -> Outcome:
    """A ResNet-style state dict given as HIPT ViT-S/16 weights."""
    weights = tmp_path / "resnet50.pth"
    torch.save({"conv1.weight": torch.zeros(64, 3, 7, 7), "fc.weight": torch.zeros(10, 2048)}, weights)
    return Outcome(raised(lambda: build_encoder("hipt_vit_s16", weights)), weights, [])


# case -> (the entry point under test, error type (None: completes), the reason in the message)
CASES = {
    "geotiff_with_four_bands": (geotiff_with_four_bands, None, ""),
    "geotiff_path_with_spaces_and_non_ascii": (geotiff_path_with_spaces_and_non_ascii, None, ""),
    "embeddings_of_the_wrong_width": (embeddings_of_the_wrong_width, EmbeddingWidthError, r"768-d.*384-d"),
    "training_checkpoint_with_foreign_keys": (training_checkpoint_with_foreign_keys, ResumeCheckpointError,
                                              r"do not fit the model: missing keys .*unexpected keys"),
    "truncated_training_checkpoint": (truncated_training_checkpoint, ResumeCheckpointError,
                                      r"cannot be read as a training checkpoint"),
    "encoder_checkpoint_with_foreign_keys": (encoder_checkpoint_with_foreign_keys, CheckpointError,
                                             r"does not match the .* checkpoint layout"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hostile_input_is_refused_by_name_and_reason_or_completes(case, tmp_path, latents):
    run_case, error_type, reason = CASES[case]
    outcome = run_case(tmp_path, latents)
    if error_type is None:
        assert outcome.error is None, outcome.error
        return
    assert isinstance(outcome.error, error_type), repr(outcome.error)
    message = str(outcome.error)
    assert str(outcome.file) in message, message
    assert re.search(reason, message), message
    assert not [path for path in outcome.leftovers if path.exists()], "a failed run left outputs behind"
