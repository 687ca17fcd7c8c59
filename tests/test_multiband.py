"""Any number of bands, end to end, on the real 4-band NAIP quarter-quads (R, G, B, NIR at 5 m):
tiled with all four bands (lossless TIFF patches), a 4-channel autoencoder trained on them, the
patches embedded (RGB) and encoded to latents (all bands), a small diffusion model trained and
exported, and a 2x2 large image written as a georeferenced 4-band GeoTIFF (CRS and affine of the
reference region, computed here from the tiling manifest and the source's affine) beside its RGB
preview PNG. Tiny models and step counts: about half a minute on one core."""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from affine import Affine
from PIL import Image

from helpers import SHARED_DATA, make_spec
from pipeline.autoencoder.run import BandsMismatchError, train_autoencoder
from pipeline.autoencoder.settings import AutoencoderTrainSettings
from pipeline.config import ConfigError, prepare_config
from pipeline.io.shards import decode_bands, image_field, read_shard

pytestmark = pytest.mark.usefixtures("single_thread_torch")

NAIP = sorted((SHARED_DATA / "aerial").glob("m_4709963_se_14_1_20*.tif"))
PATCH = 256
HELD_OUT = NAIP[1].stem if len(NAIP) == 2 else ""
ENCODER = "hipt_vit_s16"
AE = AutoencoderTrainSettings(kind="kl", downsampling=16, channels=8, channel_multipliers=(1, 2, 2, 4, 4),
                              layers_per_block=1, latent_channels=3, attention=False, crop_size=64, batch_size=4,
                              max_steps=30, learning_rate=0.001, checkpoint_every=30, log_every=10,
                              accelerator="cpu", seed=0, in_channels=4)


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> dict:
    """tile -> autoencoder -> embed -> latents -> train -> export -> large_image, on both NAIP files;
    then prior -> generate."""
    from pipeline.embedding.encoders import build_encoder
    from pipeline.embedding.extract import EmbeddingSettings, embed_input
    from pipeline.embedding.outputs import recorded_encoder, write_dataset_index
    from pipeline.latents import EncodeSettings, encode_input
    from pipeline.models.autoencoder import load_autoencoder
    from pipeline.prior.run import train_prior
    from pipeline.prior.settings import PriorSettings
    from pipeline.sampling.generate import GenerateSettings, generate_images
    from pipeline.sampling.config import LargeImageSettings
    from pipeline.sampling.stage import generate_large_images
    from pipeline.tiling.run import tile_dataset
    from pipeline.training.config import TrainConfig
    from pipeline.training.export import export_checkpoint
    from pipeline.training.run import last_checkpoint, train

    assert len(NAIP) == 2, f"the two NAIP files under {SHARED_DATA / 'aerial'}"
    root = tmp_path_factory.mktemp("naip4")
    spec = make_spec(name="naip4", kind="aerial", inputs={p.stem: str(p) for p in NAIP}, target_mpp=5.0,
                     patch_size=PATCH, bands=(1, 2, 3, 4), image_format="tif", holdout_inputs=(HELD_OUT,),
                     holdout_fraction=0.0, encoders=(ENCODER,))
    tiles = root / "tiles"
    tile_dataset(spec, tiles)
    autoencoder_dir = root / "autoencoder"
    train_autoencoder(tiles, autoencoder_dir, AE, dataset=spec.name, holdout_inputs=spec.holdout_inputs)
    autoencoder = load_autoencoder("trained", autoencoder_dir)

    encoder = build_encoder(ENCODER, allow_random_weights=True)
    embeddings = root / "embeddings"
    for input_id in spec.inputs:
        embed_input(tiles / "inputs" / input_id, embeddings / "inputs" / input_id, [encoder],
                    EmbeddingSettings(batch_size=4, num_workers=0, device="cpu"))
    write_dataset_index([embeddings / "inputs" / i for i in spec.inputs], embeddings / "index.parquet")
    latents = root / "latents"
    for input_id in spec.training_inputs:
        encode_input(embeddings / "inputs" / input_id, latents / "inputs" / input_id, autoencoder,
                     EncodeSettings(batch_size=4, num_workers=0, device="cpu", flips="none"))

    config = TrainConfig(preset="small", latent_size=PATCH // 16, latent_channels=3, batch_size=2, max_steps=3,
                         warmup_steps=1, num_workers=0, shards_per_block=1, checkpoint_every=3, log_every=1,
                         augment="none", embedding_key=ENCODER, patch_embed_dim=encoder.spec.output_dim, seed=0)
    run = root / "training"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        train(config, [latents], run, enable_progress_bar=False)
    model = export_checkpoint(last_checkpoint(run), root / "model", autoencoder,
                              encoder=recorded_encoder(list((latents / "inputs").glob("*/manifest.parquet")), ENCODER))
    settings = LargeImageSettings(k=2, regions=1, mode="fast", steps=2, device="cpu")
    manifest = generate_large_images(model, embeddings, root / "large", dataset=spec.name, kind="aerial",
                                     mpp=spec.target_mpp, holdout_inputs=spec.holdout_inputs, settings=settings,
                                     seed=0, source_bands=spec.bands)
    # A tiny prior on the training input's grid (3x2 cells at 256 px), then one reference-free image.
    prior = root / "prior"
    train_prior({spec.name: embeddings}, prior, PriorSettings(
        crop=2, layers=1, heads=2, head_dim=16, batch_size=4, max_steps=5, warmup_steps=1, checkpoint_every=5,
        log_every=1, embedding_key=ENCODER, accelerator="cpu"), holdout_inputs={spec.name: spec.holdout_inputs})
    generate_images(model, prior, root / "generated", dataset=spec.name, kind="aerial", mpp=spec.target_mpp,
                    settings=GenerateSettings(count=1, rows=2, cols=2, prior_steps=2, mode="fast", steps=2,
                                              device="cpu"), seed=0, source_bands=spec.bands)
    return {"root": root, "tiles": tiles, "autoencoder": autoencoder, "manifest": manifest}


def test_the_tiles_carry_all_four_bands(chain):
    tiles = chain["tiles"]
    status = json.loads((tiles / "inputs" / NAIP[0].stem / "status.json").read_text())
    assert status["bands"] == [1, 2, 3, 4] and status["band_count"] == 4
    sample = read_shard(next((tiles / "inputs" / NAIP[0].stem).glob("*.tar")))[0]
    assert image_field(sample) == "tif"
    patch = decode_bands(sample["tif"])
    meta = json.loads(sample["json"])
    with rasterio.open(NAIP[0]) as source:  # tiled at the source's 5 m: an exact copy of all four bands
        window = rasterio.windows.Window(int(meta["x"]), int(meta["y"]), PATCH, PATCH)
        raw = source.read((1, 2, 3, 4), window=window)
    np.testing.assert_array_equal(patch, np.moveaxis(raw, 0, -1))


def test_the_autoencoder_has_four_input_and_output_channels(chain):
    model = chain["autoencoder"].model
    assert model.config.in_channels == 4 and model.config.out_channels == 4


def test_the_large_image_is_a_georeferenced_four_band_geotiff_beside_an_rgb_png(chain):
    root, tiles = chain["root"], chain["tiles"]
    row = chain["manifest"].iloc[0]
    assert (row.k, row.width, row.height) == (2, 2 * PATCH, 2 * PATCH)
    # The region's georeference, from tiling's own records: the source's affine (status.json),
    # moved to the top-left patch's source pixel and scaled from source to target pixels.
    tiled = pd.read_parquet(tiles / "manifest.parquet")
    top_left = tiled[(tiled.input_id == row.input_id) & (tiled.col == row.col) & (tiled.row == row.row)].iloc[0]
    status = json.loads((tiles / "inputs" / row.input_id / "status.json").read_text())
    scale = top_left.read_size / PATCH
    expected = Affine(*status["source_transform"]) @ Affine.translation(top_left.x, top_left.y) @ Affine.scale(scale)
    large = root / "large"
    for column in ("generated_geotiff", "reference_geotiff"):
        with rasterio.open(large / row[column]) as image, rasterio.open(NAIP[0 if row.input_id == NAIP[0].stem else 1]) as source:
            assert image.count == 4 and image.dtypes == ("uint8",) * 4
            assert (image.width, image.height) == (row.width, row.height)
            assert image.crs == source.crs
            assert image.transform.almost_equals(expected, precision=1e-6), (image.transform, expected)
            assert image.profile["tiled"] and image.block_shapes[0] == (256, 256)
            assert image.overviews(1) == [2]
            assert image.colorinterp[3] == rasterio.enums.ColorInterp.undefined  # NIR, not alpha
            assert image.descriptions == tuple(f"source band {b}" for b in (1, 2, 3, 4))
            bands = np.moveaxis(image.read(), 0, -1)
        if column == "generated_geotiff":
            png = np.asarray(Image.open(large / row.generated_png))
            assert Image.open(large / row.generated_png).mode == "RGB"
            np.testing.assert_array_equal(png, bands[..., :3])  # the preview is the first three bands
        else:  # the reference is the real region: the source's own pixels (5 m: an exact copy)
            with rasterio.open(NAIP[0 if row.input_id == NAIP[0].stem else 1]) as source:
                window = rasterio.windows.Window(int(top_left.x), int(top_left.y), row.width, row.height)
                np.testing.assert_array_equal(bands, np.moveaxis(source.read(window=window), 0, -1))
            assert Image.open(large / row.reference_png).mode == "RGB"
    record = json.loads((large / row.region / "region.json").read_text())
    assert record["georeference"]["crs"] == "EPSG:26914"
    from pipeline.sampling.outputs import read_large_images  # the stage's own reader finds both

    region = read_large_images(large).regions[0]
    assert (region.generated_geotiff, region.reference_geotiff) == (large / row.generated_geotiff,
                                                                    large / row.reference_geotiff)
    assert record["georeference"]["transform"] == pytest.approx(list(expected)[:6])


def test_a_reference_free_aerial_image_is_a_four_band_geotiff_with_a_pixel_size_and_no_place(chain):
    from pipeline.sampling.outputs import read_generated_images

    (image,) = read_generated_images(chain["root"] / "generated").images
    assert image.geotiff is not None and image.geotiff.name == "generated.geo.tif"
    with rasterio.open(image.geotiff) as geotiff:
        assert geotiff.count == 4 and geotiff.crs is None  # generated from no place: none is claimed
        assert geotiff.transform.almost_equals(Affine(5.0, 0, 0, 0, -5.0, 0))  # but at the dataset's 5 m
        assert geotiff.descriptions == tuple(f"source band {b}" for b in (1, 2, 3, 4))
        bands = np.moveaxis(geotiff.read(), 0, -1)
    assert bands.shape == (2 * PATCH, 2 * PATCH, 4)
    np.testing.assert_array_equal(np.asarray(Image.open(image.generated)), bands[..., :3])
    cells = bands.reshape(2, PATCH, 2, PATCH, 4).transpose(0, 2, 1, 3, 4)
    for (r, c), tissue in np.ndenumerate(image.tissue):
        if tissue:
            assert cells[r, c, ..., 3].std() > 0  # a generated NIR band
        else:
            assert (cells[r, c] == 255).all()  # glass


def test_a_resampled_region_is_placed_by_the_source_affine_and_the_gsd_ratio(tmp_path):
    """At 10 m (two source pixels per target pixel) and away from the origin: the GeoTIFF of a region
    covers exactly its four patches' ground."""
    from pipeline.embedding.outputs import write_dataset_index
    from pipeline.io.geotiff import write_geotiff
    from pipeline.sampling.references import find_regions, region_georeference
    from pipeline.tiling.run import tile_dataset

    side = 64
    spec = make_spec(name="naip10", kind="aerial", inputs={NAIP[0].stem: str(NAIP[0])}, target_mpp=10.0,
                     patch_size=side, bands=(1, 2, 3, 4), image_format="tif")
    tile_dataset(spec, tmp_path / "tiles")
    index = write_dataset_index([tmp_path / "tiles" / "inputs" / NAIP[0].stem], tmp_path / "index.parquet")
    region = find_regions(index, 2, 3)[-1]
    assert (region.col, region.row) != (0, 0)
    status = json.loads((tmp_path / "tiles" / "inputs" / NAIP[0].stem / "status.json").read_text())
    top_left = index[index.key == region.keys[0][0]].iloc[0]
    assert top_left.read_size == 2 * side  # 5 m source pixels, 10 m target pixels
    expected = (Affine(*status["source_transform"]) @ Affine.translation(top_left.x, top_left.y)
                @ Affine.scale(top_left.read_size / side))
    georeference = region_georeference(index, region)
    assert georeference.crs == "EPSG:26914"
    assert Affine(*georeference.transform).almost_equals(expected, precision=1e-6)
    path = tmp_path / "region.tif"
    write_geotiff(path, np.zeros((2 * side, 2 * side, 4), np.uint8), georeference.crs, georeference.transform)
    corners = [index[index.key == key].iloc[0]["bounds"] for row in region.keys for key in row]
    with rasterio.open(path) as image:
        assert tuple(image.bounds) == pytest.approx((min(c[0] for c in corners), min(c[1] for c in corners),
                                                     max(c[2] for c in corners), max(c[3] for c in corners)))


def test_four_band_patches_refuse_an_rgb_autoencoder_naming_both(chain, tmp_path):
    rgb = AutoencoderTrainSettings(**{**AE.to_dict(), "channel_multipliers": AE.channel_multipliers,
                                      "in_channels": 3, "max_steps": 1})
    with pytest.raises(BandsMismatchError, match="4 bands, but the autoencoder takes 3 channels"):
        train_autoencoder(chain["tiles"], tmp_path / "ae", rgb, dataset="naip4", holdout_inputs=(HELD_OUT,))


def config_with(datasets: dict, trained_on: str, **dataset_changes) -> dict:
    return {"datasets": datasets,
            "encoders": {ENCODER: {"allow_random_weights": True}},
            "autoencoder": {"downsampling": 16},
            "latents": {"autoencoder": {"kind": "trained", "dataset": trained_on}},
            "training": {"preset": "small", "latent_size": 16}}


def naip_dataset(**changes) -> dict:
    return {"kind": "aerial", "inputs": [str(p) for p in NAIP], "resolution": 5.0, "bands": [1, 2, 3, 4],
            "image_format": "tif", "encoders": [ENCODER], **changes}


def test_configs_whose_bands_do_not_fit_fail_naming_both_numbers(tmp_path):
    assert prepare_config(config_with({"naip": naip_dataset()}, "naip"), tmp_path)["naip"].band_count == 4
    rgb = naip_dataset(bands=[1, 2, 3], image_format="png")
    with pytest.raises(ConfigError, match=r"datasets\.rgb\.bands: its patches have 3 bands, but the autoencoder "
                                          r"\(trained on datasets\.naip\) takes 4 channels"):
        prepare_config(config_with({"naip": naip_dataset(), "rgb": rgb}, "naip"), tmp_path)
    with pytest.raises(ConfigError, match=r"datasets\.naip\.image_format: jpg holds 3 bands, but bands \[1, 2, 3, 4\] "
                                          r"are 4; set image_format: tif"):
        prepare_config(config_with({"naip": naip_dataset(image_format="jpg")}, "naip"), tmp_path)


def test_snakemake_runs_the_four_band_chain_through_its_rules(tmp_path):
    """The same chain through the workflow's rules (`snakemake large_image` on a config of one
    4-band aerial dataset): each stage's job runs, and the large image's GeoTIFF carries all four
    bands and the source's CRS."""
    import subprocess
    import sys

    import yaml

    from helpers import pipeline_env

    repo = Path(__file__).resolve().parents[1]
    config = {
        "output_dir": "out", "seed": 0,
        "encoders": {ENCODER: {"weights": None, "allow_random_weights": True}},
        "datasets": {"naip4": {"kind": "aerial", "inputs": [str(p) for p in NAIP], "resolution": 5.0,
                               "bands": [1, 2, 3, 4], "image_format": "tif", "encoders": [ENCODER],
                               "holdout": {"inputs": [str(NAIP[1])], "fraction": 0.0}}},
        "embedding": {"batch_size": 4, "num_workers": 0, "device": "cpu"},
        "autoencoder": {key: value for key, value in dataclasses.asdict(AE).items() if key not in ("in_channels", "seed")}
        | {"max_steps": 10, "checkpoint_every": 10},
        "latents": {"autoencoder": {"kind": "trained", "dataset": "naip4"}, "batch_size": 4, "num_workers": 0,
                    "device": "cpu", "flips": "none"},
        "training": {"preset": "small", "latent_size": PATCH // 16, "batch_size": 2, "max_steps": 3,
                     "warmup_steps": 1, "num_workers": 0, "checkpoint_every": 3, "log_every": 1, "augment": "none"},
        "large_image": {"k": 2, "regions": 1, "mode": "fast", "steps": 2, "device": "cpu"},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "snakemake", "--snakefile", str(repo / "Snakefile"), "large_image",
                             "--cores", "1", "--configfile", str(tmp_path / "config.yaml"), "--directory", str(tmp_path)],
                            capture_output=True, text=True, env=pipeline_env(), cwd=repo)
    assert result.returncode == 0, result.stderr[-3000:]
    for rule in ("tile_input", "train_autoencoder", "embed_input", "latents_input", "train_dataset", "export_model",
                 "large_image_dataset"):
        assert f"rule {rule}:" in result.stderr, rule
    out = tmp_path / "out"
    record = json.loads((out / "models/naip4/model_index.json").read_text())
    assert record["provenance"]["autoencoder"]["trained"]["dataset"] == "naip4"
    row = pd.read_parquet(out / "large_images/naip4/manifest.parquet").iloc[0]
    with rasterio.open(out / "large_images/naip4" / row.generated_geotiff) as image, \
            rasterio.open(next(p for p in NAIP if p.stem == row.input_id)) as source:
        assert image.count == 4 and image.crs == source.crs
        assert (image.width, image.height) == (2 * PATCH, 2 * PATCH)
        assert np.moveaxis(image.read(), 0, -1)[..., 3].std() > 0  # NIR carries a generated band, not a constant
