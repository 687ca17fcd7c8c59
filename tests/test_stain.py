"""The stain stage's own logic, without tiatoolbox (tests/test_stain_tiatoolbox.py runs the real one
in its environment): background detection, the target's typed errors, the shards it writes, resume,
the config key, the before | after sheet and the environment's location."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers import REPO, SHARED_DATA, decode, pipeline_env, read_shards, write_tiled_input
from pipeline.config import ConfigError, DatasetSpec, prepare_config
from pipeline.stain import environment
from pipeline.stain.normalize import (FittedNormalizer, StainTargetError, load_target, read_rgb, stain_input,
                                      stained_fraction)
from pipeline.stain.outputs import read_stain_manifest, read_stain_status
from pipeline.stain.settings import StainSettings
from pipeline.stain.sheet import before_after_sheet

PATCHES = SHARED_DATA / "he_patches_256"
TARGET = SHARED_DATA / "he_images" / "tiatoolbox_target_image.png"


def near_white(level: int, seed: int = 0) -> np.ndarray:
    noise = np.random.default_rng(seed).normal(0, 3, (256, 256, 3))
    return np.clip(level + noise, 0, 255).astype(np.uint8)


def real_patches(count: int | None = None) -> list[tuple[str, np.ndarray]]:
    files = sorted(PATCHES.glob("*.png"))[:count]
    return [(path.stem.replace("_", "-"), np.asarray(Image.open(path).convert("RGB"))) for path in files]


class Darken:
    """A stand-in normaliser: halves every pixel; fails on patches whose top-left pixel is pure red."""

    calls = 0

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        Darken.calls += 1
        if tuple(rgb[0, 0]) == (255, 0, 0):
            raise ValueError("Empty tissue mask computed.")
        return (rgb // 2).astype(np.uint8)


def fake_normalizer() -> FittedNormalizer:
    return FittedNormalizer("macenko", Darken(), {"stain_matrix": [[0.6, 0.7, 0.3], [0.1, 0.8, 0.5]]}, "test")


def test_stained_fraction_separates_tissue_from_background(shared_data):
    fractions = {key: stained_fraction(rgb) for key, rgb in real_patches()}
    assert len(fractions) == 22 and min(fractions.values()) > 0.75, fractions  # all real tissue
    for level in (255, 245, 235):  # glass and near-white background (tiling keeps >= 220 as white)
        assert stained_fraction(near_white(level)) == 0.0
    assert stained_fraction(np.zeros((8, 8, 3), np.uint8)) == 1.0


def test_target_errors_name_the_target(tmp_path, shared_data):
    with pytest.raises(StainTargetError, match=f"{tmp_path / 'gone.png'}: the stain target does not exist"):
        load_target(tmp_path / "gone.png", 0.1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(StainTargetError, match="holds no image"):
        load_target(tmp_path / "empty", 0.1)
    Image.fromarray(near_white(240)).save(tmp_path / "white.png")
    with pytest.raises(StainTargetError, match=rf"{tmp_path / 'white.png'}: only 0.0% of the stain target's pixels"):
        load_target(tmp_path / "white.png", 0.1)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(StainTargetError, match="broken.png: cannot read the stain target image"):
        load_target(tmp_path / "broken.png", 0.1)
    pixels, sha = load_target(TARGET, 0.1)
    assert pixels.shape == (1000, 1000, 3) and len(sha) == 64
    # a folder of patches: all their pixels, one hash over names and contents
    folder_pixels, folder_sha = load_target(PATCHES, 0.1)
    assert folder_pixels.shape == (22 * 256 * 256, 1, 3) and folder_sha != sha


def test_transparent_pixels_become_white(tmp_path):
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:2, :, 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    rgb = read_rgb(tmp_path / "a.png")
    assert (rgb[:2] == (200, 0, 0)).all() and (rgb[2:] == 255).all()


def tiled(tmp_path: Path, name: str = "tiles") -> tuple[Path, list[tuple[str, np.ndarray]]]:
    red = np.full((256, 256, 3), (255, 0, 0), np.uint8)
    red[1:] = real_patches(1)[0][1][1:]  # tissue, but the stand-in normaliser refuses it
    images = real_patches(5) + [("white", near_white(250)), ("glass", near_white(238, 1)), ("odd", red)]
    return write_tiled_input(tmp_path / name, images, per_shard=3), images


def test_stage_writes_the_same_keys_with_normalised_images_and_counts(tmp_path, shared_data):
    tiles, images = tiled(tmp_path)
    settings = StainSettings(method="macenko", target=str(TARGET))
    status = stain_input(tiles, tmp_path / "stain" / "in1", settings, normalizer=fake_normalizer())
    out = tmp_path / "stain" / "in1"
    assert sorted(p.name for p in out.iterdir()) == ["manifest.parquet", "patches-000000.tar", "patches-000001.tar",
                                                     "patches-000002.tar", "stain.json"]
    assert [p.name for p in (tmp_path / "stain").iterdir()] == ["in1"]  # the hidden build folder is gone
    before, after = read_shards(tiles), read_shards(out)
    assert [s["__key__"] for s in after] == [s["__key__"] for s in before] == [key for key, _ in images]
    for old, new in zip(before, after):
        meta, new_meta = json.loads(old["json"]), json.loads(new["json"])
        stain = new_meta.pop("stain")
        assert new_meta == meta  # tiling's JSON, plus the stain record
        assert stain["method"] == "macenko" and stain["target_sha256"] == status["target_sha256"]
        assert stain["stain_matrix"] == [[0.6, 0.7, 0.3], [0.1, 0.8, 0.5]]
        if old["__key__"] in ("white", "glass", "odd"):
            assert new["png"] == old["png"] and not stain["normalized"]  # the very bytes
        else:
            assert stain["normalized"] and (decode(new["png"]) == decode(old["png"]) // 2).all()
    assert {s["__key__"]: json.loads(s["json"])["stain"]["skipped"] for s in after}["odd"] == "estimation_failed"
    assert (status["patch_count"], status["normalized"]) == (8, 5)
    assert status["passed_through"] == {"background": 2, "estimation_failed": 1} == read_stain_status(out)["passed_through"]
    manifest = read_stain_manifest(out)
    tiles_manifest = pd.read_parquet(tiles / "manifest.parquet")
    assert list(manifest.key) == list(tiles_manifest.key) and list(manifest.shard) == list(tiles_manifest.shard)
    assert list(manifest.stain_skipped) == [""] * 5 + ["background", "background", "estimation_failed"]
    assert set(manifest.stain_target_sha256) == {status["target_sha256"]}

    # same inputs, same bytes
    stain_input(tiles, tmp_path / "again" / "in1", settings, normalizer=fake_normalizer())
    for name in ("patches-000000.tar", "patches-000001.tar", "patches-000002.tar", "manifest.parquet"):
        assert (out / name).read_bytes() == (tmp_path / "again" / "in1" / name).read_bytes(), name


def test_a_killed_run_resumes_and_other_settings_start_afresh(tmp_path, shared_data, monkeypatch):
    tiles, _ = tiled(tmp_path)
    settings = StainSettings(method="macenko", target=str(TARGET))
    complete = tmp_path / "complete" / "in1"
    stain_input(tiles, complete, settings, normalizer=fake_normalizer())

    import pipeline.stain.normalize as normalize

    original, shards_done = normalize.stain_shard, []

    def stop_after_one(*args, **kwargs):
        if shards_done:
            raise KeyboardInterrupt  # a kill, as far as this process can tell
        shards_done.append(original(*args, **kwargs))
        return shards_done[-1]

    monkeypatch.setattr(normalize, "stain_shard", stop_after_one)
    out = tmp_path / "stain" / "in1"
    with pytest.raises(KeyboardInterrupt):
        stain_input(tiles, out, settings, normalizer=fake_normalizer())
    assert not out.exists()
    (partial,) = (tmp_path / "stain").iterdir()
    assert partial.name.startswith(".in1.partial-") and [p.name for p in partial.glob("*.tar")] == ["patches-000000.tar"]
    monkeypatch.setattr(normalize, "stain_shard", original)
    Darken.calls = 0
    stain_input(tiles, out, settings, normalizer=fake_normalizer())
    assert Darken.calls == 3  # the 3 tissue patches of shards 1 and 2 (shard 0 was done; white ones are skipped)
    for name in ("patches-000000.tar", "patches-000001.tar", "patches-000002.tar", "manifest.parquet"):
        assert (out / name).read_bytes() == (complete / name).read_bytes(), name

    # a build folder of other settings is never resumed: it is removed
    stale = tmp_path / "stain" / ".in1.partial-000000000000"
    stale.mkdir()
    (stale / "patches-000000.tar").write_bytes(b"other settings")
    stain_input(tiles, out, StainSettings(method="macenko", target=str(TARGET), min_stained_fraction=0.2),
                normalizer=fake_normalizer())
    assert [p.name for p in (tmp_path / "stain").iterdir()] == ["in1"]
    assert (out / "patches-000000.tar").read_bytes() != b"other settings"


def test_the_command_names_a_target_without_tissue(tmp_path, shared_data):
    tiles, _ = tiled(tmp_path)
    Image.fromarray(near_white(245)).save(tmp_path / "blank.png")
    settings = json.dumps({"method": "macenko", "target": str(tmp_path / "blank.png")})
    result = subprocess.run([sys.executable, "-m", "pipeline", "stain-input", "--tiles", str(tiles), "--out",
                             str(tmp_path / "out"), "--settings", settings, "--jpeg-quality", "95"],
                            capture_output=True, text=True, env=pipeline_env())
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'blank.png'}: only 0.0% of the")
    assert not (tmp_path / "out").exists()


def test_the_sheet_shows_before_and_after(tmp_path, shared_data):
    tiles, _ = tiled(tmp_path)
    stain_input(tiles, tmp_path / "stain" / "in1", StainSettings(method="macenko", target=str(TARGET)),
                normalizer=fake_normalizer())
    assert before_after_sheet(tiles, tmp_path / "stain" / "in1", tmp_path / "sheet.jpg", "demo", pairs=4) == 4
    sheet = np.asarray(Image.open(tmp_path / "sheet.jpg"))
    assert sheet.shape[1] == 4 * (2 * 192 + 4 + 12) + 12
    assert before_after_sheet(tiles, "", tmp_path / "none.jpg", "demo") == 0
    assert Image.open(tmp_path / "none.jpg").size[1] > 40


def demo_config(tmp_path: Path, **stain) -> dict:
    return {"datasets": {"d": {"kind": "wsi", "inputs": [str(REPO / "demo_data/cmu_small_region.svs")],
                               "resolution": "20x", **({"stain_normalization": stain} if stain else {})}}}


def test_the_config_key(tmp_path, shared_data):
    (tmp_path / "targets").mkdir()
    Image.open(TARGET).save(tmp_path / "targets" / "t.png")
    specs = prepare_config(demo_config(tmp_path, method="vahadane", target="targets/t.png"), tmp_path)
    assert specs["d"].stain_normalization == {"method": "vahadane", "target": str(tmp_path / "targets" / "t.png"),
                                              "min_stained_fraction": 0.1}
    assert DatasetSpec.from_json(specs["d"].to_json()) == specs["d"]
    assert specs["d"].only("cmu_small_region").stain_normalization is None  # re-tiling does not depend on it
    off = prepare_config(demo_config(tmp_path), tmp_path)["d"]
    assert off.stain_normalization is None and "stain_normalization" not in json.loads(off.to_json())
    with pytest.raises(ConfigError, match=r"datasets.d.stain_normalization.target: .*gone.png does not exist"):
        prepare_config(demo_config(tmp_path, method="macenko", target="gone.png"), tmp_path)
    with pytest.raises(ConfigError, match=r"datasets.d.stain_normalization.method: 'staintools' is not one of"):
        prepare_config(demo_config(tmp_path, method="staintools", target="targets/t.png"), tmp_path)
    with pytest.raises(ConfigError, match=r"datasets.d.stain_normalization: 'target' is a required property"):
        prepare_config(demo_config(tmp_path, method="macenko"), tmp_path)
    aerial = demo_config(tmp_path, method="macenko", target="targets/t.png")
    aerial["datasets"]["d"].update(kind="aerial", resolution=1.0)
    with pytest.raises(ConfigError, match="stain normalisation is for H&E slides"):
        prepare_config(aerial, tmp_path)


def test_the_environment_lives_outside_the_checkout_keyed_by_its_pins(tmp_path, monkeypatch):
    monkeypatch.setenv(environment.ENV_DIR_VARIABLE, str(tmp_path / "envs"))
    folder = environment.environment_dir()
    assert folder.parent == tmp_path / "envs" and folder.name == f"tiatoolbox-{environment.environment_key()}"
    assert not environment.is_ready(folder)
    folder.mkdir(parents=True)
    (folder / "bin").mkdir()
    (folder / "bin" / "python").touch()
    (folder / environment.READY_MARKER).write_text(json.dumps({"key": "an older lock"}))
    assert not environment.is_ready(folder)  # a marker of other pins is not this environment
    (folder / environment.READY_MARKER).write_text(json.dumps({"key": environment.environment_key()}))
    assert environment.is_ready(folder) and environment.ensure_environment(say=pytest.fail) == folder
    lock = environment.LOCK_FILE.read_text()
    assert "tiatoolbox==" in lock and "\ntorch" not in lock
