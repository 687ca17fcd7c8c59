"""Configuration: schema validation with defaults, magnification aliases, input naming."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from helpers import REPO
from pipeline.config import ConfigError, input_id, load_config, resolution_to_mpp, validate_config

DEMO = yaml.safe_load((REPO / "workflow_config.yaml").read_text())


def test_demo_config_is_valid_and_resolved(monkeypatch):
    monkeypatch.chdir(REPO)
    config, specs = load_config(REPO / "workflow_config.yaml")
    spec = specs["demo_he_20x"]
    assert spec.kind == "wsi" and spec.target_mpp == 0.5 and spec.patch_size == 256
    assert spec.inputs == {"cmu_small_region": "demo_data/cmu_small_region.svs"}
    assert Path(REPO / spec.inputs["cmu_small_region"]).is_file()
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
