"""Slide pixels decoded from the TIFF tiles equal OpenSlide's, on real slides; anything that
cannot be proven equal goes through OpenSlide."""

from __future__ import annotations

import json

import numpy as np
import openslide
import pytest
from PIL import Image

from helpers import DEMO_SLIDE, decode, make_spec, read_shards
from pipeline.io.large_image_files import write_pyramid_tiff
from pipeline.tiling.outputs import tile_input
from pipeline.tiling.slide import open_slide_source
from pipeline.tiling.tiff_tiles import TiffLevelReader
from slide_files import write_aperio_jp2k_svs


def openslide_on_white(slide, level, left, top, width, height):
    """OpenSlide's region at level pixel (left, top), transparent pixels shown white."""
    downsample = slide.level_downsamples[level]
    region = slide.read_region((round(left * downsample), round(top * downsample)), level, (width, height))
    white = Image.new("RGB", region.size, (255, 255, 255))
    white.paste(region, mask=region.getchannel("A"))
    return np.asarray(white)


# Inside one tile, across tile corners (Aperio tiles are 240 px), the last partial tiles, and
# partly outside the level (white there, as tiling shows OpenSlide's transparent pixels).
DEMO_REGIONS = [(0, 0, 100, 80), (200, 230, 300, 257), (1900, 2700, 320, 267), (2100, 2900, 257, 257)]


def test_demo_slide_regions_equal_openslide():
    with openslide.OpenSlide(DEMO_SLIDE) as slide:
        reader = TiffLevelReader.open(DEMO_SLIDE, slide)
        assert reader is not None and reader.serves(0)
        for region in DEMO_REGIONS:
            np.testing.assert_array_equal(reader.region(0, *region), openslide_on_white(slide, 0, *region))
        reader.close()


def test_pyramid_levels_equal_openslide(tmp_path, he_image):
    """A JPEG (YCbCr) pyramidal generic TIFF from a real H&E image: every level, every region."""
    path = tmp_path / "pyramid.tif"
    write_pyramid_tiff(path, he_image[:1000, :1000], 0.5)
    with openslide.OpenSlide(path) as slide:
        assert slide.level_count == 3
        reader = TiffLevelReader.open(path, slide)
        for level in range(slide.level_count):
            assert reader.serves(level)
            for region in [(0, 0, 64, 64), (37, 45, 300, 200), (200, 190, 120, 90)]:
                np.testing.assert_array_equal(reader.region(level, *region), openslide_on_white(slide, level, *region))
        reader.close()


def test_a_level_whose_tiles_differ_from_openslide_is_left_to_openslide(monkeypatch):
    with openslide.OpenSlide(DEMO_SLIDE) as slide:
        reader = TiffLevelReader.open(DEMO_SLIDE, slide)
        decode_tile = reader._tile
        monkeypatch.setattr(reader, "_tile", lambda level, index: decode_tile(level, index) ^ 1)
        assert not reader.serves(0)
        reader.close()


def test_jpeg2000_svs_is_read_by_openslide(tmp_path, he_image):
    """Aperio JPEG 2000 (colour transforms OpenSlide applies itself) is not decoded here."""
    path = write_aperio_jp2k_svs(tmp_path / "jp2k.svs", he_image, mpp=0.5)
    spec = make_spec(inputs={"j": str(path)})
    status = tile_input(spec, "j", path, tmp_path / "out", open_slide_source)
    assert status["status"] == "done" and status["pixel_reader"] == "openslide"


def test_demo_slide_is_tiled_from_its_tiles(tmp_path):
    spec = make_spec(inputs={"d": str(DEMO_SLIDE)})
    status = tile_input(spec, "d", DEMO_SLIDE, tmp_path / "out", open_slide_source)
    assert status["status"] == "done" and status["pixel_reader"] == "tifffile"
    assert status["patch_count"] > 0


@pytest.fixture(scope="module")
def he_image(shared_data):
    with Image.open(shared_data / "he_images" / "TCGA-HE-7130-01Z-00-DX1.png") as image:
        return np.asarray(image.convert("RGB"))


def test_tiling_from_a_reduced_level_equals_openslide_reads(tmp_path, he_image):
    """At 1 um/px from a 0.5 um/px pyramid the patches come from level 1's tiles: each equals
    OpenSlide's read of the same level-0 box at that level, resized the same way."""
    path = tmp_path / "pyramid.tif"
    write_pyramid_tiff(path, he_image[:1000, :1000], 0.5)
    spec = make_spec(inputs={"p": str(path)}, target_mpp=1.0, patch_size=128, tissue_threshold=0.2)
    out = tmp_path / "out"
    status = tile_input(spec, "p", path, out, open_slide_source)
    assert status["status"] == "done" and status["read_level"] == 1 and status["pixel_reader"] == "tifffile"
    samples = read_shards(out)
    assert len(samples) == status["patch_count"] > 0
    with openslide.OpenSlide(path) as slide:
        for sample in samples:
            meta = json.loads(sample["json"])
            region = openslide_on_white(slide, 1, meta["x"] // 2, meta["y"] // 2, 128, 128)
            np.testing.assert_array_equal(decode(sample["png"]), region)  # 256 level-0 px = 128 at level 1


def test_a_directory_tifffile_cannot_parse_leaves_the_slide_to_openslide(tmp_path, monkeypatch):
    """OpenSlide opened it, so a tifffile failure while scanning pages is not the slide's fault."""
    import pipeline.tiling.tiff_tiles as tiff_tiles

    class Unparsable:
        def __init__(self, path):
            pass

        @property
        def pages(self):
            raise ValueError("invalid TIFF directory")

        def close(self):
            pass

    monkeypatch.setattr(tiff_tiles.tifffile, "TiffFile", Unparsable)
    spec = make_spec(inputs={"d": str(DEMO_SLIDE)})
    status = tile_input(spec, "d", DEMO_SLIDE, tmp_path / "out", open_slide_source)
    assert status["status"] == "done" and status["pixel_reader"] == "openslide" and status["patch_count"] > 0
