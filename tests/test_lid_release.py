"""Loading LID's released checkpoint format into diffusers, checked against LID's own outputs.

golden.npz in the fixture was computed by LID's code (CompVis UNet, PatchEmbedder, VQ
autoencoder) from the same folder; see the fixture's README for every array.
"""

from __future__ import annotations

import dataclasses
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import DDPMScheduler

from pipeline.models import LidFormatError, first_stage, load_lid_release
from pipeline.models.compvis_layout import FIRST_STAGE_PREFIX, UNET_PREFIX, checkpoint_layout
from pipeline.models.convert import build_condition, build_unet, build_vq
from pipeline.models.presets import LID_FULL_SIZE, compvis_betas, scheduler_config, lid_full_size_config_dict
from pipeline.models.lid_release import CHECKPOINT_NAME, find_config, read_state_dict
from pipeline.models.lid_config import parse_lid_config, read_lid_config

FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "seed_ldm_tiny"
TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def fixture_folder() -> Path:
    if not (FIXTURE / "golden.npz").is_file():
        pytest.fail(f"LID fixture missing: expected {FIXTURE} (../shared next to the repo)")
    return FIXTURE


@pytest.fixture(scope="module")
def lid(fixture_folder: Path):
    return load_lid_release(fixture_folder)


@pytest.fixture(scope="module")
def golden(fixture_folder: Path) -> dict[str, np.ndarray]:
    with np.load(fixture_folder / "golden.npz") as data:
        return {name: data[name] for name in data.files}


def max_abs(ours: torch.Tensor, expected: np.ndarray) -> float:
    assert tuple(ours.shape) == expected.shape
    return float(np.max(np.abs(ours.numpy().astype(np.float64) - expected)))


def test_condition_stage_matches_lid(lid, golden):
    with torch.no_grad():
        context = lid.condition(torch.from_numpy(golden["cond_in"]))
    assert max_abs(context, golden["cond_out"]) < TOLERANCE


def test_unet_matches_lid(lid, golden):
    timesteps = torch.from_numpy(golden["unet_t"]).float()
    assert timesteps.tolist() == [999.0, 500.0, 20.0, 0.0]
    with torch.no_grad():
        eps = lid.unet(
            torch.from_numpy(golden["unet_x"]), timesteps, encoder_hidden_states=torch.from_numpy(golden["cond_out"])
        ).sample
    assert max_abs(eps, golden["unet_out"]) < TOLERANCE


def test_first_stage_encode_matches_lid(lid, golden):
    with torch.no_grad():
        latents = first_stage.encode(lid.vae, torch.from_numpy(golden["vq_img"]))
    assert max_abs(latents, golden["vq_encoded"]) < TOLERANCE


def test_first_stage_decode_matches_lid(lid, golden):
    latents = torch.from_numpy(golden["vq_encoded"])
    with torch.no_grad():
        quantized = first_stage.decode(lid.vae, latents)
        unquantized = first_stage.decode(lid.vae, latents, quantize_first=False)
    assert max_abs(quantized, golden["vq_decoded"]) < TOLERANCE
    assert max_abs(unquantized, golden["vq_decoded_unquantized"]) < TOLERANCE
    # The fixture's codebook is far from the latents, so quantising must visibly change the image.
    assert float((quantized - unquantized).abs().max()) > 100 * TOLERANCE


def test_quantize_returns_codebook_vectors(lid, golden):
    quantized = first_stage.quantize(lid.vae, torch.from_numpy(golden["vq_encoded"]))
    vectors = quantized.permute(0, 2, 3, 1).reshape(-1, 3).double()
    latents = torch.from_numpy(golden["vq_encoded"]).permute(0, 2, 3, 1).reshape(-1, 3).double()
    codebook = lid.vae.quantize.embedding.weight.double()
    assert (vectors[:, None, :] == codebook[None]).all(dim=-1).any(dim=-1).all()  # exact codebook rows
    nearest = ((latents[:, None, :] - codebook[None]) ** 2).sum(dim=-1).min(dim=1).values
    assert torch.allclose(((latents - vectors) ** 2).sum(dim=-1), nearest, rtol=0, atol=1e-6)


def test_schedule_matches_lid(lid, golden):
    assert lid.training_betas.dtype == np.float64
    assert np.max(np.abs(lid.training_betas - golden["betas"])) <= 1e-12
    assert lid.provenance["autoencoder"]["scaling_factor"] == 1.0 and lid.vae.config.scaling_factor == 1.0
    # diffusers' "scaled_linear" is the same schedule, computed in float32.
    diffusers_betas = DDPMScheduler.from_config(lid.scheduler_config).betas.double().numpy()
    assert np.allclose(diffusers_betas, golden["betas"], rtol=1e-6, atol=0)


def test_layout_matches_fixture_checkpoint(fixture_folder):
    config = read_lid_config(find_config(fixture_folder))
    required, optional = checkpoint_layout(config)
    state = read_state_dict(fixture_folder / CHECKPOINT_NAME)
    assert set(required) <= set(state) <= set(required) | set(optional)
    assert {key: tuple(value.shape) for key, value in state.items()} == {
        key: shape for key, shape in (required | optional).items() if key in state
    }


def test_full_size_config_converts_every_key():
    """LID's full-size architecture, on the meta device: no weights are allocated."""
    config = parse_lid_config(lid_full_size_config_dict(), "full-size.yaml")
    assert config == dataclasses.replace(LID_FULL_SIZE, source="full-size.yaml")
    required, _ = checkpoint_layout(config)
    state = {key: torch.empty(shape, device="meta") for key, shape in required.items()}
    unet = build_unet(config.unet, state, "full.ckpt")
    vae = build_vq(config.vq, config.scale_factor, state, "full.ckpt")
    condition = build_condition(config.condition, state, "full.ckpt")

    def elements(prefix: str) -> int:
        return sum(math.prod(shape) for key, shape in required.items() if key.startswith(prefix))

    assert sum(p.numel() for p in unet.parameters()) == elements(UNET_PREFIX)
    assert sum(p.numel() for p in vae.parameters()) == elements(FIRST_STAGE_PREFIX)
    assert condition.patch_fc.weight.shape == (512, 384)
    assert list(unet.config.block_out_channels) == [192, 384, 576, 960]
    assert list(unet.config.down_block_types) == ["DownBlock2D"] + ["CrossAttnDownBlock2D"] * 3
    assert list(unet.config.up_block_types) == ["CrossAttnUpBlock2D"] * 3 + ["UpBlock2D"]
    assert unet.config.attention_head_dim == 1 and unet.config.cross_attention_dim == 512
    assert unet.config.sample_size == 64 and unet.config.in_channels == 3
    assert list(vae.config.block_out_channels) == [128, 256, 512]
    assert vae.config.num_vq_embeddings == 8192 and vae.config.scaling_factor == 1.0


def release_copy(tmp_path: Path, fixture_folder: Path, edit_config=None, edit_state=None) -> Path:
    """A copy of the fixture folder with the config and/or the state dict edited."""
    folder = tmp_path / "release"
    (folder / "configs").mkdir(parents=True)
    (folder / "checkpoints").mkdir()
    config_path = find_config(fixture_folder)
    raw = yaml.safe_load(config_path.read_text())
    if edit_config:
        edit_config(raw)
    (folder / "configs" / config_path.name).write_text(yaml.safe_dump(raw))
    if edit_state:
        state = read_state_dict(fixture_folder / CHECKPOINT_NAME)
        edit_state(state)
        torch.save({"state_dict": state}, folder / CHECKPOINT_NAME)
    else:
        shutil.copyfile(fixture_folder / CHECKPOINT_NAME, folder / CHECKPOINT_NAME)
    return folder


def test_unknown_target_is_rejected_without_import(tmp_path, fixture_folder):
    def edit(raw):
        raw["model"]["params"]["cond_stage_config"]["target"] = "evil.module.DoNotImport"

    folder = release_copy(tmp_path, fixture_folder, edit_config=edit)
    with pytest.raises(LidFormatError) as error:
        load_lid_release(folder)
    message = str(error.value)
    assert "evil.module.DoNotImport" in message
    assert "model.params.cond_stage_config.target" in message
    assert "-project.yaml" in message
    assert not any(name.startswith("evil") for name in sys.modules)


def test_unsupported_option_is_rejected(tmp_path, fixture_folder):
    def edit(raw):
        raw["model"]["params"]["unet_config"]["params"]["use_linear_in_transformer"] = True

    folder = release_copy(tmp_path, fixture_folder, edit_config=edit)
    with pytest.raises(LidFormatError, match=r"project\.yaml.*unet_config\.params\.use_linear_in_transformer"):
        load_lid_release(folder)


def test_missing_and_extra_keys_are_named(tmp_path, fixture_folder):
    def edit(state):
        del state["model.diffusion_model.out.2.bias"]
        state["first_stage_model.quantize.extra_codebook"] = torch.zeros(3)

    folder = release_copy(tmp_path, fixture_folder, edit_state=edit)
    with pytest.raises(LidFormatError) as error:
        load_lid_release(folder)
    message = str(error.value)
    assert "model.diffusion_model.out.2.bias" in message
    assert "first_stage_model.quantize.extra_codebook" in message
    assert str(folder / CHECKPOINT_NAME) in message


def test_wrong_shape_is_named(tmp_path, fixture_folder):
    def edit(state):
        state["cond_stage_model.patch_fc.weight"] = torch.zeros(64, 768)

    folder = release_copy(tmp_path, fixture_folder, edit_state=edit)
    with pytest.raises(LidFormatError, match=r"last\.ckpt.*cond_stage_model\.patch_fc\.weight: \(64, 768\)"):
        load_lid_release(folder)


def test_schedule_mismatch_is_rejected(tmp_path, fixture_folder):
    def edit(raw):
        raw["model"]["params"]["linear_end"] = 0.012

    folder = release_copy(tmp_path, fixture_folder, edit_config=edit)
    with pytest.raises(LidFormatError, match=r"last\.ckpt.*'betas' differ"):
        load_lid_release(folder)


def test_converter_leftovers_are_named():
    """A key diffusers' converter silently drops is reported, not lost."""
    config = read_lid_config(find_config(FIXTURE))
    required, _ = checkpoint_layout(config)
    state = {key: torch.empty(shape, device="meta") for key, shape in required.items()}
    state[UNET_PREFIX + "label_emb.0.0.weight"] = torch.empty(128, 10, device="meta")
    with pytest.raises(LidFormatError, match=r"x\.ckpt.*unused.*label_emb\.0\.0\.weight"):
        build_unet(config.unet, state, "x.ckpt")


def test_full_size_betas_are_compvis_linear():
    betas = compvis_betas(LID_FULL_SIZE.schedule)
    assert betas[0] == pytest.approx(0.0015, rel=1e-12) and betas[-1] == pytest.approx(0.0195, rel=1e-12)
    assert scheduler_config(LID_FULL_SIZE.schedule)["beta_schedule"] == "scaled_linear"
