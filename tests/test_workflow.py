"""The Snakemake workflow: lint, the stage list, and a real run of the tiling stage."""

from __future__ import annotations

import base64
import html
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree

import openslide
import pandas as pd
import pytest
import yaml

from helpers import DEMO_SLIDE, REPO, pipeline_env, read_shards

SNAKEMAKE = [sys.executable, "-m", "snakemake", "--snakefile", str(REPO / "Snakefile")]

pytestmark = pytest.mark.workflow


def run_snakemake(*args, cwd=REPO):
    return subprocess.run([*SNAKEMAKE, *args], cwd=cwd, capture_output=True, text=True)


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


def test_demo_chain_runs_through_sampling(tmp_path):
    """tile -> embed -> latents -> train -> export -> sample, large_image -> evaluate -> report on the
    demo config, shortened; then `snakemake --report`."""
    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    config["output_dir"] = "out"
    config["datasets"]["demo_he_20x"]["inputs"] = [str(DEMO_SLIDE)]
    config["datasets"]["demo_he_20x"]["tissue_threshold"] = 0.9  # fewer patches: a faster test
    config["embedding"].update(device="cpu", num_workers=0)
    config["latents"].update(device="cpu", num_workers=0)
    config["training"].update(max_steps=12, checkpoint_every=6, log_every=3)
    config["autoencoder"].update(max_steps=20, checkpoint_every=10, log_every=5)
    config["sampling"].update(steps=4, device="cpu")
    config["large_image"].update(k=2, regions=2, steps=4, device="cpu")
    config["prior"].update(crop=2, layers=1, max_steps=12, checkpoint_every=6, log_every=3)
    config["generate"].update(rows=3, cols=3, steps=4, prior_steps=4, device="cpu")
    config["evaluation"].update(device="cpu", num_workers=0, prior_grids=16, prior_steps=4)
    # decode windows without overlap: the whole slide's overlapped decode is most of the chain's time
    config["synthesize_slide"].update(steps=2, decode_stride=16, device="cpu")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = run_snakemake("--cores", "2", "--configfile", str(tmp_path / "config.yaml"),
                           "--directory", str(tmp_path), "autoencoder", "train", "embed", "sample", "large_image",
                           "prior", "generate", "synthesize", "evaluate", "report", "viewer")
    assert result.returncode == 0, result.stderr[-3000:]
    tiles = pd.read_parquet(tmp_path / "out/tiles/demo_he_20x/inputs/cmu_small_region/manifest.parquet")
    embedded = pd.read_parquet(tmp_path / "out/embeddings/demo_he_20x/inputs/cmu_small_region/manifest.parquet")
    assert list(embedded.key) == list(tiles.key) and len(embedded) > 0
    sample = read_shards(tmp_path / "out/embeddings/demo_he_20x/inputs/cmu_small_region")[0]
    assert "hipt_vit_s16.npy" in sample
    assert "RANDOM weights" in (tmp_path / "out/logs/embed/demo_he_20x/cmu_small_region.log").read_text()
    latents = read_shards(tmp_path / "out/latents/demo_he_20x/inputs/cmu_small_region")
    assert [s["__key__"] for s in latents] == list(tiles.key)
    assert {"latent.npy", "latent_hflip.npy", "hipt_vit_s16.npy"} <= set(latents[0])
    from pipeline.models import load_pipeline

    model = load_pipeline(tmp_path / "out/models/demo_he_20x")
    record = json.loads((tmp_path / "out/models/demo_he_20x/model_index.json").read_text())
    assert record["provenance"]["training"]["global_step"] == 12 and record["embedding_key"] == "hipt_vit_s16"
    # the demo's autoencoder is trained on its patches: recorded as such, no longer a random part
    autoencoder = record["provenance"]["autoencoder"]
    assert autoencoder["random_weights"] is False and autoencoder["kind"] == "kl"
    assert autoencoder["trained"] == {**autoencoder["trained"], "dataset": "demo_he_20x", "steps": 20}
    from pipeline.autoencoder import read_autoencoder_metrics

    metrics = read_autoencoder_metrics(tmp_path / "out/autoencoder/demo_he_20x")
    assert metrics.steps == 20 and metrics.heldout_patches > 0 and metrics.latent_shape == (3, 16, 16)
    assert "autoencoder demo_he_20x: step 20/20 (100 %)" in (tmp_path / "out/logs/autoencoder/demo_he_20x.log").read_text()
    assert record["provenance"]["encoder"] == {"name": "hipt_vit_s16", "weights_sha256": "random",
                                               "random_weights": True}
    assert record["provenance"]["random_weights"] == ["conditioning encoder hipt_vit_s16"]
    sample_record = json.loads((tmp_path / "out/samples/demo_he_20x/sample.json").read_text())
    assert sample_record["random_parts"] == ["conditioning encoder hipt_vit_s16"]
    # the training log: progress lines, each Lightning line once, no advertisement
    training_log = (tmp_path / "out/logs/train/demo_he_20x.log").read_text()
    assert "demo_he_20x: step 12/12 (100 %)" in training_log
    assert training_log.count("GPU available") == 1
    for noise in ("Tip:", "weights_only", "LeafSpec", "\r"):
        assert noise not in training_log, noise
    assert model.unet.config.sample_size == 16
    check_plain_diffusers_load(tmp_path / "out/models/demo_he_20x", tmp_path)

    # held-out patches: never trained on, each conditions one generated patch
    from pipeline.splits import is_held_out

    held_out = [key for key in tiles.key if is_held_out(key, 0.2)]
    samples = pd.read_parquet(tmp_path / "out/samples/demo_he_20x/manifest.parquet")
    assert list(samples.key) == held_out and len(held_out) > 0
    assert all((tmp_path / "out/samples/demo_he_20x" / path).is_file() for path in samples.generated)
    large = pd.read_parquet(tmp_path / "out/large_images/demo_he_20x/manifest.parquet")
    assert len(large) == 2 and set(large.width) == {512}
    for tif in large.generated_tif:
        with openslide.OpenSlide(tmp_path / "out/large_images/demo_he_20x" / tif) as slide:
            assert slide.dimensions == (512, 512) and float(slide.properties["openslide.mpp-x"]) == 0.5

    # the viewer: a page per region, with both pyramids to full resolution (512 px: level 9)
    viewer = (tmp_path / "out/viewer/index.html").read_text()
    for region in large.region:
        assert f'href="demo_he_20x/{region}/index.html"' in viewer
        for image in ("generated", "reference"):
            assert (tmp_path / f"out/viewer/demo_he_20x/{region}/{image}_files/9/2_2.jpeg").is_file()

    # evaluation: the demo's random HIPT encoder as feature extractor, so fd_/kd_ names, never fid
    metrics = json.loads((tmp_path / "out/evaluation/demo_he_20x/metrics.json").read_text())
    by_name = {m["name"]: m for m in metrics["metrics"]}
    assert {"fd_hipt_vit_s16", "kd_hipt_vit_s16", "embedding_cosine", "crop_fd_hipt_vit_s16",
            "crop_embedding_cosine"} <= set(by_name)
    assert not any(name in ("fid", "kid") or name.startswith(("fid", "crop_fid")) for name in by_name)
    assert by_name["fd_hipt_vit_s16"]["samples"] == {"generated": len(held_out), "real": len(held_out)}
    assert by_name["crop_fd_hipt_vit_s16"]["samples"] == {"generated": 8, "real": 8}  # 2 regions of 2x2
    assert by_name["fd_hipt_vit_s16"]["feature_extractor"]["random_weights"] is True
    assert metrics["inputs"]["large_images"] == "out/large_images/demo_he_20x"
    # the prior: trained, rendered without a reference, measured against real grids and the control
    from pipeline.prior.outputs import read_prior_record
    from pipeline.sampling.outputs import read_generated_images

    assert read_prior_record(tmp_path / "out/prior/demo_he_20x").steps == 12
    (image,) = read_generated_images(tmp_path / "out/generated/demo_he_20x").images
    assert image.grid.shape[:2] == (3, 3) and image.tissue.any()
    assert {"prior_fd", "prior_fd_real_floor", "prior_fd_shuffled", "prior_neighbour_cosine_shuffled"} <= set(by_name)
    # the whole slide re-synthesised from its own embedding grid, at the dataset's um/px
    from pipeline.sampling.slide import read_slide_record

    synthetic = tmp_path / "out/synthetic/demo_he_20x/cmu_small_region"
    slide_record = read_slide_record(synthetic)
    assert slide_record["tissue_cells"] == len(embedded) and slide_record["steps"] == 2
    with openslide.OpenSlide(synthetic / "slide.tif") as slide:
        assert slide.dimensions == (slide_record["width"], slide_record["height"])
        assert float(slide.properties["openslide.mpp-x"]) == 0.5

    # the report: one self-contained HTML file with every section, caption and asset
    report = tmp_path / "report.html"
    result = run_snakemake("--configfile", str(tmp_path / "config.yaml"), "--directory", str(tmp_path),
                           "--report", str(report))
    assert result.returncode == 0, result.stderr[-3000:]
    text = report.read_text()
    assert "system-message" not in text  # no reStructuredText error in any caption
    for expected in ("1. Overview", "2. Inputs and tissue", "3. Training", "4. Patches: real vs generated",
                     "5. Large images", "6. Metrics",  # categories
                     "summary.html", "slides.html", "thumbnails.jpg", "loss.svg", "sample_pairs.jpg",
                     "large_images.jpg", "generated.jpg", "metrics.html",  # assets
                     "Deep-zoom viewer", "out/viewer/index.html",  # the link to the viewer
                     "Demo run: random weights", "Overview of dataset", "Inputs of dataset", "Tissue-mask thumbnails",
                     "Training loss of the latent diffusion model", "on the right the patch the model generated",
                     "Large images of", "Reference-free images of", "Evaluation metrics of",
                     "Random weights (demo)"):  # captions
        assert expected in text, expected
    assets = {match.group(1): base64.b64decode(match.group(2)) for match in
              re.finditer(r"filename=([\w.]+);base64,([A-Za-z0-9+/=]+)", text)}
    assert "fd_hipt_vit_s16" in assets["metrics.html"].decode() and b"RANDOM WEIGHTS" in assets["metrics.html"]
    for page in (assets["metrics.html"], assets["summary.html"]):  # every random part, named
        text = html.unescape(page.decode())
        assert "the conditioning encoder hipt_vit_s16" in text and "the diffusion model's autoencoder" not in text
    assert b"cmu_small_region.svs" in assets["slides.html"]
    assert ElementTree.fromstring(assets["loss.svg"]).tag == "{http://www.w3.org/2000/svg}svg"  # matplotlib's SVG
    assert all(assets[name][:3] == b"\xff\xd8\xff" for name in ("thumbnails.jpg", "sample_pairs.jpg",
                                                                  "large_images.jpg", "generated.jpg"))
    assert "embedding-grid prior" in assets["metrics.html"].decode()


PLAIN_DIFFUSERS = """
import sys
import numpy as np
from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained(sys.argv[1], custom_pipeline=sys.argv[2], trust_remote_code=True,
                                         local_files_only=True, low_cpu_mem_usage=False)
embedding = np.random.default_rng(0).standard_normal((1, pipe.condition.config.patch_embed_dim)).astype("float32")
images = pipe(embedding, num_inference_steps=3).images
print(type(pipe).__name__, "x".join(map(str, images.shape)), images.dtype, int(images.std() > 0))
"""


def check_plain_diffusers_load(export, tmp_path):
    """The export loads in a fresh process with plain diffusers (the class named by a file path) and
    samples a patch."""
    from pipeline.models import diffusion_pipeline

    env = {**pipeline_env(), "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "hf_modules")}
    env.pop("PYTHONPATH")  # only the installed package: what a user has
    result = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(export), diffusion_pipeline.__file__],
                            capture_output=True, text=True, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-4:] == ["RLDiffPipeline", "1x256x256x3", "uint8", "1"]


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
