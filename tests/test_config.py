"""Configuration: schema validation with defaults, magnification aliases, input naming."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import REPO, pipeline_env
from pipeline.config import ConfigError, input_id, load_config, resolution_to_mpp, validate_config

DEMO = yaml.safe_load((REPO / "workflow_config.yaml").read_text())


def test_demo_config_is_valid_and_resolved(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # relative paths are the config file's, wherever it runs
    config, specs = load_config(REPO / "workflow_config.yaml")
    spec = specs["demo_he_20x"]
    assert spec.kind == "wsi" and spec.target_mpp == 0.5 and spec.patch_size == 256
    assert spec.inputs == {"cmu_small_region": str(REPO / "demo_data/cmu_small_region.svs")}
    assert Path(spec.inputs["cmu_small_region"]).is_file()
    # defaults filled in from the schema
    assert spec.image_format == "jpg" and spec.bands == (1, 2, 3) and config["seed"] == 0
    assert spec.max_upsample == 1.5 and config["large_image"]["jpeg_quality"] == 95


@pytest.mark.parametrize("label, mpp", [("20x", 0.5), ("5x", 2.0), ("40X", 0.25), ("10x", 1.0), (0.25, 0.25)])
def test_magnification_aliases(label, mpp):
    assert resolution_to_mpp(label, "wsi") == pytest.approx(mpp)


def test_magnification_is_not_for_aerial():
    with pytest.raises(ConfigError, match="metres per pixel"):
        resolution_to_mpp("20x", "aerial")


@pytest.mark.parametrize("change, message", [
    (lambda c: c["datasets"]["demo_he_20x"].update(tisue_threshold=0.3), r"datasets\.demo_he_20x: .*'tisue_threshold'"),
    (lambda c: c["datasets"]["demo_he_20x"].update(patch_size="big"), r"datasets\.demo_he_20x\.patch_size: 'big' is not of type 'integer'"),
    (lambda c: c["datasets"]["demo_he_20x"].update(kind="photo"), r"datasets\.demo_he_20x\.kind"),
    (lambda c: c["datasets"]["demo_he_20x"].update(resolution="twenty"), r"datasets\.demo_he_20x\.resolution"),
    (lambda c: c["datasets"]["demo_he_20x"].pop("inputs"), r"'inputs' is a required property"),
    (lambda c: c.update(output="x"), r"<top level>: .*'output' was unexpected"),
    (lambda c: c["datasets"].update({"bad.name": c["datasets"]["demo_he_20x"]}), r"bad\.name"),
])
def test_bad_config_names_the_key(change, message):
    config = copy.deepcopy(DEMO)
    change(config)
    with pytest.raises(ConfigError, match=message):
        validate_config(config)


def test_snakemake_validation_uses_the_same_schema():
    from snakemake.exceptions import WorkflowError
    from snakemake.utils import validate

    from pipeline.config import schema_path

    config = copy.deepcopy(DEMO)
    validate(config, str(schema_path()))
    config["datasets"]["demo_he_20x"]["tisue_threshold"] = 0.3
    with pytest.raises(WorkflowError, match="tisue_threshold"):
        validate(config, str(schema_path()))


@pytest.mark.parametrize("name, ident", [
    ("TCGA-A1-A0SB-01Z-00-DX1.B34C267B-CAAA-4AB6-AD5C-276C26F997A1.svs",
     "TCGA-A1-A0SB-01Z-00-DX1-B34C267B-CAAA-4AB6-AD5C-276C26F997A1"),
    ("my slide (1).ndpi", "my-slide-1"),
    ("schnitt_ä_ö.tif", "schnitt_a_o"),
    ("image.ome.tiff", "image"),
])
def test_input_ids_are_safe_sample_keys(name, ident):
    assert input_id(Path(name)) == ident


def test_inputs_whose_ids_collide_are_rejected(tmp_path, monkeypatch):
    (tmp_path / "a.b.svs").write_bytes(b"x")
    (tmp_path / "a-b.svs").write_bytes(b"x")
    config = copy.deepcopy(DEMO)
    config["datasets"]["demo_he_20x"]["inputs"] = ["*.svs"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="share the identifier 'a-b'"):
        load_config(tmp_path / "c.yaml")


def test_glob_matching_nothing_is_an_error(tmp_path, monkeypatch):
    config = copy.deepcopy(DEMO)
    config["datasets"]["demo_he_20x"]["inputs"] = ["nowhere/*.svs"]
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"datasets\.demo_he_20x\.inputs: pattern 'nowhere/\*\.svs' matches no file"):
        load_config(tmp_path / "c.yaml")


def test_schema_encoder_names_are_the_registry():
    from pipeline.config import load_schema
    from pipeline.embedding.encoders import ENCODERS

    assert set(load_schema()["$defs"]["encoder_name"]["enum"]) == set(ENCODERS)


def test_dataset_encoder_needs_weights_settings():
    config = copy.deepcopy(DEMO)
    config["encoders"] = {}
    with pytest.raises(ConfigError, match=r"datasets\.demo_he_20x\.encoders: 'hipt_vit_s16' has no entry"):
        from pipeline.config import resolve_datasets
        resolve_datasets(validate_config(config), REPO)


# --- what validate-config checks up front -------------------------------------------------------------


def user_config(tmp_path: Path, **changes) -> Path:
    """A config of one's own: a dataset of the real demo slide, real-looking weight files."""
    (tmp_path / "weights").mkdir(exist_ok=True)
    (tmp_path / "weights" / "vit256_small_dino.pth").write_bytes(b"not read by validation")
    config = {"datasets": {"mine": {"kind": "wsi", "inputs": [str(REPO / "demo_data" / "cmu_small_region.svs")],
                                    "resolution": "20x", "encoders": ["hipt_vit_s16"]}},
              "encoders": {"hipt_vit_s16": {"weights": "../weights/vit256_small_dino.pth"}},
              "latents": {"autoencoder": {"kind": "lid", "path": str(LID_FIXTURE)}},
              "evaluation": {"feature_extractor": "hipt_vit_s16"}}
    for key, value in changes.items():
        table = config
        *path, last = key.split(".")
        for part in path:
            table = table.setdefault(part, {})
        table[last] = value
    path = tmp_path / "conf" / "mine.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(yaml.safe_dump(config))
    return path


LID_FIXTURE = REPO.parent / "shared" / "fixtures" / "seed_ldm_tiny"


def test_relative_paths_are_the_config_files(tmp_path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "mpp.csv").write_text("slide,mpp\ncmu_small_region.svs,0.5\n")
    path = user_config(tmp_path, **{"datasets.mine.mpp_overrides": "mpp.csv",
                                    "encoders.hipt_vit_s16.weights": "../weights/vit256_small_dino.pth"})
    monkeypatch.chdir(REPO)  # not the config's folder
    config, specs = load_config(path)
    assert specs["mine"].mpp_overrides == str(tmp_path / "conf" / "mpp.csv")
    assert Path(config["encoders"]["hipt_vit_s16"]["weights"]).resolve() == tmp_path / "weights" / "vit256_small_dino.pth"


@pytest.mark.parametrize("changes, message", [
    ({"encoders.hipt_vit_s16.weights": None},
     r"encoders\.hipt_vit_s16\.weights: no weights for hipt_vit_s16; .*allow_random_weights: true"),
    ({"encoders.hipt_vit_s16.weights": "weights/gone.pth"},
     r"encoders\.hipt_vit_s16\.weights: .*/conf/weights/gone\.pth does not exist"),
    ({"datasets.mine.mpp_overrides": "mpp.csv"}, r"datasets\.mine\.mpp_overrides: .*/conf/mpp\.csv does not exist"),
    ({"latents.autoencoder.path": None}, r"latents\.autoencoder\.path: kind 'lid' needs the path"),
    ({"latents.autoencoder.path": "releases/brca"}, r"latents\.autoencoder\.path: .*/conf/releases/brca does not exist"),
    ({"latents.autoencoder": {"kind": "random"}}, r"latents\.autoencoder\.kind: 'random' gives latents"),
    ({"training.init_from": "nothing"}, r"training\.init_from: .*/conf/nothing does not exist or is not a folder"),
    ({"evaluation.feature_extractor": "uni"}, r"evaluation\.feature_extractor: 'uni' has no entry under `encoders:`"),
])
def test_files_a_stage_would_miss_are_named_up_front(tmp_path, changes, message):
    path = user_config(tmp_path, **changes)
    with pytest.raises(ConfigError, match=message):
        load_config(path)
    result = subprocess.run([sys.executable, "-m", "pipeline", "validate-config", str(path)], capture_output=True,
                            text=True, env=pipeline_env())
    assert result.returncode == 2 and re.search(message, result.stderr) and "Traceback" not in result.stderr


def test_validate_config_lists_every_problem_at_once(tmp_path):
    path = user_config(tmp_path, **{"encoders.hipt_vit_s16.weights": None, "latents.autoencoder.path": None})
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert "encoders.hipt_vit_s16.weights" in str(error.value) and "latents.autoencoder.path" in str(error.value)


def test_a_valid_config_of_ones_own_and_the_units(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline", "validate-config", str(user_config(tmp_path))],
                            capture_output=True, text=True, env=pipeline_env())
    assert result.returncode == 0, result.stderr
    assert "mine: wsi, 1 inputs, 0.5 um/px" in result.stdout


@pytest.mark.parametrize("key, old, new", [
    ("latents.autoencoder.kind", "seed", "lid"), ("training.preset", "seed", "lid"),
    ("large_image.mode", "seed", "lid"), ("large_image.sampler", "seed_ddim", "lid_ddim"),
])
def test_old_spellings_still_work_with_a_warning_naming_the_new_one(key, old, new):
    config = copy.deepcopy(DEMO)
    table = config
    *path, last = key.split(".")
    for part in path:
        table = table.setdefault(part, {})
    table[last] = old
    with pytest.warns(FutureWarning, match=rf"{re.escape(key)}: '{old}' is deprecated .*; write '{new}'"):
        validate_config(config)
    assert table[last] == new


def test_tile_command_names_an_unknown_dataset(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pipeline", "tile", str(REPO / "workflow_config.yaml"),
                             "--dataset", "nosuch"], capture_output=True, text=True, env=pipeline_env(), cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "no dataset 'nosuch' under `datasets:`; it has demo_he_20x" in result.stderr
