"""The embedding-grid prior and reference-free images, on the demo slide's real embeddings (random
HIPT ViT-S/16): crops and their 8 symmetries, training that resumes to the same weights and
round-trips through from_pretrained, windowed sampling of grids larger than the crops, `generate`
(glass exactly where the sampled mask is background), and the prior's metrics with the shuffled
control."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from helpers import DEMO_SLIDE, make_spec
from pipeline.cli import main
from pipeline.embedding.encoders import build_encoder
from pipeline.embedding.extract import EmbeddingSettings, embed_input
from pipeline.embedding.grids import grid_from_embeddings
from pipeline.embedding.outputs import write_dataset_index
from pipeline.errors import PipelineError
from pipeline.evaluation.outputs import read_metrics
from pipeline.models.autoencoder import random_vq
from pipeline.models.prior import EmbeddingGridPrior, load_prior, unit_rows
from pipeline.prior.data import SYMMETRIES, CropIndex, TrainingGrid, apply_symmetry, step_batch
from pipeline.prior.outputs import read_prior_record
from pipeline.prior.run import train_prior
from pipeline.prior.settings import PriorSettings
from pipeline.sampling.outputs import read_generated_images
from pipeline.sampling.prior_grid import sample_grids
from pipeline.tiling.outputs import tile_input
from pipeline.tiling.slide import open_slide_source
from pipeline.training import TrainConfig
from pipeline.training.export import export_module
from pipeline.training.module import LatentDiffusion

ENCODER = "hipt_vit_s16"
INPUT = "cmu_small_region"
DATASET = "demo"
SETTINGS = PriorSettings(crop=4, layers=1, heads=2, head_dim=16, batch_size=8, max_steps=40, warmup_steps=5,
                         learning_rate=1e-3, ema_decay=0.9, checkpoint_every=20, log_every=5, embedding_key=ENCODER)

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The whole demo slide tiled and embedded (random HIPT), a trained tiny prior and a small
    exported model (random tiny VQ-f16: 16x16 latents, 256 px per grid cell)."""
    root = tmp_path_factory.mktemp("prior")
    spec = make_spec(name=DATASET, inputs={INPUT: str(DEMO_SLIDE)}, image_format="jpg")
    tile_input(spec, INPUT, DEMO_SLIDE, root / "tiles", open_slide_source)
    with pytest.warns(UserWarning, match="RANDOM weights"):
        encoder = build_encoder(ENCODER, allow_random_weights=True)
    folder = root / "embeddings" / "inputs" / INPUT
    embed_input(root / "tiles", folder, [encoder], EmbeddingSettings(batch_size=8, num_workers=0, device="cpu"))
    write_dataset_index([folder], root / "embeddings" / "index.parquet")
    record = train_prior({DATASET: root / "embeddings"}, root / "prior", SETTINGS)
    torch.manual_seed(0)
    config = TrainConfig(preset="small", latent_size=16, embedding_key=ENCODER, patch_embed_dim=384)
    export_module(LatentDiffusion(config), root / "model", random_vq("tiny-vq-f16", seed=0, allow_random_weights=True))
    return root, spec, record


def test_crops_have_tissue_and_the_eight_symmetries_are_distinct(demo, tmp_path):
    root, _, _ = demo
    grid = grid_from_embeddings(root / "embeddings", INPUT, ENCODER, tmp_path / "grid")
    index = CropIndex([TrainingGrid(DATASET, INPUT, grid)], [DATASET], SETTINGS)
    assert len(index) > 0
    # 30 patches span at most 29 directions: the projection keeps them all, and loses nothing.
    components = index.projection.config.components
    assert components == np.linalg.matrix_rank(np.asarray(grid.embeddings)[grid.tissue]) - 1 <= 29
    assert index.kept_variance == pytest.approx(1.0)
    unit = unit_rows(np.asarray(grid.embeddings)[grid.tissue])
    assert np.allclose(index.projection.decode(index.projection.encode(unit)), unit, atol=1e-4)
    for i in range(len(index)):
        crop = index.crop(i)
        assert crop.shape == (components + 1, 4, 4)
        mask = crop[-1] > 0
        assert mask.mean() >= SETTINGS.min_tissue
        assert (crop[:-1][:, ~mask] == 0).all()  # background: zero embedding channels
        row, col = index.origins[i]
        assert np.array_equal(mask, grid.tissue[row : row + 4, col : col + 4])
    crop = index.crop(int(np.argmax([index.crop(i)[-1].sum() < 16 for i in range(len(index))])))
    variants = [apply_symmetry(crop, s) for s in range(SYMMETRIES)]
    assert len({v.tobytes() for v in variants}) == SYMMETRIES  # an asymmetric crop: 8 different grids
    assert all(np.allclose(np.sort(v.ravel()), np.sort(crop.ravel())) for v in variants)
    first, again = step_batch(index, SETTINGS, 7), step_batch(index, SETTINGS, 7)
    assert all(torch.equal(first[k], again[k]) for k in first)  # a function of (seed, step) alone
    assert not torch.equal(first["grids"], step_batch(index, SETTINGS, 8)["grids"])


def test_prior_resumes_to_the_same_weights_and_loads_with_from_pretrained(demo, tmp_path):
    root, _, record = demo
    assert record["steps"] == SETTINGS.max_steps and record["inputs"] == {DATASET: [INPUT]}
    assert read_prior_record(root / "prior").crop == 4
    short = tmp_path / "resumed"
    train_prior({DATASET: root / "embeddings"}, short, PriorSettings(**{**vars(SETTINGS), "max_steps": 20}))
    train_prior({DATASET: root / "embeddings"}, short, SETTINGS)  # continues from last.ckpt at step 20
    whole = load_prior(root / "prior" / "model").transformer.state_dict()
    resumed = load_prior(short / "model").transformer.state_dict()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    import pipeline.models.prior as prior_module

    plain = DiffusionPipeline.from_pretrained(root / "prior" / "model", custom_pipeline=prior_module.__file__,
                                              trust_remote_code=True, low_cpu_mem_usage=False)
    # diffusers imports the file as its own module: the class is the file's, not this process's import.
    assert type(plain).__name__ == "EmbeddingGridPrior" and plain.datasets == [DATASET] and plain.embedding_dim == 384
    own = EmbeddingGridPrior.from_pretrained(root / "prior" / "model", low_cpu_mem_usage=False)
    assert torch.equal(own.projection.basis, plain.projection.basis)


def test_grids_larger_than_the_crops_are_sampled_in_windows(demo):
    root, _, _ = demo
    prior = load_prior(root / "prior" / "model")
    grids = sample_grids(prior, 10, 7, count=2, dataset=DATASET, steps=5, seed=3)
    assert grids.embeddings.shape == (2, 10, 7, 384) and grids.tissue.shape == (2, 10, 7)
    norms = np.linalg.norm(grids.embeddings, axis=-1)
    assert np.allclose(norms[grids.tissue], 1.0, atol=1e-4) and (norms[~grids.tissue] == 0).all()
    again = sample_grids(prior, 10, 7, count=2, dataset=DATASET, steps=5, seed=3)
    assert np.array_equal(again.embeddings, grids.embeddings)
    fixed = sample_grids(prior, 10, 7, count=2, dataset=DATASET, steps=5, seed=3, shift_windows=False)
    # Half-window stride, windows not moved: rows 0, 2, 4, 6 and columns 0, 2, 3, for both grids.
    assert fixed.evaluations == 5 * (4 * 3) * 2
    with pytest.raises(PipelineError, match="not 'other'"):
        sample_grids(prior, 4, 4, dataset="other", steps=1)


def test_generate_renders_glass_exactly_where_the_grid_is_background(demo, tmp_path, capsys):
    root, spec, _ = demo
    settings = {"count": 2, "rows": 4, "cols": 5, "prior_steps": 5, "steps": 2, "guidance_scale": 1.0,
                "decode_stride": 16, "device": "cpu", "tiff": False}
    out = tmp_path / "generated"
    assert main(["generate", "--model", str(root / "model"), "--prior", str(root / "prior"), "--spec", spec.to_json(),
                 "--settings", json.dumps(settings), "--seed", "5", "--out", str(out)]) == 0
    assert "from a 4x5 grid sampled by the prior" in capsys.readouterr().out
    images = read_generated_images(out)
    assert images.dataset == DATASET and len(images.images) == 2
    for image in images.images:
        pixels = np.asarray(Image.open(image.generated))
        assert pixels.shape == (4 * 256, 5 * 256, 3)
        assert image.grid.shape == (4, 5, 384) and image.tissue.any()
        cells = pixels.reshape(4, 256, 5, 256, 3).transpose(0, 2, 1, 3, 4)
        white = (cells == 255).all(axis=(2, 3, 4))
        assert np.array_equal(white, ~image.tissue)  # glass exactly off tissue
        assert image.settings["tissue_fraction"] == pytest.approx(image.tissue.mean())
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert list(manifest.seed) == [5, 6]
    stamp = (out / "image-000" / "image.json").stat().st_mtime_ns
    assert main(["generate", "--model", str(root / "model"), "--prior", str(root / "prior"), "--spec", spec.to_json(),
                 "--settings", json.dumps(settings), "--seed", "5", "--out", str(out)]) == 0
    assert (out / "image-000" / "image.json").stat().st_mtime_ns == stamp  # reused, not redone


def test_generate_names_both_widths_when_prior_and_model_differ(demo, tmp_path):
    root, spec, _ = demo
    config = TrainConfig(preset="small", latent_size=16, embedding_key="uni", patch_embed_dim=1024)
    export_module(LatentDiffusion(config), tmp_path / "wide", random_vq("tiny-vq-f16", seed=0, allow_random_weights=True))
    from pipeline.sampling.generate import GenerateSettings, generate_images

    with pytest.raises(PipelineError, match=r"384-wide embeddings, but the model .* 1024-wide"):
        generate_images(tmp_path / "wide", root / "prior", tmp_path / "out", dataset=DATASET, kind="wsi", mpp=0.5,
                        settings=GenerateSettings(device="cpu"), seed=0)


def test_prior_metrics_compare_against_the_real_floor_and_the_shuffled_control(demo, tmp_path):
    root, _, _ = demo
    out = tmp_path / "metrics.json"
    assert main(["evaluate", "--prior", str(root / "prior"), "--embeddings", str(root / "embeddings"),
                 "--dataset", DATASET, "--settings", json.dumps({"prior_grids": 32, "prior_steps": 5}),
                 "--out", str(out)]) == 0
    metrics = {m.name: m for m in read_metrics(out).metrics}
    for name in ("prior_fd", "prior_fd_real_floor", "prior_fd_shuffled", "prior_neighbour_cosine_generated",
                 "prior_neighbour_cosine_real", "prior_neighbour_cosine_shuffled", "prior_tissue_fraction_generated",
                 "prior_tissue_fraction_real"):
        assert metrics[name].scope == "prior_grids" and np.isfinite(metrics[name].value), name
    sizes = {(metrics[n].generated, metrics[n].real) for n in ("prior_fd", "prior_fd_real_floor", "prior_fd_shuffled")}
    assert len(sizes) == 1  # one sample size for all three distances
    # Real neighbours are more alike than the same embeddings placed at random: the control
    # removes the spatial structure it is meant to remove.
    assert metrics["prior_neighbour_cosine_real"].value > metrics["prior_neighbour_cosine_shuffled"].value
    # The control's figure is its exact expectation, |mean real position|^2; one draw lies near it.
    grid = grid_from_embeddings(root / "embeddings", INPUT, ENCODER, tmp_path / "grid")
    mean = unit_rows(np.asarray(grid.embeddings, dtype=np.float64)[grid.tissue]).mean(0)
    assert metrics["prior_neighbour_cosine_shuffled"].value == pytest.approx(mean @ mean, rel=1e-6)
    (shuffled,) = [m for m in json.loads(out.read_text())["metrics"] if m["name"] == "prior_neighbour_cosine_shuffled"]
    assert abs(shuffled["one_draw"] - shuffled["value"]) < 0.1
    assert json.loads(out.read_text())["metrics"][0]["real_set"] == "trained-on inputs (no input held out)"
