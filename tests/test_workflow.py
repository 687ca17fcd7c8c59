"""The Snakemake workflow: lint, the stage list, config checks and real runs of single stages (the
whole demo chain: test_workflow_demo.py)."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from helpers import DEMO_SLIDE, REPO, read_shards, run_snakemake

pytestmark = pytest.mark.workflow


def test_lint_passes():
    result = run_snakemake("--lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_dry_run_lists_the_stages(tmp_path):
    result = run_snakemake("-n", "--cores", "1", "--directory", str(tmp_path))
    assert result.returncode == 0, result.stderr
    # embed_input and latents_input jobs exist only for inputs that kept patches: they are planned
    # once the tile_dataset checkpoint has run.
    assert "DAG of jobs will be updated after completion" in result.stdout
    for rule in ("tile_input", "tile_dataset", "embed_dataset", "train_autoencoder", "train_dataset", "export_model",
                 "train_prior", "sample_dataset", "large_image_dataset", "generate_dataset", "evaluate_dataset", "report_tiling", "report_dataset",
                 "viewer_site", "all"):
        assert rule in result.stdout
    targeted = run_snakemake("-n", "--cores", "1", "tile")
    assert targeted.returncode == 0 and "tile_dataset" in targeted.stdout
    for target, rule in (("evaluate", "evaluate_dataset"), ("report", "report_dataset")):
        targeted = run_snakemake("-n", "--cores", "1", target)
        assert targeted.returncode == 0 and rule in targeted.stdout, targeted.stderr[-3000:]


def test_bad_config_stops_with_the_key_named(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump({"datasets": {"d": {"kind": "wsi", "inputs": [str(DEMO_SLIDE)],
                                                         "resolution": "20x", "tisue_threshold": 0.3}}}))
    result = run_snakemake("-n", "--configfile", str(config), "--directory", str(tmp_path))
    assert result.returncode != 0
    assert "datasets.d: Additional properties are not allowed ('tisue_threshold' was unexpected)" in (
        result.stdout + result.stderr)


def test_tile_target_runs_and_records_a_missing_slide(tmp_path, shared_data):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"output_dir": "out", "datasets": {
        "demo": {"kind": "wsi", "resolution": "20x",
                 "inputs": [str(DEMO_SLIDE), str(tmp_path / "gone slide é.svs")]},
        "naip": {"kind": "aerial", "resolution": 5.0, "bands": [1, 2, 3],
                 "inputs": [str(shared_data / "aerial" / "m_4709963_se_14_1_2019*.tif")]}}}))
    result = run_snakemake("--cores", "2", "--configfile", str(config), "--directory", str(tmp_path), "tile")
    assert result.returncode == 0, result.stderr[-3000:]
    status = pd.read_csv(tmp_path / "out/tiles/demo/status.tsv", sep="\t").set_index("input_id")
    assert status.loc["cmu_small_region", "status"] == "done"
    assert (status.loc["gone-slide-e", "status"], status.loc["gone-slide-e", "reason"]) == ("error", "not_found")
    index = pd.read_parquet(tmp_path / "out/tiles/demo/manifest.parquet")
    samples = read_shards(tmp_path / "out/tiles/demo/inputs/cmu_small_region")
    assert len(index) == len(samples) == status.loc["cmu_small_region", "patch_count"] > 0
    assert "FAILED gone slide é.svs: not_found" in (tmp_path / "out/logs/tile/demo/summary.log").read_text()
    aerial = pd.read_csv(tmp_path / "out/tiles/naip/status.tsv", sep="\t")
    assert list(aerial.status) == ["done"] and aerial.crs[0] == "EPSG:26914"
    assert aerial.patch_count[0] == len(pd.read_parquet(tmp_path / "out/tiles/naip/manifest.parquet")) > 0


def test_cli_validate_config_reports_errors(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("datasets: {d: {kind: wsi, inputs: [x.svs], resolution: fast}}\n")
    result = subprocess.run([sys.executable, "-m", "pipeline", "validate-config", str(config)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert "datasets.d.resolution" in result.stderr


def test_a_config_of_ones_own_replaces_the_demo(tmp_path):
    """No demo dataset, no random weights, no demo settings: only what the user's config says (and
    the schema's defaults). Targets go before --configfile, which takes several files."""
    from test_config import user_config

    config, run = user_config(tmp_path), tmp_path / "run"
    tiled = run_snakemake("tile", "--cores", "2", "--configfile", str(config), "--directory", str(run))
    assert tiled.returncode == 0, tiled.stderr[-3000:]
    assert sorted(p.name for p in (run / "results" / "tiles").iterdir()) == ["mine"]
    plan = run_snakemake("-n", "-p", "--cores", "2", "--configfile", str(config), "--directory", str(run))
    assert plan.returncode == 0, plan.stderr[-3000:]
    text = plan.stdout + plan.stderr
    assert "embed_input" in text and "latents_input" in text and "train_dataset" in text
    assert "demo_he_20x" not in text and "cmu_small_region" in text
    for demo_only in ('"allow_random_weights": true', '"kind": "random"', "RANDOM", '"max_steps": 300'):
        assert demo_only not in text, demo_only
    assert '"max_steps": 100000' in text  # the schema's default, not the demo's 300

    demo = run_snakemake("-n", "--cores", "1", "--directory", str(tmp_path / "demo"))
    assert (demo.stdout + demo.stderr).count("RANDOM weights") == 1


def test_an_input_without_patches_gets_no_embedding_job(tmp_path):
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    config["datasets"]["demo_he_20x"]["inputs"] = [str(DEMO_SLIDE), str(tmp_path / "gone.svs")]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    args = ("--cores", "2", "--configfile", str(tmp_path / "config.yaml"), "--directory", str(tmp_path))
    assert run_snakemake("tile", *args).returncode == 0
    plan = run_snakemake("embed", "-n", "-p", *args)
    assert plan.returncode == 0, plan.stderr[-3000:]
    jobs = re.findall(r"embed-input --tiles \S*?/inputs/([\w-]+)", plan.stdout)
    assert jobs == ["cmu_small_region"]  # not `gone`, which tiling recorded as not_found


@pytest.mark.stain
def test_stain_normalisation_feeds_the_embedding(tmp_path, shared_data):
    """With `stain_normalization` on, the demo slide is tiled, normalised in tiatoolbox's own
    environment (the rule builds it on first use) and embedded from the normalised patches; the
    report's before | after sheet is built."""
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    dataset = config["datasets"]["demo_he_20x"]
    dataset.update(inputs=[str(DEMO_SLIDE)], tissue_threshold=0.9, stain_normalization={
        "method": "macenko", "target": str(shared_data / "he_images" / "tiatoolbox_target_image.png")})
    config["embedding"].update(device="cpu", num_workers=0)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    args = ("--cores", "2", "--configfile", str(tmp_path / "config.yaml"), "--directory", str(tmp_path))
    result = run_snakemake("embed", "results/report/demo_he_20x/stain.jpg", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / "results"
    tiles, stain = out / "tiles/demo_he_20x/inputs/cmu_small_region", out / "stain/demo_he_20x/inputs/cmu_small_region"
    status = json.loads((stain / "stain.json").read_text())
    assert status["method"] == "macenko" and status["normalized"] + sum(status["passed_through"].values()) == \
        status["patch_count"] == len(read_shards(tiles)) > 0
    embedded = read_shards(out / "embeddings/demo_he_20x/inputs/cmu_small_region")
    for tiled, normalised, sample in zip(read_shards(tiles), read_shards(stain), embedded):
        assert tiled["__key__"] == normalised["__key__"] == sample["__key__"]
        assert sample["jpg"] == normalised["jpg"]  # what was embedded: the normalised patch
        assert (sample["jpg"] != tiled["jpg"]) == json.loads(sample["json"])["stain"]["normalized"]
    assert "hipt_vit_s16.npy" in embedded[0]
    assert (out / "report/demo_he_20x/stain.jpg").read_bytes()[:3] == b"\xff\xd8\xff"
    assert "patches, " in (out / "logs/stain/demo_he_20x/cmu_small_region.log").read_text()
