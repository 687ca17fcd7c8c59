"""Slide tiling on the real demo slide (CMU-1-Small-Region, 0.499 um/px, 20x)."""

from __future__ import annotations

import json

import numpy as np
import openslide
import pandas as pd
import pytest
from PIL import Image
from skimage import color

from helpers import (DEMO_SLIDE, decode, make_spec, pipeline_env, read_shards, run_pipeline, run_pipeline_dying,
                     run_pipeline_killed)
from pipeline.tiling.outputs import tile_input
from pipeline.tiling.slide import open_slide_source
from pipeline.tiling.tissue import MAX_BACKGROUND_FRACTION, background_fraction

ID = "cmu_small_region"


def tile(tmp_path, name="out", **changes):
    spec = make_spec(inputs={ID: str(DEMO_SLIDE)}, **changes)
    out = tmp_path / name
    status = tile_input(spec, ID, DEMO_SLIDE, out, open_slide_source)
    return spec, out, status


def direct_read(x, y, read_size, size=256):
    """The reference: OpenSlide read at level 0, alpha onto white, area resize with PIL."""
    with openslide.OpenSlide(DEMO_SLIDE) as slide:
        region = slide.read_region((x, y), 0, (read_size, read_size))
    rgb = Image.new("RGB", region.size, (255, 255, 255))
    rgb.paste(region, mask=region.getchannel("A"))
    return np.asarray(rgb.resize((size, size), Image.Resampling.BOX))


@pytest.fixture(scope="module")
def demo_20x(tmp_path_factory):
    return tile(tmp_path_factory.mktemp("t20"))


@pytest.mark.parametrize("target_mpp, threshold, read_size", [(0.5, 0.5, 257), (2.0, 0.2, 1026)])
def test_patches_equal_direct_openslide_reads(tmp_path, target_mpp, threshold, read_size):
    spec, out, status = tile(tmp_path, target_mpp=target_mpp, tissue_threshold=threshold)
    assert status["status"] == "done" and status["level0_mpp"] == pytest.approx(0.499)
    assert status["read_size"] == read_size == round(256 * target_mpp / 0.499)
    samples = read_shards(out)
    assert len(samples) == status["patch_count"] > 0
    for sample in samples:
        meta = json.loads(sample["json"])
        assert meta["read_size"] == read_size and meta["mpp"] == target_mpp
        patch = decode(sample["png"])
        assert patch.shape == (256, 256, 3)
        np.testing.assert_array_equal(patch, direct_read(meta["x"], meta["y"], read_size))


def test_tiling_above_the_slides_resolution_needs_an_opt_in(tmp_path):
    """0.499 um/px (20x) tiled at 0.25 um/px (40x) would be 2x interpolated: would_upsample."""
    _, out, status = tile(tmp_path, target_mpp=0.25)
    assert (status["status"], status["reason"]) == ("error", "would_upsample")
    assert not list(out.glob("*.tar"))
    for part in ("0.499 um/px", "0.25 um/px", "2x", "max_upsample = 1.5", "max_upsample: 2"):
        assert part in status["message"], (part, status["message"])
    source = open_slide_source(DEMO_SLIDE, make_spec(target_mpp=0.25, max_upsample=2.0))
    try:
        assert source.read_size == 128
    finally:
        source.close()


def test_sample_metadata_keys_and_order(demo_20x):
    spec, out, status = demo_20x
    samples = read_shards(out)
    metas = [json.loads(s["json"]) for s in samples]
    for sample, meta in zip(samples, metas):
        assert "." not in sample["__key__"]
        assert sample["__key__"] == f"{ID}_r{meta['row']:05d}_c{meta['col']:05d}"
        for field in ("dataset", "slide", "x", "y", "read_size", "mpp", "col", "row"):
            assert field in meta
        assert meta["slide"] == "cmu_small_region.svs"
        assert (meta["x"], meta["y"]) == (meta["col"] * 257, meta["row"] * 257)
        # never a stretched edge tile: the whole read box lies inside the slide
        assert meta["x"] + 257 <= 2220 and meta["y"] + 257 <= 2967
    order = [(m["row"], m["col"]) for m in metas]
    assert order == sorted(order), "patches must be in row-major order"


def test_manifest_thumbnail_and_status(demo_20x):
    spec, out, status = demo_20x
    manifest = pd.read_parquet(out / "manifest.parquet")
    assert len(manifest) == status["patch_count"]
    for column in ("key", "x", "y", "read_size", "level0_mpp", "mpp", "tissue_fraction", "col", "row", "shard"):
        assert column in manifest.columns
    assert (manifest.tissue_fraction >= spec.tissue_threshold).all()
    assert set(manifest.shard) == {p.name for p in out.glob("*.tar")}
    saved = json.loads((out / "status.json").read_text())
    assert saved["status"] == "done" and saved["patch_count"] == len(manifest)
    with Image.open(out / "thumbnail.jpg") as thumb:
        assert 512 < max(thumb.size) <= 1024  # QC thumbnail at a readable size (a whole-block mean of the level)
    assert not [p for p in out.parent.iterdir() if ".tmp-" in p.name]


def full_res_tissue_fraction(rgb):
    """An independent tissue measure: saturated, non-white pixels at full resolution."""
    hsv = color.rgb2hsv(rgb)
    return float(np.mean((hsv[..., 1] > 0.1) & (hsv[..., 2] < 0.95)))


def test_patch_counts_follow_the_tissue(demo_20x, tmp_path):
    spec, out, status = demo_20x
    kept = {(m["col"], m["row"]) for m in (json.loads(s["json"]) for s in read_shards(out))}
    kept_fractions, dropped_fractions = [], []
    for row in range(status["grid_rows"]):
        for col in range(status["grid_cols"]):
            rgb = direct_read(col * 257, row * 257, 257)
            (kept_fractions if (col, row) in kept else dropped_fractions).append(full_res_tissue_fraction(rgb))
    # kept patches are tissue, dropped ones mostly glass
    assert min(kept_fractions) > 0.3
    assert np.mean(kept_fractions) > 0.7
    assert np.mean(dropped_fractions) < 0.25
    # no background patch is ever kept
    for sample in read_shards(out):
        assert background_fraction(decode(sample["png"])) <= MAX_BACKGROUND_FRACTION
    # a stricter threshold keeps a subset
    _, _, strict = tile(tmp_path, tissue_threshold=0.9)
    assert 0 < strict["patch_count"] < status["patch_count"]


def test_jpeg_patches_are_close_to_lossless(tmp_path, demo_20x):
    _, out_png, _ = demo_20x
    _, out_jpg, status = tile(tmp_path, image_format="jpg", jpeg_quality=95)
    pngs, jpgs = read_shards(out_png), read_shards(out_jpg)
    assert [s["__key__"] for s in pngs] == [s["__key__"] for s in jpgs]
    for a, b in zip(pngs, jpgs):
        diff = decode(a["png"]).astype(float) - decode(b["jpg"]).astype(float)
        psnr = 10 * np.log10(255**2 / np.mean(diff**2))
        assert psnr > 35


def test_shards_are_deterministic_and_split(tmp_path):
    _, first, status = tile(tmp_path, "a", patches_per_shard=10)
    _, second, _ = tile(tmp_path, "b", patches_per_shard=10)
    shards = sorted(p.name for p in first.glob("*.tar"))
    assert len(shards) == -(-status["patch_count"] // 10)
    for name in shards:
        assert (first / name).read_bytes() == (second / name).read_bytes()


def test_killed_job_leaves_nothing_finished_and_rerun_is_identical(tmp_path):
    spec = make_spec(inputs={ID: str(DEMO_SLIDE)}, patches_per_shard=5)
    killed = tmp_path / "killed"
    args = ["tile-input", "--spec", spec.to_json(), "--input-id", ID, "--out", str(killed)]
    # The job itself killed (tiling in-process): nothing that looks finished.
    run_pipeline_killed("pipeline.io.shards:ShardWriter.write", 7, args, cwd=tmp_path,  # mid second shard
                        env=pipeline_env(PIPELINE_TILE_MEMORY_MB="0"))
    assert not killed.exists(), "a killed job must not leave its output folder"
    # The tiling child killed: the job records it as the input's failure, and exits 0.
    leftovers = set(tmp_path.glob(".killed.tmp-*"))  # the killed job's, which nothing could remove
    died = run_pipeline_dying("pipeline.io.shards:ShardWriter.write", 7, args, cwd=tmp_path)
    assert died.returncode == 0, died.stderr[-2000:]
    status = json.loads((killed / "status.json").read_text())
    assert (status["status"], status["reason"], status["patch_count"]) == ("error", "reader_crashed", 0)
    assert "SIGKILL" in status["message"] and str(DEMO_SLIDE) in status["message"]
    assert not list(killed.glob("*.tar")) and set(tmp_path.glob(".killed.tmp-*")) == leftovers
    run_pipeline(args, cwd=tmp_path)
    reference = tmp_path / "reference"
    tile_input(spec, ID, DEMO_SLIDE, reference, open_slide_source)
    names = sorted(p.name for p in reference.glob("*.tar"))
    assert names == sorted(p.name for p in killed.glob("*.tar")) and len(names) > 1
    for name in names + ["manifest.parquet"]:
        assert (killed / name).read_bytes() == (reference / name).read_bytes()
