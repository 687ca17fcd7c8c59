"""Patch sampling and the large-image stage: schedulers wired to the model, held-out conditions,
real regions in, images (PNG, pyramidal TIFF) out."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers import SHARED_DATA
from pipeline.embedding.outputs import write_dataset_index
from pipeline.io.shards import decode_image, decode_npy, encode_image, encode_json, encode_npy, write_shard
from pipeline.models.autoencoder import random_vq
from pipeline.models import RLDiffPipeline, load_lid_release, load_pipeline
from pipeline.sampling.patches import PatchSampler, PatchSamplingConfig, patch_generator
from pipeline.sampling.references import find_regions, held_out_rows
from pipeline.sampling.config import LargeImageSettings, large_image_config
from pipeline.sampling.stage import generate_large_images, sample_patches
from pipeline.splits import is_held_out, key_position
from pipeline.training import TrainConfig
from pipeline.training.export import export_module
from pipeline.training.module import LatentDiffusion

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "seed_ldm_tiny"
SOURCE_IMAGE = SHARED_DATA / "he_images" / "tiatoolbox_target_image.png"
ENCODER = "hipt_vit_s16"

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture(scope="module")
def lid_model() -> RLDiffPipeline:
    return load_lid_release(FIXTURE)


def fixture_embeddings(model: RLDiffPipeline, count: int) -> torch.Tensor:
    with np.load(FIXTURE / "golden.npz") as golden:
        grid = golden["pano_grid"].reshape(-1, model.embedding_dim)
    return torch.from_numpy(grid[:count].astype(np.float32))


# --- patch sampler -------------------------------------------------------------------------------


def test_ddim_patches_follow_the_closed_form_with_guidance(lid_model):
    """diffusers' DDIM, batched cond/uncond, against DDIM written out with two separate UNet calls."""
    config = PatchSamplingConfig(sampler="ddim", steps=4, guidance_scale=2.0, seed=5)
    embeddings = fixture_embeddings(lid_model, 2)
    output = PatchSampler(lid_model, config).sample(embeddings, output_type="latent")
    ours, evaluations = output.latents, output.unet_evaluations
    assert evaluations == 4 * 2 * 2  # steps x patches x (conditional + unconditional)

    alpha_bar = np.cumprod(1 - lid_model.training_betas)
    timesteps = [751, 501, 251, 1]  # CompVis' uniform DDIM timesteps for 4 steps
    shape = (lid_model.latent_channels, lid_model.latent_size, lid_model.latent_size)
    x = torch.stack([torch.randn(shape, generator=patch_generator(5, i)) for i in range(2)]).double()
    with torch.no_grad():
        context = lid_model.condition(embeddings)
        null = lid_model.condition(torch.zeros_like(embeddings))
        for index, t in enumerate(timesteps):
            step = torch.full((2,), t)
            eps_c = lid_model.unet(x.float(), step, encoder_hidden_states=context).sample.double()
            eps_u = lid_model.unet(x.float(), step, encoder_hidden_states=null).sample.double()
            eps = eps_u + 2.0 * (eps_c - eps_u)
            x0 = (x - np.sqrt(1 - alpha_bar[t]) * eps) / np.sqrt(alpha_bar[t])
            prev = alpha_bar[timesteps[index + 1]] if index + 1 < len(timesteps) else alpha_bar[0]
            x = np.sqrt(prev) * x0 + np.sqrt(1 - prev) * eps
    torch.testing.assert_close(ours.double(), x, atol=2e-4, rtol=1e-4)


def test_patches_do_not_depend_on_batching_and_repeat(lid_model):
    embeddings = fixture_embeddings(lid_model, 3)
    config = PatchSamplingConfig(sampler="dpmsolver++", steps=3, seed=1)
    def latents(sampler_config, rows, first=0):
        return PatchSampler(lid_model, sampler_config).sample(rows, first, output_type="latent").latents

    together = latents(config.with_(batch_size=3), embeddings)
    alone = torch.cat([latents(config, embeddings[i : i + 1], i) for i in range(3)])
    torch.testing.assert_close(together, alone, atol=1e-4, rtol=1e-4)
    again = latents(config.with_(batch_size=3), embeddings)
    assert torch.equal(together, again)
    other_seed = latents(config.with_(batch_size=3, seed=2), embeddings)
    assert not torch.allclose(together, other_seed)


@pytest.mark.parametrize("sampler, eta", [("plms", 0.0), ("ddim", 1.0), ("dpmsolver++", 0.0)])
def test_every_sampler_gives_decoded_patches(lid_model, sampler, eta):
    config = PatchSamplingConfig(sampler=sampler, steps=2, eta=eta, guidance_scale=1.0, batch_size=2)
    batches = list(PatchSampler(lid_model, config).batches(fixture_embeddings(lid_model, 2)))
    assert len(batches) == 1
    images = batches[0].images
    assert images.shape == (2, 256, 256, 3) and images.dtype == np.uint8
    assert images.std() > 1  # decoded through the fixture's real VQ decoder, not a constant
    # guidance 1 is the conditional model alone: no unconditional half
    extra = 1 if sampler == "plms" else 0  # PLMS' first step evaluates twice (as in CompVis)
    assert batches[0].unet_evaluations == (2 + extra) * 2


def test_sampler_settings_are_checked(lid_model):
    with pytest.raises(ValueError, match="sampler 'euler'"):
        PatchSamplingConfig(sampler="euler")
    with pytest.raises(ValueError, match="eta is a DDIM setting"):
        PatchSamplingConfig(sampler="plms", eta=0.5)
    with pytest.raises(ValueError, match=r"takes \(384,\) vectors"):
        next(PatchSampler(lid_model, PatchSamplingConfig(steps=1)).batches(np.zeros((2, 7), np.float32)))


# --- held-out split and regions ------------------------------------------------------------------


def test_key_hash_split_is_stable_and_proportional():
    keys = [f"slide-{i:05d}" for i in range(20000)]
    share = np.mean([is_held_out(k, 0.1) for k in keys])
    assert abs(share - 0.1) < 0.01
    assert all(is_held_out(k, 0.3) for k in keys if is_held_out(k, 0.1))  # nested as the fraction grows
    assert key_position("TCGA-A1-A0SB") == key_position("TCGA-A1-A0SB") and not is_held_out(keys[0], 0.0)


def grid_index(cells: dict[str, list[tuple[int, int]]]) -> pd.DataFrame:
    rows = [{"key": f"{ident}_{c}_{r}", "input_id": ident, "col": c, "row": r}
            for ident, positions in cells.items() for c, r in positions]
    return pd.DataFrame(rows)


def test_regions_are_complete_disjoint_blocks_held_out_inputs_first():
    full = [(c, r) for r in range(5) for c in range(5)]
    holey = [cell for cell in full if cell != (1, 1)]
    index = grid_index({"a": holey, "b": full})
    regions = find_regions(index, k=2, count=10, prefer_inputs=["b"])
    assert [r.input_id for r in regions[:4]] == ["b"] * 4 and regions[0].held_out
    assert not regions[-1].held_out
    present = set(index.key)
    for region in regions:
        keys = [key for row in region.keys for key in row]
        assert set(keys) <= present and len(keys) == 4
        assert region.keys[0][1] == f"{region.input_id}_{region.col + 1}_{region.row}"  # rows, then columns
    for ident in ("a", "b"):
        cells = [key for r in regions if r.input_id == ident for row in r.keys for key in row]
        assert len(cells) == len(set(cells))  # no overlap
    assert all("a_1_1" not in [k for row in r.keys for k in row] for r in regions)
    assert find_regions(index, k=6, count=1) == []


def test_held_out_rows_take_whole_inputs_and_hashed_keys_in_turns():
    index = grid_index({"a": [(c, 0) for c in range(50)], "b": [(c, 0) for c in range(50)],
                        "c": [(c, 0) for c in range(50)]})
    rows = held_out_rows(index, ["c"], 0.2)
    expected = {k for k in index.key if k.startswith("c_") or is_held_out(k, 0.2)}
    assert set(rows.key) == expected
    limited = held_out_rows(index, ["c"], 0.2, limit=9)
    assert len(limited) == 9 and set(limited.input_id) == {"a", "b", "c"}


# --- the stages on a real image ------------------------------------------------------------------


def projection(rgb: np.ndarray, dim: int = 384) -> np.ndarray:
    """A fixed random projection of a thumbnail: a deterministic stand-in embedding."""
    small = np.asarray(Image.fromarray(rgb).resize((8, 8)), dtype=np.float32).reshape(-1) / 255 - 0.5
    return (small @ np.random.default_rng(0).standard_normal((small.size, dim))).astype(np.float16)


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """An embedding-stage folder cut from a real 1000x1000 H&E image (3x3 grid + 2 loose patches),
    and a small exported model (random tiny VQ-f16: 16x16 latents)."""
    root = tmp_path_factory.mktemp("stage")
    image = np.array(Image.open(SOURCE_IMAGE).convert("RGB"))
    cells = [(c, r) for r in range(3) for c in range(3)] + [(0, 3), (3, 0)]
    samples, rows = [], []
    for c, r in cells:
        rgb = image[r * 240 : r * 240 + 256, c * 240 : c * 240 + 256]  # overlapping crops stay inside
        key = f"target_c{c}_r{r}"
        meta = {"dataset": "test", "source": SOURCE_IMAGE.name, "col": c, "row": r}
        samples.append({"__key__": key, "png": encode_image(rgb, "png"), "json": encode_json(meta),
                        f"{ENCODER}.npy": encode_npy(projection(rgb))})
        rows.append({"key": key, "source": SOURCE_IMAGE.name, "col": c, "row": r, "shard": "patches-000000.tar"})
    folder = root / "embeddings" / "inputs" / "target"
    folder.mkdir(parents=True)
    write_shard(folder / "patches-000000.tar", samples)
    pd.DataFrame(rows).to_parquet(folder / "manifest.parquet", index=False)
    write_dataset_index([folder], root / "embeddings" / "index.parquet")
    torch.manual_seed(0)
    config = TrainConfig(preset="small", latent_size=16, embedding_key=ENCODER, patch_embed_dim=384)
    export_module(LatentDiffusion(config), root / "model", random_vq("tiny-vq-f16", seed=0, allow_random_weights=True))
    return root, image, {s["__key__"]: s for s in samples}


def test_sample_stage_conditions_on_held_out_patches(stage_inputs, tmp_path):
    root, _, samples = stage_inputs
    config = PatchSamplingConfig(sampler="ddim", steps=3, batch_size=2, max_samples=100, device="cpu")
    manifest = sample_patches(root / "model", root / "embeddings", tmp_path / "samples", dataset="test", mpp=0.5,
                              holdout_inputs=(), holdout_fraction=0.5, config=config)
    expected = [k for k in pd.read_parquet(root / "embeddings" / "index.parquet").key if is_held_out(k, 0.5)]
    assert list(manifest.key) == expected and len(expected) > 1
    out = tmp_path / "samples"
    conditions = np.load(out / "conditions.npy")
    for row, condition in zip(manifest.itertuples(), conditions):
        sample = samples[row.key]
        np.testing.assert_array_equal(condition, decode_npy(sample[f"{ENCODER}.npy"]))
        real = np.array(Image.open(out / row.real))
        assert np.array_equal(real, decode_image(sample["png"]))
        assert np.array(Image.open(out / row.generated)).shape == (256, 256, 3)
    record = json.loads((out / "sample.json").read_text())
    assert record["samples"] == len(expected) and record["random_weights"] is True
    assert record["embedding_key"] == ENCODER and record["sampler"]["sampler"] == "ddim"
    grid = np.array(Image.open(out / "grid.jpg"))
    assert grid.shape[0] >= 256 and grid.shape[1] >= 2 * 256 * min(len(expected), 4)


def test_large_image_stage_writes_png_and_openslide_tiff(stage_inputs, tmp_path):
    root, image, samples = stage_inputs
    out = tmp_path / "large"
    settings = LargeImageSettings(k=3, regions=2, mode="fast", steps=4, device="cpu")
    arguments = dict(dataset="test", kind="wsi", mpp=0.5, holdout_inputs=(), settings=settings, seed=11)
    manifest = generate_large_images(root / "model", root / "embeddings", out, **arguments)
    assert len(manifest) == 1  # one 3x3 block exists
    row = manifest.iloc[0]
    assert (row.col, row.row, row.k, row.width, row.height) == (0, 0, 3, 768, 768)
    # fast mode on 16-latent windows: stride 8, 5 x 5 windows, 4 steps, conditional + unconditional
    assert row.windows == 25 and row.unet_evaluations == 25 * 4 * 2
    assert np.isfinite(row.seam_score) and row.seam_score >= 1.0
    reference = np.array(Image.open(out / row.reference_png))
    for r in range(3):
        for c in range(3):
            cell = reference[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256]
            np.testing.assert_array_equal(cell, image[r * 240 : r * 240 + 256, c * 240 : c * 240 + 256])
    grid = np.load(out / row.embeddings)
    assert grid.shape == (3, 3, 384)
    np.testing.assert_array_equal(grid[1, 2], projection(image[240:496, 480:736]).astype(np.float32))
    png = np.array(Image.open(out / row.generated_png))
    slide = openslide.OpenSlide(out / row.generated_tif)
    assert slide.dimensions == (768, 768) and slide.level_count >= 2
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(0.5)
    level0 = np.array(slide.read_region((0, 0), 0, (768, 768)).convert("RGB"), dtype=np.int16)
    # JPEG tiles of the same pixels: a random-weight decoder makes noise, which JPEG blurs, but
    # the 8x8 block means (JPEG's DC terms) stay put.
    def block_means(a):
        return a.reshape(96, 8, 96, 8, 3).mean(axis=(1, 3))
    assert np.abs(block_means(level0) - block_means(png.astype(np.int16))).mean() < 1.5
    slide.close()
    # a re-run with the same settings reuses the region; other settings regenerate it
    stamp = (out / row.generated_png).stat().st_mtime_ns
    generate_large_images(root / "model", root / "embeddings", out, **arguments)
    assert (out / row.generated_png).stat().st_mtime_ns == stamp
    again = generate_large_images(root / "model", root / "embeddings", out, **{**arguments, "seed": 12})
    assert again.iloc[0].seed == 12 and not np.array_equal(np.array(Image.open(out / row.generated_png)), png)


def test_modes_scale_to_the_model_window():
    assert large_image_config("lid", 64).stride == 16 and large_image_config("fast", 64).stride == 32
    small = large_image_config("fast", 16, {"steps": 5, "sampler": None})
    assert (small.window, small.stride, small.decode_stride, small.steps) == (16, 8, 4, 5)
    with pytest.raises(ValueError, match="mode 'slow'"):
        large_image_config("slow", 64)


def test_loading_names_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="model folder not found"):
        load_pipeline(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither a pipeline export"):
        load_pipeline(tmp_path / "empty")


def test_cli_reports_a_missing_model_without_a_traceback(tmp_path, capsys):
    from helpers import make_spec
    from pipeline.cli import main

    code = main(["sample", "--model", str(tmp_path / "models" / "nothing"), "--embeddings", str(tmp_path),
                 "--spec", make_spec(name="d").to_json(), "--out", str(tmp_path / "out")])
    assert code == 2
    assert "models/nothing: model folder not found" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_large_image_stage_under_torchrun_matches_one_process(stage_inputs, tmp_path):
    """Two gloo processes (as torchrun starts one per GPU) share every step's windows; rank 0 writes
    the same image a single process writes."""
    from helpers import make_spec, pipeline_env, run_pipeline

    root, _, _ = stage_inputs
    settings = json.dumps({"k": 3, "regions": 1, "mode": "fast", "steps": 2, "window_batch": 4, "device": "cpu"})
    args = ["large-image", "--model", str(root / "model"), "--embeddings", str(root / "embeddings"),
            "--spec", make_spec(name="test").to_json(), "--settings", settings, "--seed", "3"]
    run_pipeline([*args, "--out", str(tmp_path / "one")])
    import subprocess
    import sys

    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "pipeline", *args, "--out", str(tmp_path / "two")], env=pipeline_env(),
                         capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    one, both = (pd.read_parquet(tmp_path / name / "manifest.parquet").iloc[0] for name in ("one", "two"))
    assert both.unet_evaluations == one.unet_evaluations == 25 * 2 * 2
    images = [np.array(Image.open(tmp_path / name / one.generated_png), dtype=np.int16) for name in ("one", "two")]
    assert np.abs(images[0] - images[1]).mean() < 0.05  # float32 sums in another order: a grey level, rarely
