"""Bad and unusual slides: each bad one ends with a typed reason in the status table, the unusual
formats (JPEG 2000 SVS, DICOM, several scenes, associated images) tile, and the rest of the
dataset completes. The table of hostile inputs across stages: docs/hostile_inputs.md."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import openslide
from PIL import Image

from helpers import DEMO_SLIDE, decode, make_spec, read_shards
from pipeline.config import expand_inputs
from pipeline.tiling.run import tile_dataset
from slide_files import APERIO_JP2K_YCBCR, write_aperio_jp2k_svs, write_dicom_wsi, write_tiled_tiff


@pytest.fixture(scope="module")
def he_image(shared_data):
    with Image.open(shared_data / "he_images" / "TCGA-HE-7130-01Z-00-DX1.png") as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def other_he_image(shared_data):
    with Image.open(shared_data / "he_images" / "henorm_example1.png") as image:
        return np.asarray(image.convert("RGB"))


@pytest.fixture(scope="module")
def bad_dataset(tmp_path_factory, he_image, other_he_image):
    folder = tmp_path_factory.mktemp("slides")
    (folder / "good.svs").write_bytes(DEMO_SLIDE.read_bytes())
    (folder / "empty.svs").write_bytes(b"")
    (folder / "not_a_slide.svs").write_text("this is a text file, not a slide\n")
    data = DEMO_SLIDE.read_bytes()
    (folder / "truncated.svs").write_bytes(data[: len(data) * 2 // 5])
    corrupt = bytearray(data)  # directory intact, compressed tiles zeroed: opens, cannot be read
    corrupt[len(data) * 3 // 10: len(data) * 6 // 10] = bytes(len(data) * 6 // 10 - len(data) * 3 // 10)
    (folder / "corrupt_tiles.svs").write_bytes(bytes(corrupt))
    write_tiled_tiff(folder / "no_mpp.tif", he_image)
    write_tiled_tiff(folder / "tagged.tif", he_image, mpp=0.25)
    write_tiled_tiff(folder / "absurd.tif", he_image, mpp=1e-5)
    write_tiled_tiff(folder / "blank.tif", np.full((1024, 1024, 3), 245, np.uint8), mpp=0.5)
    write_tiled_tiff(folder / "tiny.tif", he_image[:200, :200], mpp=0.5)
    (folder / "TCGA-XX-0001-01Z-00-DX1.A1B2 ÿ slide.svs").write_bytes(data)
    # Formats OpenSlide 4 reads, made from real H&E pixels; label/macro/second scene hold other H&E.
    write_aperio_jp2k_svs(folder / "aperio_jp2k_rgb.svs", he_image, mpp=0.5, associated=other_he_image)
    write_aperio_jp2k_svs(folder / "aperio_jp2k_ycbcr.svs", he_image, mpp=0.5, compression=APERIO_JP2K_YCBCR)
    write_aperio_jp2k_svs(folder / "absurd_aperio_mpp.svs", he_image, mpp=5000)  # present, but 5 mm/px
    write_tiled_tiff(folder / "two_scenes.tif", he_image, mpp=0.5, second_scene=other_he_image)
    inputs = expand_inputs([str(folder / "*")], folder, "bad")
    inputs["missing"] = str(folder / "missing.svs")
    # A DICOM series is a folder of files, one per level: the input is one file of it.
    inputs["dicom_wsi"] = str(write_dicom_wsi(tmp_path_factory.mktemp("dicom"), "dicom_wsi", he_image, mpp=0.5))
    spec = make_spec(name="bad", inputs=inputs)
    out = tmp_path_factory.mktemp("out")
    summary = tile_dataset(spec, out)
    table = pd.read_csv(out / "status.tsv", sep="\t").set_index("input_id")
    return spec, out, table, summary


EXPECTED = {
    "good": ("done", None),
    "empty": ("error", "empty_file"),
    "not_a_slide": ("error", "open_failed"),
    "corrupt_tiles": ("error", "read_failed"),
    "no_mpp": ("error", "no_mpp"),
    "tagged": ("done", None),
    "absurd": ("error", "absurd_mpp"),
    "blank": ("error", "no_tissue"),
    "tiny": ("error", "too_small"),
    "missing": ("error", "not_found"),
    "TCGA-XX-0001-01Z-00-DX1-A1B2-y-slide": ("done", None),
    "aperio_jp2k_rgb": ("done", None),
    "aperio_jp2k_ycbcr": ("done", None),
    "dicom_wsi": ("done", None),
    "two_scenes": ("done", None),
    "absurd_aperio_mpp": ("error", "absurd_mpp"),
}


@pytest.mark.parametrize("input_id", sorted(EXPECTED))
def test_each_input_gets_its_typed_outcome(bad_dataset, input_id):
    spec, out, table, _ = bad_dataset
    status, reason = EXPECTED[input_id]
    row = table.loc[input_id]
    assert row.status == status
    folder = out / "inputs" / input_id
    manifest = pd.read_parquet(folder / "manifest.parquet")
    if status == "done":
        assert row.patch_count == len(manifest) > 0
        assert len(read_shards(folder)) == row.patch_count
    else:
        assert row.reason == reason
        assert spec.inputs[input_id] in row.message  # the message names the file
        assert row.patch_count == 0 and manifest.empty
        assert not list(folder.glob("*.tar"))
        # The QC image shows why nothing was kept; other failures have nothing to show.
        assert (folder / "thumbnail.jpg").exists() == (reason == "no_tissue")


def test_a_slide_without_tissue_gets_its_qc_thumbnail(bad_dataset):
    _, out, table, _ = bad_dataset
    assert table.loc["blank", "reason"] == "no_tissue"
    with Image.open(out / "inputs" / "blank" / "thumbnail.jpg") as thumbnail:
        assert thumbnail.size == (1024, 1024)
        pixels = np.asarray(thumbnail.convert("RGB")).astype(int)
    assert np.abs(pixels - 245).max() <= 3  # the blank glass, nothing tinted as tissue


def test_truncated_slide_fails_cleanly(bad_dataset):
    _, out, table, _ = bad_dataset
    row = table.loc["truncated"]
    # A truncated SVS either fails to open or fails when its missing tiles are read.
    assert (row.status, row.reason) in {("error", "open_failed"), ("error", "read_failed")}
    assert not list((out / "inputs" / "truncated").glob("*.tar"))


def test_summary_names_every_failure(bad_dataset):
    _, out, table, summary = bad_dataset
    failed = table[table.status == "error"]
    assert summary.splitlines()[0].startswith(f"{len(table) - len(failed)} of {len(table)} inputs tiled")
    for source in failed.source:
        assert f"FAILED {source}" in summary
    index = pd.read_parquet(out / "manifest.parquet")
    assert set(index.input_id) == set(table[table.status == "done"].index)


# input id -> facts its status must record although it failed (None: any value, but present)
FACTS_OF_FAILURES = {
    "corrupt_tiles": {"vendor": "aperio", "width": 2220, "height": 2967, "level0_mpp": 0.499, "read_size": 257},
    "no_mpp": {"vendor": "generic-tiff", "width": 1000, "height": 1000},
    "absurd": {"vendor": "generic-tiff", "width": 1000, "height": 1000},
    "tiny": {"width": 200, "height": 200, "level0_mpp": 0.5, "read_size": 256, "grid_cols": 0},
    "blank": {"width": 1024, "height": 1024, "level0_mpp": 0.5, "pixel_reader": None},
}


@pytest.mark.parametrize("input_id", sorted(FACTS_OF_FAILURES))
def test_a_failed_slide_records_what_was_learnt_before_it_failed(bad_dataset, input_id):
    _, out, table, _ = bad_dataset
    saved = json.loads((out / "inputs" / input_id / "status.json").read_text())
    assert saved["status"] == "error"
    for name, value in FACTS_OF_FAILURES[input_id].items():
        assert name in saved and (value is None or saved[name] == pytest.approx(value)), (name, saved)
        assert value is None or table.loc[input_id, name] == pytest.approx(value)


def test_status_table_keeps_slide_read_sizes_integer(bad_dataset):
    _, out, table, _ = bad_dataset
    lines = (out / "status.tsv").read_text().splitlines()
    column = lines[0].split("\t").index("read_size")
    values = {line.split("\t")[column] for line in lines[1:]}
    assert "257" in values and not any(value.endswith(".0") for value in values), values


def test_summary_gives_each_reason_once(bad_dataset):
    _, _, table, summary = bad_dataset
    failed = {line for line in summary.splitlines() if line.strip().startswith("FAILED")}
    assert len(failed) == (table.status == "error").sum()
    for line in failed:
        reason = next(r for r in table.reason.dropna() if f": {r}: " in line)
        assert line.count(f": {reason}") == 1 and f"({reason}" not in line, line
    no_mpp = next(line for line in failed if "FAILED no_mpp.tif" in line)
    assert no_mpp.startswith("  FAILED no_mpp.tif: no_mpp: no level-0 um/px in openslide.mpp-x"), no_mpp


def test_resolution_from_tiff_tags_and_override_table(bad_dataset, tmp_path):
    spec, out, table, _ = bad_dataset
    assert table.loc["tagged", "level0_mpp"] == pytest.approx(0.25)
    meta = json.loads(read_shards(out / "inputs" / "tagged")[0]["json"])
    assert meta["read_size"] == round(256 * 0.5 / 0.25)
    overrides = tmp_path / "mpp.csv"
    overrides.write_text("slide,mpp\nno_mpp.tif,0.25\n")
    fixed = make_spec(name="fixed", inputs={"no_mpp": spec.inputs["no_mpp"]}, mpp_overrides=str(overrides))
    tile_dataset(fixed, tmp_path / "fixed")
    row = pd.read_csv(tmp_path / "fixed" / "status.tsv", sep="\t").iloc[0]
    assert (row.status, row.mpp_source, row.level0_mpp) == ("done", "override_table", 0.25)


def test_no_mpp_names_what_was_looked_at_and_the_override_row_that_fixes_it(bad_dataset):
    message = bad_dataset[2].loc["no_mpp", "message"]
    for part in ("openslide.mpp-x", "tiff.XResolution/tiff.ResolutionUnit", "mpp_overrides", "'slide,mpp'",
                 "'no_mpp.tif,0.25'"):
        assert part in message, (part, message)
    # The slide has no objective power: mpp_from_objective would fail the same way.
    assert "objective" not in message, message


def test_no_mpp_offers_the_objective_power_only_when_the_slide_has_one():
    from pipeline.tiling.slide import level0_mpp
    from pipeline.tiling.failures import TilingError

    with pytest.raises(TilingError, match=r"mpp_from_objective: true .* 20x = 0.5 um/px") as raised:
        level0_mpp({"openslide.objective-power": "20"}, DEMO_SLIDE, make_spec())
    assert "'cmu_small_region.svs,0.5'" in str(raised.value)
    with pytest.raises(TilingError, match=r"openslide.objective-power \(absent\)") as raised:
        level0_mpp({}, DEMO_SLIDE, make_spec(mpp_from_objective=True))
    assert "set mpp_from_objective" not in str(raised.value)


@pytest.mark.parametrize("table, detail", [
    (None, "does not exist"),
    ("name,um\nno_mpp.tif,0.25\n", "needs columns 'slide' and 'mpp'"),
    ("slide,mpp\nno_mpp.tif,quarter\n", "line 2: mpp 'quarter' is not a number"),
])
def test_an_unusable_override_table_is_a_typed_failure_naming_it(bad_dataset, tmp_path, table, detail):
    spec, _, _, _ = bad_dataset
    csv_path = tmp_path / "mpp overrides.csv"
    if table is not None:
        csv_path.write_text(table)
    broken = make_spec(name="broken", inputs={name: spec.inputs[name] for name in ("good", "no_mpp")},
                       mpp_overrides=str(csv_path))
    tile_dataset(broken, tmp_path / "out")
    status = pd.read_csv(tmp_path / "out" / "status.tsv", sep="\t").set_index("input_id")
    for input_id in ("good", "no_mpp"):  # the table might have corrected the good slide too
        row = status.loc[input_id]
        assert (row.status, row.reason) == ("error", "bad_mpp_overrides"), row.message
        assert f"the mpp_overrides table {csv_path}" in row.message and detail in row.message
        assert spec.inputs[input_id] in row.message


def test_objective_power_only_when_opted_in(tmp_path):
    from pipeline.tiling.slide import level0_mpp
    from pipeline.tiling.failures import TilingError

    properties = {"openslide.objective-power": "20"}
    with pytest.raises(TilingError, match="no_mpp"):
        level0_mpp(properties, DEMO_SLIDE, make_spec())
    assert level0_mpp(properties, DEMO_SLIDE, make_spec(mpp_from_objective=True)) == (0.5, "objective_power")


def test_an_unforeseen_reader_error_is_recorded_not_raised(tmp_path):
    from pipeline.tiling.outputs import tile_input

    def broken_reader(path, spec):
        raise RuntimeError("decoder exploded")

    status = tile_input(make_spec(), "x", DEMO_SLIDE, tmp_path / "x", broken_reader)
    assert (status["status"], status["reason"]) == ("error", "unexpected_error")
    assert "RuntimeError: decoder exploded" in status["message"] and str(DEMO_SLIDE) in status["message"]
    assert pd.read_parquet(tmp_path / "x" / "manifest.parquet").empty


# input id -> (vendor OpenSlide reports, largest mean absolute difference from the source pixels)
SOURCE_PIXELS = {"aperio_jp2k_rgb": ("aperio", 0.0), "aperio_jp2k_ycbcr": ("aperio", 3.0),
                 "dicom_wsi": ("dicom", 5.0), "two_scenes": ("generic-tiff", 0.0)}


@pytest.mark.parametrize("input_id", sorted(SOURCE_PIXELS))
def test_patches_come_from_the_main_image_only(bad_dataset, he_image, input_id):
    """JPEG 2000 and DICOM tiles decode to the slide's pixels; label, macro, thumbnail and a second
    scene (other H&E, which would pass the tissue filter) never become patches."""
    _, out, table, _ = bad_dataset
    vendor, tolerance = SOURCE_PIXELS[input_id]
    row = table.loc[input_id]
    assert (row.vendor, row.level0_mpp, row.width, row.height) == (vendor, 0.5, 1000, 1000)
    samples = read_shards(out / "inputs" / input_id)
    assert 0 < len(samples) <= row.grid_cols * row.grid_rows == 9
    for sample in samples:
        meta = json.loads(sample["json"])
        assert meta["read_size"] == 256 and meta["read_level"] == 0
        expected = he_image[meta["y"]:meta["y"] + 256, meta["x"]:meta["x"] + 256].astype(float)
        assert np.abs(decode(sample["png"]).astype(float) - expected).mean() <= tolerance, meta


def test_associated_images_exist_and_are_not_tiled(bad_dataset):
    spec, _, table, _ = bad_dataset
    for input_id in ("aperio_jp2k_rgb", "good"):  # the demo SVS has a label, a macro and a thumbnail
        with openslide.OpenSlide(spec.inputs[input_id]) as slide:
            assert {"label", "macro", "thumbnail"} <= set(slide.associated_images)
            width, height = slide.dimensions
        row = table.loc[input_id]
        assert (row.width, row.height) == (width, height)
        assert row.patch_count <= (width // row.read_size) * (height // row.read_size)
