"""The autoencoder stage on the real demo slide (tiled here): a short run lowers the held-out
reconstruction error of the untrained model and is reported beside the bicubic baseline; a killed
run continued to the end has the weights of an uninterrupted one; the latents stage loads it as
kind `trained`; configs whose bands or latent size do not fit fail naming both numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import DEMO_SLIDE, make_spec, run_pipeline, run_pipeline_killed
from pipeline.autoencoder import read_autoencoder_metrics, trained_model_dir
from pipeline.autoencoder.data import read_patches
from pipeline.autoencoder.run import BandsMismatchError, train_autoencoder
from pipeline.autoencoder.settings import AutoencoderTrainSettings
from pipeline.config import ConfigError, prepare_config
from pipeline.models.autoencoder import load_autoencoder
from pipeline.splits import is_held_out

pytestmark = pytest.mark.usefixtures("single_thread_torch")

HOLDOUT = 0.2
# Small enough for seconds on one core: the demo's autoencoder (workflow_config.yaml), fewer steps.
SETTINGS = AutoencoderTrainSettings(kind="kl", downsampling=16, channels=8, channel_multipliers=(1, 2, 2, 4, 4),
                                    layers_per_block=1, latent_channels=3, attention=False,
                                    crop_size=64, batch_size=4, max_steps=120, learning_rate=0.001,
                                    checkpoint_every=60, log_every=10, accelerator="cpu", seed=0)
RESUME = {**SETTINGS.to_dict(), "max_steps": 8, "checkpoint_every": 4, "log_every": 1}


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> Path:
    """The demo slide tiled at 20x (30 patches of 256 px)."""
    from pipeline.tiling.run import tile_dataset

    out = tmp_path_factory.mktemp("tiles") / "demo"
    spec = make_spec(name="demo", inputs={"demo": str(DEMO_SLIDE)}, image_format="jpg")
    tile_dataset(spec, out)
    return out


@pytest.fixture(scope="module")
def trained(tiles, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("autoencoder") / "demo"
    train_autoencoder(tiles, out, SETTINGS, dataset="demo", holdout_fraction=HOLDOUT)
    return out


def test_a_short_run_lowers_the_heldout_error_and_reports_bicubic(trained):
    metrics = read_autoencoder_metrics(trained)
    assert metrics.heldout_patches > 0 and metrics.train_patches > metrics.heldout_patches
    assert metrics.psnr_ae > metrics.psnr_untrained + 0.5, metrics  # learned, on patches it never saw
    assert metrics.latent_shape == (3, 16, 16) and metrics.bicubic_side == 16  # same number of values
    assert metrics.beats_bicubic == (metrics.psnr_ae > metrics.psnr_bicubic)  # reported either way
    record = json.loads((trained / "metrics.json").read_text())
    assert {"psnr_bicubic", "ssim_bicubic", "ssim_ae"} <= set(record)


def test_the_latents_stage_loads_it_with_its_provenance(trained, tiles):
    autoencoder = load_autoencoder("trained", trained)
    assert autoencoder.kind == "kl" and not autoencoder.random_weights
    assert autoencoder.downsampling_factor == 16 and autoencoder.latent_channels == 3
    record = autoencoder.record()
    assert record["trained"]["dataset"] == "demo" and record["trained"]["steps"] == SETTINGS.max_steps
    patches = read_patches(tiles, (), HOLDOUT).heldout[:2]
    latents = autoencoder.encode(patches.float() / 127.5 - 1)
    assert latents.shape == (2, 3, 16, 16)
    assert 0.3 < float(latents.std()) < 3.0  # scaling_factor makes the latents about unit variance
    assert (trained_model_dir(trained) / "diffusion_pytorch_model.safetensors").is_file()


def test_heldout_patches_are_never_trained_on(tiles):
    split = read_patches(tiles, (), HOLDOUT)
    assert not set(split.train_keys) & set(split.heldout_keys)

    assert all(is_held_out(k, HOLDOUT) for k in split.heldout_keys)
    assert not any(is_held_out(k, HOLDOUT) for k in split.train_keys)


def train_args(tiles: Path, out: Path, settings: dict) -> list[str]:
    spec = make_spec(name="demo", inputs={"demo": str(DEMO_SLIDE)}, holdout_fraction=HOLDOUT)
    table = {k: v for k, v in settings.items() if k not in ("in_channels", "seed")}
    return ["train-autoencoder", "--tiles", str(tiles), "--spec", spec.to_json(), "--settings", json.dumps(table),
            "--seed", "0", "--out", str(out)]


def test_a_killed_run_resumes_to_the_same_weights(tiles, tmp_path):
    reference = tmp_path / "reference"
    run_pipeline(train_args(tiles, reference, RESUME))
    resumed = tmp_path / "resumed"
    run_pipeline_killed("pipeline.autoencoder.module:AutoencoderModule.training_step", 6,  # last.ckpt: step 4
                        train_args(tiles, resumed, RESUME))
    saved = torch.load(resumed / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert saved["global_step"] == RESUME["checkpoint_every"] and not (resumed / "metrics.json").exists()
    run_pipeline(train_args(tiles, resumed, RESUME))
    weights = [load_file(folder / "model" / "diffusion_pytorch_model.safetensors") for folder in (reference, resumed)]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_bands_that_do_not_match_the_autoencoder_fail_naming_both(tiles, tmp_path):
    four = AutoencoderTrainSettings(**{**SETTINGS.to_dict(), "channel_multipliers": SETTINGS.channel_multipliers,
                                       "in_channels": 4})
    with pytest.raises(BandsMismatchError, match="3 bands, but the autoencoder takes 4 channels"):
        train_autoencoder(tiles, tmp_path / "ae", four, dataset="demo", holdout_fraction=HOLDOUT)


def test_the_latents_stage_refuses_an_autoencoder_of_other_channels(trained, tiles, tmp_path):
    """A 4-channel autoencoder (as for R, G, B, NIR) given RGB patches."""
    from pipeline.latents import EncodeSettings, encode_input
    from pipeline.latents.encode import BandsMismatchError as LatentBandsError
    from test_latents import make_embedding_input, real_patches

    four = AutoencoderTrainSettings(**{**SETTINGS.to_dict(), "channel_multipliers": SETTINGS.channel_multipliers,
                                       "in_channels": 4, "max_steps": 1})
    folder = tmp_path / "ae4" / "model"
    four.build_model(256).save_pretrained(folder, safe_serialization=True)
    embedded = tmp_path / "embeddings" / "slideA"
    make_embedding_input(embedded, real_patches()[:2], per_shard=2)
    with pytest.raises(LatentBandsError, match="have 3 bands, but the autoencoder .* takes 4 channels"):
        encode_input(embedded, tmp_path / "latents", load_autoencoder("trained", folder),
                     EncodeSettings(batch_size=2, num_workers=0, device="cpu", flips="none"))


def demo_config(**training) -> dict:
    return {"datasets": {"demo": {"kind": "wsi", "inputs": [str(DEMO_SLIDE)], "resolution": "20x",
                                  "encoders": ["hipt_vit_s16"]}},
            "encoders": {"hipt_vit_s16": {"allow_random_weights": True}},
            "autoencoder": {"downsampling": 16},
            "latents": {"autoencoder": {"kind": "trained", "dataset": "demo"}},
            "training": {"preset": "small", **training}}


def test_a_latent_size_that_does_not_fit_the_unet_fails_naming_both(tmp_path):
    assert prepare_config(demo_config(latent_size=16), tmp_path)  # f16 of 256 px: 16
    with pytest.raises(ConfigError, match=r"training.latent_size: 32, but the autoencoder makes 16x16 latents"):
        prepare_config(demo_config(latent_size=32), tmp_path)
    with pytest.raises(ConfigError, match=r"training.latent_channels: 4, but the autoencoder makes 3-channel"):
        prepare_config(demo_config(latent_size=16, latent_channels=4), tmp_path)
    with pytest.raises(ConfigError, match=r"latents.autoencoder.dataset: kind 'trained' needs the dataset"):
        config = demo_config(latent_size=16)
        config["latents"]["autoencoder"]["dataset"] = "nope"
        prepare_config(config, tmp_path)
