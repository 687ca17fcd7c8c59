"""The demo's whole chain through the Snakemake workflow (the longest test: a file of its own so
that the parallel test run can give it a worker while the others share the second)."""

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

from helpers import DEMO_SLIDE, REPO, pipeline_env, read_shards, run_snakemake

pytestmark = pytest.mark.workflow


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
