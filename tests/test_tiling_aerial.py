"""Aerial GeoTIFF tiling on real imagery: resampling, exact copies, band order, nodata, bad inputs."""

from __future__ import annotations

import io
import json
import math
import tarfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import rasterio
from PIL import Image
from affine import Affine
from rasterio.enums import ColorInterp, MaskFlags, Resampling
from rasterio.warp import calculate_default_transform, reproject
from rasterio.warp import transform as transform_points
from rasterio.windows import Window

from pipeline.config import DatasetSpec
from pipeline.tiling.aerial import open_aerial_source
from pipeline.tiling.outputs import tile_input

AERIAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "aerial"
COG = AERIAL / "aerial_rgb_0.6m_cogeo.tif"  # EPSG:3857, 0.597 m, 1024x1024, RGB
NAIP = AERIAL / "m_4709963_se_14_1_20190904.tif"  # EPSG:26914, 5 m, 934x723, R,G,B,NIR, nodata 0
PATCH = 256


@pytest.fixture(scope="module", autouse=True)
def aerial_data() -> None:
    if not (COG.is_file() and NAIP.is_file()):
        pytest.fail(f"real aerial test data missing under {AERIAL} (../shared/data next to the repo)")


def aerial_spec(**changes) -> DatasetSpec:
    values = dict(name="aerial", kind="aerial", inputs={}, target_mpp=1.0, patch_size=PATCH,
                  tissue_threshold=0.5, mpp_overrides=None, mpp_from_objective=False, bands=(1, 2, 3),
                  max_nodata_fraction=0.05, max_upsample=1.5, image_format="png", jpeg_quality=95,
                  patches_per_shard=2000)
    values.update(changes)
    return DatasetSpec(**values)


def read_samples(folder: Path) -> dict[str, tuple[np.ndarray, dict]]:
    """{key: (rgb, json meta)} from every shard of an input folder, read with tarfile."""
    images: dict[str, np.ndarray] = {}
    metas: dict[str, dict] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                if ext == "json":
                    metas[key] = json.loads(data)
                else:
                    images[key] = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert images.keys() == metas.keys()
    return {key: (images[key], metas[key]) for key in metas}


def tile(path: Path, out: Path, **spec_changes) -> tuple[dict, pd.DataFrame, dict]:
    spec = aerial_spec(**spec_changes)
    status = tile_input(spec, out.name, path, out, open_aerial_source)
    return status, pd.read_parquet(out / "manifest.parquet"), read_samples(out)


def by_position(samples: dict) -> dict[tuple[int, int], tuple[np.ndarray, dict]]:
    return {(meta["col"], meta["row"]): (rgb, meta) for rgb, meta in samples.values()}


def copy_with(path: Path, source: Path, pixels: np.ndarray | None = None, **profile_changes) -> Path:
    """Write ``pixels`` (default: the source's own) with the source's profile, changed as given.

    Tagged gray/undefined like NAIP (GDAL would tag a 4-band uint8 copy R,G,B,alpha)."""
    with rasterio.open(source) as src:
        profile = {**src.profile, "photometric": "minisblack"}
        data = src.read() if pixels is None else pixels
    profile.update(count=data.shape[0], height=data.shape[1], width=data.shape[2], dtype=data.dtype.name,
                   **profile_changes)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(data)
    return path


def centre_latitude(path: Path) -> float:
    with rasterio.open(path) as src:
        x, y = src.xy(src.height / 2, src.width / 2)
        return transform_points(src.crs, "EPSG:4326", [x], [y])[1][0]


def test_cog_in_web_mercator_is_tiled_on_a_ground_grid(tmp_path):
    """EPSG:3857 map units are 1 / cos(latitude) ground metres: at the COG's 37.7 N a map unit is
    0.79 m, so 0.6 m tiles read 1.27x (not 1.005x) the source's 0.597-unit pixels."""
    latitude = centre_latitude(COG)
    assert latitude == pytest.approx(37.6686, abs=1e-3)
    status, manifest, samples = tile(COG, tmp_path / "cog", target_mpp=0.6)
    with rasterio.open(COG) as src:
        map_units = src.res[0]
        ground_gsd = map_units * math.cos(math.radians(latitude))  # spherical Web Mercator
        read_size = PATCH * 0.6 / ground_gsd
        left, top = src.transform.c, src.transform.f
        assert status["status"] == "done", status
        assert status["crs"] == "EPSG:3857" and status["gsd"] == 0.6
        assert status["map_units_per_px"] == pytest.approx(0.5971640348434448)
        # Measured on the WGS 84 ellipsoid: within 0.2 % of the spherical cos(latitude).
        assert status["ground_scale"] == pytest.approx(math.cos(math.radians(latitude)), rel=2e-3)
        assert status["source_gsd"] == pytest.approx(ground_gsd, rel=2e-3)
        assert status["read_size"] == pytest.approx(read_size, rel=0.01)
        cols = math.floor(src.width / status["read_size"])
        assert (status["grid_cols"], status["grid_rows"]) == (cols, cols) == (3, 3)
        assert len(samples) == len(manifest) == 9
        for (col, row), (rgb, meta) in by_position(samples).items():
            assert rgb.shape == (PATCH, PATCH, 3) and rgb.dtype == np.uint8
            assert meta["crs"] == "EPSG:3857" and meta["gsd"] == 0.6 and meta["bands"] == [1, 2, 3]
            assert meta["source_gsd"] == status["source_gsd"] and meta["ground_scale"] == status["ground_scale"]
            assert meta["read_size"] == pytest.approx(read_size, rel=0.01)
            assert meta["x"] == pytest.approx(col * meta["read_size"])
            a, b, c, d, e, f = meta["transform"]
            # A target pixel is 0.6 ground metres: 0.6 / cos(latitude) map units.
            assert (a, -e) == pytest.approx((0.6 / math.cos(math.radians(latitude)),) * 2, rel=0.01)
            assert (b, d) == (0.0, 0.0)
            assert (c, f) == pytest.approx((left + col * PATCH * a, top + row * PATCH * e))
            assert meta["bounds"] == pytest.approx([c, f + PATCH * e, c + PATCH * a, f])
            assert meta["nodata_fraction"] == 0.0
            window = Window(meta["x"], meta["y"], PATCH * a / map_units, PATCH * -e / map_units)
            expected = src.read((1, 2, 3), window=window, out_shape=(3, PATCH, PATCH),
                                resampling=Resampling.average).transpose(1, 2, 0)
            assert np.abs(rgb.astype(float) - expected).mean() < 1.0
    with Image.open(tmp_path / "cog" / "thumbnail.jpg") as thumbnail:
        assert max(thumbnail.size) <= 1024 and thumbnail.mode == "RGB"


def reprojected(source: Path, crs: str, path: Path) -> Path:
    """``source`` warped to ``crs`` (bilinear, about as many pixels), tagged gray like NAIP."""
    with rasterio.open(source) as src:
        affine, width, height = calculate_default_transform(src.crs, crs, src.width, src.height, *src.bounds)
        profile = {**src.profile, "crs": crs, "transform": affine, "width": width, "height": height,
                   "photometric": "minisblack"}
        with rasterio.open(path, "w", **profile) as dst:
            for band in range(1, src.count + 1):
                reproject(rasterio.band(src, band), rasterio.band(dst, band), resampling=Resampling.bilinear)
    return path


@pytest.fixture(scope="module")
def naip_in_web_mercator(tmp_path_factory) -> Path:
    """The NAIP tile (EPSG:26914, true 5 m) reprojected to EPSG:3857: at 47.0 N, 7.33 map units/px."""
    return reprojected(NAIP, "EPSG:3857", tmp_path_factory.mktemp("mercator") / "naip_3857.tif")


def ground_sides(meta: dict, crs: str) -> tuple[float, float]:
    """Ground length in metres of a tile's top and left edges, measured in UTM (EPSG:26914)."""
    a, b, c, d, e, f = meta["transform"]
    xs, ys = transform_points(crs, "EPSG:26914", [c, c + PATCH * a, c + PATCH * b],
                              [f, f + PATCH * d, f + PATCH * e])
    return math.dist((xs[0], ys[0]), (xs[1], ys[1])), math.dist((xs[0], ys[0]), (xs[2], ys[2]))


def test_the_same_ground_in_utm_and_web_mercator_gives_the_same_grid(tmp_path, naip_in_web_mercator):
    utm_status, _, utm = tile(NAIP, tmp_path / "utm", target_mpp=5.0)
    merc_status, _, merc = tile(naip_in_web_mercator, tmp_path / "merc", target_mpp=5.0)
    assert utm_status["status"] == merc_status["status"] == "done"
    assert merc_status["map_units_per_px"] == pytest.approx(7.33, abs=0.01)
    assert merc_status["source_gsd"] == pytest.approx(5.0, rel=0.01)
    assert (merc_status["grid_cols"], merc_status["grid_rows"]) == (utm_status["grid_cols"], utm_status["grid_rows"])
    for samples, crs in ((utm, "EPSG:26914"), (merc, "EPSG:3857")):
        for _, meta in samples.values():
            assert ground_sides(meta, crs) == pytest.approx((PATCH * 5.0, PATCH * 5.0), rel=0.01), (crs, meta)
    utm_tiles = by_position(utm)
    for position, (rgb, _) in by_position(merc).items():  # the same ground, resampled twice
        assert np.abs(rgb.astype(float) - utm_tiles[position][0]).mean() < 8, position


def test_naip_at_native_gsd_is_copied_exactly_in_band_order(tmp_path):
    status, manifest, samples = tile(NAIP, tmp_path / "rgb", target_mpp=5.0)
    _, _, false_colour = tile(NAIP, tmp_path / "nir", target_mpp=5.0, bands=(4, 1, 2))
    assert status["status"] == "done" and status["crs"] == "EPSG:26914"
    assert (status["grid_cols"], status["grid_rows"], status["band_count"]) == (3, 2, 4)
    assert len(samples) == len(false_colour) == len(manifest) == 6
    assert list(manifest["crs"].unique()) == ["EPSG:26914"]
    false_by_position = by_position(false_colour)
    with rasterio.open(NAIP) as src:
        raw = src.read()  # bands x rows x cols
    for (col, row), (rgb, meta) in by_position(samples).items():
        x, y = int(meta["x"]), int(meta["y"])
        assert (x, y) == (meta["x"], meta["y"]) == (col * PATCH, row * PATCH)
        window = raw[:, y:y + PATCH, x:x + PATCH]
        np.testing.assert_array_equal(rgb, window[[0, 1, 2]].transpose(1, 2, 0))
        assert meta["transform"] == [5.0, 0.0, 485899.0 + x * 5.0, 0.0, -5.0, 5209246.0 - y * 5.0]
        nir_rgb, nir_meta = false_by_position[(col, row)]
        assert nir_meta["bands"] == [4, 1, 2]
        np.testing.assert_array_equal(nir_rgb[..., 0], window[3])
        np.testing.assert_array_equal(nir_rgb[..., 1:], window[[0, 1]].transpose(1, 2, 0))


@pytest.fixture(scope="module")
def naip_with_hole(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """The NAIP tile with a 400x400 block set to its nodata value (0) in every band."""
    with rasterio.open(NAIP) as src:
        pixels = src.read()
    pixels[:, 100:500, 100:500] = 0
    path = copy_with(tmp_path_factory.mktemp("hole") / "naip_hole.tif", NAIP, pixels)
    return path, (pixels[:3] == 0).all(axis=0)


@pytest.mark.parametrize("max_nodata", [0.05, 0.5])
def test_nodata_tiles_are_dropped_and_fractions_recorded(tmp_path, naip_with_hole, max_nodata):
    path, nodata = naip_with_hole
    status, manifest, samples = tile(path, tmp_path / "hole", target_mpp=5.0, max_nodata_fraction=max_nodata)
    expected = {(col, row): float(nodata[row * PATCH:(row + 1) * PATCH, col * PATCH:(col + 1) * PATCH].mean())
                for row in range(2) for col in range(3)}
    kept = {position for position, fraction in expected.items() if fraction <= max_nodata}
    assert any(fraction > 0.9 for fraction in expected.values())  # the hole really hides whole tiles
    assert status["status"] == "done"
    found = by_position(samples)
    assert set(found) == kept and len(manifest) == len(kept)
    for position, (rgb, meta) in found.items():
        assert meta["nodata_fraction"] == pytest.approx(expected[position], abs=1e-6)
    assert manifest.set_index(["col", "row"])["nodata_fraction"].to_dict() == pytest.approx(
        {position: expected[position] for position in kept}, abs=1e-6)
    if max_nodata == 0.5:  # a partly masked tile is kept, its masked pixels are 0
        assert 0 < expected[(0, 0)] <= 0.5 and (0, 0) in found
        tile_nodata = nodata[:PATCH, :PATCH]
        assert not found[(0, 0)][0][tile_nodata].any()


def test_upsampling_is_refused_unless_opted_in(tmp_path):
    """5 m NAIP at 1 m would be 5x interpolated patches: refused by default (max_upsample 1.5)."""
    status, manifest, samples = tile(NAIP, tmp_path / "refused", target_mpp=1.0)
    assert (status["status"], status["reason"]) == ("error", "would_upsample")
    assert manifest.empty and not samples
    message = status["message"]
    for part in (NAIP.name, "5 m/px", "1 m/px", "5x", "max_upsample = 1.5", "max_upsample: 5", "3.333 m/px"):
        assert part in message, (part, message)
    at_the_limit = open_aerial_source(NAIP, aerial_spec(target_mpp=5.0 / 1.5))
    opted_in = open_aerial_source(NAIP, aerial_spec(target_mpp=1.0, max_upsample=5.0))
    try:
        assert (opted_in.cols, opted_in.rows) == (934 * 5 // PATCH, 723 * 5 // PATCH)
    finally:
        at_the_limit.close()
        opted_in.close()


def test_enlarging_uses_smooth_resampling(tmp_path):
    status, _, samples = tile(NAIP, tmp_path / "fine", target_mpp=2.5, max_upsample=2.0)
    assert status["status"] == "done" and (status["grid_cols"], status["grid_rows"]) == (7, 5)
    assert len(samples) == 35
    with rasterio.open(NAIP) as src:
        for rgb, meta in samples.values():
            assert meta["read_size"] == 128.0 and meta["transform"][0] == 2.5
            expected = src.read((1, 2, 3), window=Window(meta["x"], meta["y"], 128, 128),
                                out_shape=(3, PATCH, PATCH), resampling=Resampling.bilinear).transpose(1, 2, 0)
            assert np.abs(rgb.astype(float) - expected).mean() < 1.0
            assert np.abs(np.diff(rgb.astype(int), axis=1)).mean() < 6  # smooth, not pixel-doubled blocks


def test_one_read_per_tile_row(monkeypatch):
    source = open_aerial_source(NAIP, aerial_spec(target_mpp=2.5, max_upsample=2.0))
    reads = []
    read = source.dataset.read
    monkeypatch.setattr(source.dataset, "read", lambda *a, **k: reads.append(k["window"]) or read(*a, **k),
                        raising=False)
    try:
        count = sum(1 for _ in source.patches())
    finally:
        source.close()
    assert count == 35 and len(reads) == source.rows == 5
    assert all(window.width == 7 * 128 and window.height == 128 for window in reads)


def test_alpha_masks_unless_it_is_a_configured_band(tmp_path):
    """No nodata, band 4 tagged alpha (as GDAL tags a 4-band copy): alpha masks the RGB bands,
    but when band 4 is asked for as a colour it is data, never a mask."""
    with rasterio.open(NAIP) as src:
        pixels = src.read()
    pixels[3, :, :300] = 0  # "transparent" over the first column of tiles and 44 px of the next
    path = copy_with(tmp_path / "rgba.tif", NAIP, pixels, nodata=None)
    with rasterio.open(path, "r+") as tagged:
        tagged.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue, ColorInterp.alpha]
    with rasterio.open(path) as check:
        assert check.colorinterp[3] == ColorInterp.alpha and MaskFlags.alpha in check.mask_flag_enums[0]
    _, _, rgb = tile(path, tmp_path / "rgb", target_mpp=5.0, max_nodata_fraction=0.2)
    _, _, false_colour = tile(path, tmp_path / "nir", target_mpp=5.0, bands=(4, 1, 2))
    kept = by_position(rgb)
    assert {col for col, _ in kept} == {1, 2}
    partly_masked, meta = kept[(1, 0)]
    assert meta["nodata_fraction"] == pytest.approx(44 / PATCH)
    assert not partly_masked[:, :44].any() and partly_masked[:, 44:].all(axis=2).mean() > 0.9  # masked -> 0
    assert len(false_colour) == 6
    assert not by_position(false_colour)[(0, 0)][0][..., 0].any()  # band 4 kept as data: all 0 there


def from_origin(west: float, north: float, size_x: float, size_y: float) -> Affine:
    """North-up geotransform (rasterio's own helper warns about affine's deprecated ``*``)."""
    return Affine(size_x, 0.0, west, 0.0, -size_y, north)


def write_geotiff(path: Path, pixels: np.ndarray, crs: str | None, transform) -> Path:
    profile = dict(driver="GTiff", count=pixels.shape[0], height=pixels.shape[1], width=pixels.shape[2],
                   dtype=pixels.dtype.name, crs=crs, transform=transform)
    with rasterio.open(path, "w", **profile) as dst:
        dst.write(pixels)
    return path


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory) -> tuple[Path, dict[str, tuple[Path, dict]]]:
    """Each case: (path, spec changes); real NAIP pixels wherever a readable image is needed."""
    folder = tmp_path_factory.mktemp("bad")
    with rasterio.open(NAIP) as src:
        rgb = src.read((1, 2, 3), window=Window(0, 0, 600, 520))
    (folder / "empty.tif").write_bytes(b"")
    (folder / "text.tif").write_text("this is a text file, not a GeoTIFF\n")
    data = NAIP.read_bytes()
    (folder / "truncated.tif").write_bytes(data[: len(data) * 6 // 10])
    utm = from_origin(485899.0, 5209246.0, 5.0, 5.0)
    cases = {
        "missing": (folder / "missing.tif", {}),
        "empty": (folder / "empty.tif", {}),
        "text": (folder / "text.tif", {}),
        "degrees": (write_geotiff(folder / "degrees.tif", rgb, "EPSG:4326", from_origin(-99.2, 47.0, 5e-5, 5e-5)), {}),
        "float": (write_geotiff(folder / "float.tif", rgb.astype(np.float32), "EPSG:26914", utm), {}),
        "no_crs": (write_geotiff(folder / "no_crs.tif", rgb, None, utm), {}),
        "tiny": (write_geotiff(folder / "tiny.tif", rgb[:, :200, :200], "EPSG:26914", utm), {}),
        "five_bands": (NAIP, {"bands": (1, 2, 5)}),
        "truncated": (folder / "truncated.tif", {}),
        # World Equidistant Cylindrical: metres along the meridians, 1 / cos(47 N) = 1.47 map units
        # per ground metre along the parallels, and no correction known for it.
        "plate_carree": (reprojected(NAIP, "EPSG:4087", folder / "plate_carree.tif"), {}),
        "all_nodata": (copy_with(folder / "all_nodata.tif", NAIP, np.zeros((4, 723, 934), np.uint8)), {}),
        "good": (NAIP, {}),
    }
    return folder, cases


BAD_EXPECTED = {
    "missing": {"not_found"}, "empty": {"empty_file"}, "text": {"open_failed"}, "degrees": {"crs_in_degrees"},
    "float": {"unsupported_dtype"}, "no_crs": {"no_crs"}, "tiny": {"too_small"},
    "five_bands": {"unsupported_bands"}, "truncated": {"open_failed", "read_failed"},
    "plate_carree": {"crs_not_ground_metres"}, "all_nodata": {"no_tissue"},
}


def test_bad_inputs_fail_with_typed_reasons_and_others_complete(tmp_path, bad_inputs):
    _, cases = bad_inputs
    statuses = {}
    for name, (path, changes) in cases.items():  # one after another, like a dataset run
        out = tmp_path / name
        statuses[name] = tile_input(aerial_spec(target_mpp=5.0, **changes), name, path, out, open_aerial_source)
        if name in BAD_EXPECTED:
            assert statuses[name]["status"] == "error", (name, statuses[name])
            assert statuses[name]["reason"] in BAD_EXPECTED[name], (name, statuses[name])
            assert path.name in statuses[name]["message"]
            assert pd.read_parquet(out / "manifest.parquet").empty
            assert not list(out.glob("*.tar"))
            assert (out / "thumbnail.jpg").exists() == (name == "all_nodata")  # no_tissue shows why
    assert statuses["good"]["status"] == "done" and statuses["good"]["patch_count"] == 6
    assert "[1, 2, 5]" in statuses["five_bands"]["message"] and "4 band" in statuses["five_bands"]["message"]
    assert "EPSG:4087" in statuses["plate_carree"]["message"] and "reproject" in statuses["plate_carree"]["message"]
    # What was read before the failure is recorded.
    assert {name: statuses["float"][name] for name in ("width", "height", "band_count", "dtype", "crs")} == {
        "width": 600, "height": 520, "band_count": 3, "dtype": "float32", "crs": "EPSG:26914"}
    tiny = statuses["tiny"]
    assert (tiny["width"], tiny["height"], tiny["band_count"], tiny["dtype"], tiny["crs"]) == (
        200, 200, 3, "uint8", "EPSG:26914")
    assert (tiny["source_gsd"], tiny["read_size"], tiny["grid_cols"], tiny["grid_rows"]) == (5.0, 256.0, 0, 0)
    assert statuses["no_crs"]["crs"] is None and statuses["no_crs"]["width"] == 600
    assert statuses["plate_carree"]["map_units_per_px"] > 0 and "ground_scale" not in statuses["plate_carree"]


def test_feet_crs_is_converted_to_metres(tmp_path):
    """A CRS in US survey feet: the grid is still in metres, the transform in feet."""
    foot = 0.30480060960121924
    with rasterio.open(NAIP) as src:
        rgb = src.read((1, 2, 3))
    path = write_geotiff(tmp_path / "feet.tif", rgb, "EPSG:2263", from_origin(1e6, 2e5, 5 / foot, 5 / foot))
    status, _, samples = tile(path, tmp_path / "feet", target_mpp=5.0)
    assert status["status"] == "done" and status["source_gsd"] == pytest.approx(5.0)
    second_tile, meta = by_position(samples)[(1, 0)]
    assert meta["transform"][0] == pytest.approx(5 / foot)
    assert meta["transform"][2] == pytest.approx(1e6 + PATCH * 5 / foot)
    np.testing.assert_array_equal(second_tile, rgb[:, :PATCH, PATCH:2 * PATCH].transpose(1, 2, 0))


@pytest.mark.parametrize("source, changes", [(COG, {"target_mpp": 1.0, "image_format": "jpg"}),
                                             (NAIP, {"target_mpp": 5.0, "patches_per_shard": 4})])
def test_tiling_twice_gives_identical_shards(tmp_path, source, changes):
    for run in ("first", "second"):
        status = tile_input(aerial_spec(**changes), "same", source, tmp_path / run, open_aerial_source)
        assert status["status"] == "done"
    first = sorted(p.name for p in (tmp_path / "first").glob("*.tar"))
    assert first and first == sorted(p.name for p in (tmp_path / "second").glob("*.tar"))
    for name in first:
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "first" / "manifest.parquet"),
                                  pd.read_parquet(tmp_path / "second" / "manifest.parquet"))
