"""`synthesize-slide` on the demo slide's real embeddings: TRIDENT/CLAM .h5 files written from
them import to the pipeline's own grid; the synthetic slide is white exactly off tissue, opens in
OpenSlide at its µm/px, resumes after a kill to the same bytes; bad inputs name their file."""

from __future__ import annotations

import json

import h5py
import numpy as np
import openslide
import pandas as pd
import pytest
import torch
from PIL import Image

from helpers import DEMO_SLIDE, REPO, make_spec
from pipeline.cli import main
from pipeline.embedding.encoders import build_encoder
from pipeline.embedding.extract import EmbeddingSettings, embed_input
from pipeline.embedding.outputs import write_dataset_index
from pipeline.models.autoencoder import random_vq
from pipeline.sampling.slide import SlideSettings, read_slide_record, synthesize_slide
from pipeline.embedding.grids import SlideGridError, grid_from_embeddings, grid_from_h5
from pipeline.tiling.outputs import tile_input
from pipeline.tiling.slide import open_slide_source
from pipeline.training import TrainConfig
from pipeline.training.export import export_module
from pipeline.training.module import LatentDiffusion

ENCODER = "hipt_vit_s16"
INPUT = "cmu_small_region"
MPP = 0.5
ROWS = 6  # grid rows of the demo slide kept (keeps the tests short)
# 16-latent windows (stride 8), 2 steps, no unconditional pass, decode windows side by side.
SETTINGS = SlideSettings(steps=2, guidance_scale=1.0, decode_stride=16, band_rows=1, device="cpu",
                         thumbnail_side=256)

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """The demo slide's first ROWS grid rows, tiled and embedded (random HIPT), and a small
    exported model (random tiny VQ-f16: 16x16 latents, 256 px per grid cell)."""
    root = tmp_path_factory.mktemp("slide")
    spec = make_spec(inputs={INPUT: str(DEMO_SLIDE)}, image_format="jpg", patches_per_shard=4)
    tile_input(spec, INPUT, DEMO_SLIDE, root / "all", open_slide_source)
    tiles = root / "tiles"
    tiles.mkdir()
    manifest = pd.read_parquet(root / "all" / "manifest.parquet")
    kept = manifest[manifest.row < ROWS]
    for shard in kept.shard.unique():
        (tiles / shard).write_bytes((root / "all" / shard).read_bytes())
    manifest[manifest.shard.isin(kept.shard.unique())].to_parquet(tiles / "manifest.parquet")
    with pytest.warns(UserWarning, match="RANDOM weights"):
        encoder = build_encoder(ENCODER, allow_random_weights=True)
    folder = root / "embeddings" / "inputs" / INPUT
    embed_input(tiles, folder, [encoder], EmbeddingSettings(batch_size=8, num_workers=0, device="cpu"))
    write_dataset_index([folder], root / "embeddings" / "index.parquet")
    torch.manual_seed(0)
    config = TrainConfig(preset="small", latent_size=16, embedding_key=ENCODER, patch_embed_dim=384)
    export_module(LatentDiffusion(config), root / "model", random_vq("tiny-vq-f16", seed=0, allow_random_weights=True))
    index = pd.read_parquet(root / "embeddings" / "index.parquet")
    assert index.row.nunique() >= 2 and 4 <= len(index) < (index.row.max() + 1) * (index.col.max() + 1)
    return root, index


def write_h5(path, coords, features, coords_attrs, file_attrs=None):
    with h5py.File(path, "w") as handle:
        handle.create_dataset("coords", data=coords)
        handle.create_dataset("features", data=features)
        handle["coords"].attrs.update(coords_attrs)
        handle.attrs.update(file_attrs or {})
    return path


def index_features(root, index):
    from pipeline.embedding.outputs import iter_embeddings, read_embedding_index

    embeddings = dict(iter_embeddings(read_embedding_index(root / "embeddings"), index, ENCODER))
    return np.stack([embeddings[key] for key in index.key])


def test_trident_and_clam_h5_import_to_the_pipelines_grid(demo, tmp_path):
    root, index = demo
    own = grid_from_embeddings(root / "embeddings", INPUT, ENCODER, tmp_path / "own", 384)
    features = index_features(root, index)
    coords = index[["x", "y"]].to_numpy(np.int64)
    side = int(index.read_size.iloc[0])
    assert (coords[:, 0] == index.col * side + coords[:, 0].min() - index.col.min() * side).all()  # a regular grid
    # TRIDENT: patch_size_level0 on coords; CLAM: patch_size and patch_level 0, features (1, N, D), rows shuffled.
    trident = write_h5(tmp_path / "trident.h5", coords, features,
                       {"patch_size": 256, "patch_size_level0": side, "level0_magnification": 20})
    order = np.random.default_rng(0).permutation(len(coords))
    clam = write_h5(tmp_path / "clam.h5", coords[order], features[order][None], {"patch_size": side, "patch_level": 0})
    for path in (trident, clam):
        grid = grid_from_h5(path, tmp_path / path.stem, 384)
        assert np.array_equal(grid.tissue, own.tissue) and np.array_equal(grid.embeddings, own.embeddings)
    assert own.tissue.sum() == len(index) and not own.tissue.all()
    assert (np.asarray(own.embeddings)[~own.tissue] == 0).all()


def test_synthetic_slide_is_white_off_tissue_and_opens_in_openslide(demo, tmp_path, capsys):
    root, index = demo
    out = tmp_path / "slide"
    code = main(["synthesize-slide", "--model", str(root / "model"), "--embeddings", str(root / "embeddings"),
                 "--input-id", INPUT, "--mpp", str(MPP), "--out", str(out), "--seed", "3",
                 "--settings", json.dumps({k: v for k, v in vars(SETTINGS).items() if v != getattr(SlideSettings, k)}),
                 "--progress-every", "0"])
    assert code == 0
    captured = capsys.readouterr()
    assert "windows" in captured.err and "ETA" in captured.err
    record = read_slide_record(out)
    rows, cols = index.row.max() + 1, index.col.max() + 1
    assert (record["grid_rows"], record["grid_cols"], record["tissue_cells"]) == (rows, cols, len(index))
    assert (record["width"], record["height"], record["mpp"]) == (cols * 256, rows * 256, MPP)
    tissue = np.zeros((rows, cols), dtype=bool)
    tissue[index.row, index.col] = True
    # Independently: 16-latent windows at stride 8 over the whole grid, one step; a window is
    # sampled when it overlaps a tissue cell below the band's pinned row (band_rows 1).
    windows = 0
    for band in range(rows):
        top = band - (band > 0)
        cells = tissue[top : band + 1]
        for r in range(0, len(cells) * 16 - 15, 8):
            for c in range(0, cols * 16 - 15, 8):
                if r + 16 <= (band - top) * 16:
                    continue
                r0 = max(r, (band - top) * 16)
                if cells[r0 // 16 : (r + 15) // 16 + 1, c // 16 : (c + 15) // 16 + 1].any():
                    windows += 1
    assert record["windows"] == windows and record["unet_evaluations"] == windows * 2
    # ... and the sampler counted exactly those UNet evaluations (glass cost none).
    assert f"{windows * 2} UNet evaluations ({windows * 2} in this process)" in captured.out
    assert windows < (2 * cols - 1) * (2 * rows - 1)  # an all-tissue grid's windows
    slide = openslide.OpenSlide(out / "slide.tif")
    assert slide.dimensions == (cols * 256, rows * 256) and slide.level_count == len(record["levels"]) >= 2
    assert float(slide.properties["openslide.mpp-x"]) == pytest.approx(MPP)
    assert float(slide.properties["openslide.mpp-y"]) == pytest.approx(MPP)
    image = np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB"))
    slide.close()
    cells = image.reshape(rows, 256, cols, 256, 3).transpose(0, 2, 1, 3, 4)
    # JPEG keeps flat white exactly; tissue cells are rendered (a random decoder's texture).
    white = (cells == 255).all(axis=(2, 3, 4))
    assert np.array_equal(white, ~tissue)
    assert (cells[tissue].std(axis=(1, 2, 3)) > 5).all()
    thumbnail = np.asarray(Image.open(out / "thumbnail.jpg"))
    assert max(thumbnail.shape[:2]) <= 256
    assert not (tmp_path / ".slide.work").exists()


class Killed(Exception):
    pass


def test_a_killed_run_resumes_at_the_first_unfinished_band_to_the_same_bytes(demo, tmp_path):
    root, index = demo
    rows = index.row.max() + 1
    source = dict(mpp=MPP, settings=SETTINGS, seed=5, embeddings_dir=root / "embeddings", input_id=INPUT)
    whole = synthesize_slide(root / "model", tmp_path / "whole", **source)

    def die_after_band_1(band):
        if band == 1:
            raise Killed

    with pytest.raises(Killed):
        synthesize_slide(root / "model", tmp_path / "resumed", on_band=die_after_band_1, **source)
    work = tmp_path / ".resumed.work"
    assert sorted(p.name for p in work.glob("band-*.npy")) == ["band-00000.npy", "band-00001.npy"]
    assert not (tmp_path / "resumed").exists()
    sampled = []
    resumed = synthesize_slide(root / "model", tmp_path / "resumed", on_band=sampled.append, **source)
    assert sampled == list(range(2, rows))  # bands 0 and 1 were not sampled again
    assert resumed == whole
    for name in ("slide.tif", "thumbnail.jpg", "slide.json"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    # Other settings start over (the saved bands are another run's).
    with pytest.raises(Killed):
        synthesize_slide(root / "model", tmp_path / "other", on_band=die_after_band_1, **{**source, "seed": 6})
    other = synthesize_slide(root / "model", tmp_path / "other", **source)
    assert (tmp_path / "other" / "slide.tif").read_bytes() == (tmp_path / "whole" / "slide.tif").read_bytes()
    assert other == whole


@pytest.fixture(scope="module")
def good_h5(demo, tmp_path_factory):
    root, index = demo
    folder = tmp_path_factory.mktemp("h5")
    coords = index[["x", "y"]].to_numpy(np.int64)
    return folder, coords, index_features(root, index), int(index.read_size.iloc[0])


def test_bad_feature_files_give_typed_errors_naming_the_file(good_h5, demo, tmp_path, capsys):
    folder, coords, features, side = good_h5
    attrs = {"patch_size_level0": side}
    cases = {
        "narrow.h5": (coords, features[:, :383], attrs, "width 383.*384"),
        "offgrid.h5": (coords + np.array([[0, 0]] * (len(coords) - 1) + [[7, 0]]), features, attrs,
                       "off the .*patch grid"),
        "duplicate.h5": (np.concatenate([coords, coords[:1]]), np.concatenate([features, features[:1]]), attrs,
                         "duplicate coords"),
        "no_size.h5": (coords, features, {}, "no patch_size"),
    }
    for name, (xy, values, coords_attrs, message) in cases.items():
        path = write_h5(tmp_path / name, xy, values, coords_attrs)
        with pytest.raises(SlideGridError, match=rf"{path}: .*{message}"):
            grid_from_h5(path, tmp_path / "work", 384)
    no_features = tmp_path / "no_features.h5"
    with h5py.File(no_features, "w") as handle:
        handle.create_dataset("coords", data=coords)
        handle.create_dataset("feats", data=features)
    with pytest.raises(SlideGridError, match=rf"{no_features}: no dataset features .*found \['coords', 'feats'\]"):
        grid_from_h5(no_features, tmp_path / "work", 384)
    not_h5 = tmp_path / "features.h5"
    not_h5.write_bytes(b"not an HDF5 file")
    with pytest.raises(SlideGridError, match=rf"{not_h5}: not a readable HDF5 file"):
        grid_from_h5(not_h5, tmp_path / "work", 384)
    # The command line: one error line naming the file, status 2, nothing written.
    root, _ = demo
    code = main(["synthesize-slide", "--model", str(root / "model"), "--h5", str(tmp_path / "narrow.h5"),
                 "--mpp", "0.5", "--out", str(tmp_path / "out")])
    assert code == 2
    assert f"error: {tmp_path / 'narrow.h5'}: features of width 383" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.work").exists()


def test_slide_settings_come_from_the_schema():
    from pipeline.config import ConfigError, settings_from_table

    assert settings_from_table(SlideSettings, {}, "synthesize_slide") == SlideSettings()
    with pytest.raises(ConfigError, match="synthesize_slide: band_rows"):
        settings_from_table(SlideSettings, {"band_rows": 0}, "synthesize_slide")
    assert SlideSettings(mode="lid").sampler_config(16).stride == 4  # lid mode's 16 of 64, on 16-latent windows


def test_the_workflow_selects_slides_by_name_holdout_or_all():
    from pipeline.config import selected_slides

    inputs, held_out, tiled = ["a", "b", "c"], ("c",), ["a", "c"]  # b kept no patches
    assert selected_slides("all", inputs, held_out, tiled) == ["a", "c"]
    assert selected_slides("held_out", inputs, held_out, tiled) == ["c"]
    assert selected_slides(["b", "a", "other"], inputs, held_out, tiled) == ["a"]
    assert selected_slides((), inputs, held_out, tiled) == []
    # the selection is not part of a slide's identity: changing it never restarts a slide
    assert SlideSettings(slides="all").sampler_config(16) == SlideSettings().sampler_config(16)


def test_a_slide_selection_naming_no_slide_input_is_a_config_error(tmp_path):
    import yaml

    from pipeline.config import ConfigError, load_config

    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    config["datasets"]["demo_he_20x"]["inputs"] = [str(DEMO_SLIDE)]
    config["synthesize_slide"] = {"slides": ["cmu_small_region", "nowhere"]}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"synthesize_slide\.slides: \['nowhere'\] are not inputs of any slide"):
        load_config(tmp_path / "c.yaml")
    config["synthesize_slide"] = {"slides": "some"}
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"synthesize_slide\.slides"):
        load_config(tmp_path / "c.yaml")
