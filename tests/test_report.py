"""Report assets (pipeline/reporting/) on small stage outputs made here, and the captions they go with.

The stage outputs are made as the stages write them (docs/data_contract.md), because the assets
read them with the stages' own readers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from helpers import REPO, pipeline_env
from pipeline.errors import StageOutputError
from pipeline.io.images import read_image
from pipeline.io.large_image_files import write_png, write_pyramid_tiff
from pipeline.io.sheets import pair_sheet
from pipeline.reporting import random_weight_models
from pipeline.reporting.assets import ReportInputError, build_assets
from pipeline.reporting.charts import loss_curve
from pipeline.reporting.large_images import large_image_sheet
from pipeline.reporting.metrics import metrics_table
from pipeline.reporting.samples import sample_pairs
from pipeline.reporting.summary import summary_page
from pipeline.reporting.tiling import slides_table, thumbnail_sheet
from pipeline.tiling.failures import Reason
from pipeline.training.outputs import read_training_log


@pytest.fixture(scope="module")
def patches(shared_data) -> list[np.ndarray]:
    files = sorted((shared_data / "he_patches_256").glob("*.png"))[:4]
    return [np.asarray(Image.open(f).convert("RGB")) for f in files]


def make_tiles(folder: Path, thumbnail: np.ndarray) -> Path:
    """A tiling folder: one slide done (with its QC image), one missing."""
    tiles = folder / "tiles"
    (tiles / "inputs" / "slide-a").mkdir(parents=True)
    Image.fromarray(thumbnail).save(tiles / "inputs" / "slide-a" / "thumbnail.jpg")
    (tiles / "inputs" / "gone").mkdir()
    pd.DataFrame([
        {"input_id": "slide-a", "source": "slide a.svs", "status": "done", "reason": None, "patch_count": 5,
         "message": None, "kind": "wsi", "level0_mpp": 0.2527, "mpp_source": "openslide_mpp", "width": 4000,
         "height": 3000},
        {"input_id": "gone", "source": "gone.svs", "status": "error", "reason": "not_found", "patch_count": 0,
         "message": "gone.svs: no such file", "kind": "wsi", "level0_mpp": None, "mpp_source": None, "width": None,
         "height": None},
    ]).to_csv(tiles / "status.tsv", sep="\t", index=False)
    return tiles


def make_training(folder: Path) -> Path:
    """A run restarted once: version_1 logs steps 20.. again after resuming from step 20."""
    run = folder / "training"
    for version, steps in ((0, range(9, 40, 10)), (1, range(29, 80, 10))):
        (run / "logs" / f"version_{version}").mkdir(parents=True)
        pd.DataFrame({"epoch": 0, "step": list(steps), "train/loss": [1.0 / (s + 1) + version * 1e-3 for s in steps],
                      "train/lr": 1e-3}).to_csv(run / "logs" / f"version_{version}" / "metrics.csv", index=False)
    (run / "done.json").write_text(json.dumps({"checkpoint": "x", "max_steps": 80}))
    return run


def make_samples(folder: Path, patches: list[np.ndarray], random_weights: bool) -> Path:
    samples = folder / "samples"
    (samples / "real").mkdir(parents=True)
    (samples / "generated").mkdir()
    rows = []
    for number, patch in enumerate(patches):
        key = f"slide-a_r{number:05d}_c00000"
        Image.fromarray(patch).save(samples / "real" / f"{key}.png")
        Image.fromarray(patch[::-1]).save(samples / "generated" / f"{key}.png")
        rows.append({"sample_id": key, "key": key, "real": f"real/{key}.png", "generated": f"generated/{key}.png"})
    pd.DataFrame(rows).to_parquet(samples / "manifest.parquet")
    np.save(samples / "conditions.npy", np.zeros((len(rows), 384), np.float32))
    (samples / "sample.json").write_text(json.dumps({
        "dataset": "d", "mpp": 0.5, "embedding_key": "hipt_vit_s16", "random_weights": random_weights,
        "samples": len(rows), "sampler": {"sampler": "plms", "steps": 50, "guidance_scale": 2.0}}))
    return samples


def make_large_images(folder: Path, patches: list[np.ndarray]) -> Path:
    """Two regions: one with PNGs, one with pyramidal TIFFs only."""
    large = folder / "large_images"
    image = np.concatenate([np.concatenate(patches[:2], axis=1), np.concatenate(patches[2:4], axis=1)], axis=0)
    rows = []
    for number, kind in enumerate(("png", "tif")):
        region = large / f"region-{number:03d}"
        region.mkdir(parents=True)
        np.save(region / "embeddings.npy", np.zeros((2, 2, 384), np.float32))
        if kind == "png":
            write_png(region / "reference.png", image)
            write_png(region / "generated.png", image[:, ::-1])
        else:
            write_pyramid_tiff(region / "reference.tif", image, 0.5)
            write_pyramid_tiff(region / "generated.tif", image[::-1], 0.5)
        rows.append({"region": region.name, "input_id": "slide-a", "col": 0, "row": 0, "k": 2, "width": 512,
                     "height": 512, "mode": "fast", "sampler": "dpmsolver++", "steps": 20, "guidance_scale": 4.0,
                     "mpp": 0.5, "seam_score": 1.01, "random_weights": False,
                     f"reference_{kind}": f"{region.name}/reference.{kind}",
                     f"generated_{kind}": f"{region.name}/generated.{kind}"})
    pd.DataFrame(rows).to_parquet(large / "manifest.parquet")
    return large


def metric(name: str, value: float, scope: str, extractor: str, random_weights: bool, **extra) -> dict:
    return {"name": name, "value": value, "scope": scope, "samples": {"generated": 4, "real": 4},
            "feature_extractor": {"name": extractor, "random_weights": random_weights, "dim": 384},
            "dataset": "d", "mpp": 0.5, "sampler": {"random_weights": False},
            "warnings": ["RANDOM weights"] if random_weights else [], **extra}


def make_metrics(folder: Path, random_weights: bool) -> Path:
    extractor = "hipt_vit_s16" if random_weights else "inception"
    distance = "fd_hipt_vit_s16" if random_weights else "fid"
    record = {"format": "rldiff-metrics/1", "settings": {"feature_extractor": extractor}, "metrics": [
        metric(distance, 12.5, "patches", extractor, random_weights),
        metric("embedding_cosine", 0.61, "patches", "hipt_vit_s16", random_weights, std=0.1, min=0.4, median=0.6,
               max=0.8),
        metric(f"crop_{distance}", float("nan"), "large_image_crops", extractor, random_weights, regions=2),
    ], "skipped": [{"name": "clip_fid", "reason": "CLIP weights not found"}]}
    path = folder / "metrics.json"
    path.write_text(json.dumps(record).replace("NaN", "null"))
    return path


def test_slides_table_names_failures_and_totals(tmp_path, patches):
    tiles = make_tiles(tmp_path, patches[0])
    table = slides_table(tiles, tmp_path / "slides.html", "d")
    text = (tmp_path / "slides.html").read_text()
    assert list(table.status) == ["done", "FAILED"] and list(table.patches) == [5, 0]
    assert "2 inputs: 1 tiled, 1 failed; 5 patches in total" in text
    assert "not_found: the file does not exist" in text and '<td class="failed">FAILED</td>' in text
    assert "4000 × 3000" in text and "slide a.svs" in text


def test_thumbnail_sheet_shows_every_input(tmp_path, patches):
    tiles = make_tiles(tmp_path, np.concatenate([patches[0], patches[1]], axis=1))
    assert thumbnail_sheet(tiles, tmp_path / "thumbs.jpg", "d", cell=200, per_row=4) == 2
    with Image.open(tmp_path / "thumbs.jpg") as sheet:
        assert sheet.format == "JPEG" and sheet.width == 2 * 210 + 10
        array = np.asarray(sheet.convert("RGB"))
    # the thumbnail (512 x 256, fitted to 200 x 100) is in the first cell; the failed input's is grey
    assert array[:, 10:210].std() > 20
    grey = (np.abs(array[:, 220:420].astype(int) - 225) < 6).all(axis=2)
    assert grey.sum() > 0.8 * 200 * 133 and (np.abs(array[:, 10:210].astype(int) - 225) < 6).all(axis=2).sum() < 500


def test_thumbnail_placeholder_says_why_there_is_none(tmp_path, patches, monkeypatch):
    from pipeline.reporting import tiling

    texts = []
    drawn = tiling.placeholder
    monkeypatch.setattr(tiling, "placeholder", lambda size, text: texts.append(text) or drawn(size, text))
    tiles = make_tiles(tmp_path, patches[0])
    thumbnail_sheet(tiles, tmp_path / "thumbs.jpg", "d", cell=200)
    assert texts == ["no thumbnail: not_found"]  # not "could not be read": the file does not exist


SVG = "{http://www.w3.org/2000/svg}"


def svg_groups(path: Path) -> dict[str, ElementTree.Element]:
    """matplotlib's SVG groups by the gid of the artist drawn in each."""
    return {g.get("id"): g for g in ElementTree.parse(path).getroot().iter(f"{SVG}g")}


def vertices(group: ElementTree.Element) -> int:
    """Vertices of the line a group draws (its first path: M x y L x y ...)."""
    return len(re.findall(r"[ML]\s*-?[\d.]+\s+-?[\d.]+", group.find(f"{SVG}path").get("d")))


def test_training_log_merges_restarts_and_the_svg_marks_them(tmp_path):
    run = make_training(tmp_path)
    log = read_training_log(run)
    assert list(log.steps) == [9, 19, 29, 39, 49, 59, 69, 79]
    assert log.versions[list(log.steps).index(29)] == 1  # logged again after the restart: the later value
    assert log.restarts == [29]
    loss_curve(run, tmp_path / "loss.svg", "d")
    groups = svg_groups(tmp_path / "loss.svg")
    assert vertices(groups["loss"]) == 8 and vertices(groups["learning-rate"]) == 8  # the two panels' lines
    assert "loss-moving-average" not in groups  # too few points to smooth
    restarts = [name for name in groups if name and name.startswith("restart-")]
    assert restarts == ["restart-0"]  # the one restart, dashed
    assert "stroke-dasharray" in groups["restart-0"].find(f"{SVG}path").get("style")
    text = (tmp_path / "loss.svg").read_text()
    assert "1 restart(s)" in text and "(log scale)" not in text  # 1/10 .. 1/80 spans less than 20x
    loss_curve(run, tmp_path / "again.svg", "d")
    assert (tmp_path / "again.svg").read_bytes() == (tmp_path / "loss.svg").read_bytes()  # no date, fixed ids


def test_loss_curve_uses_a_log_scale_and_a_moving_average_for_long_runs(tmp_path):
    run = tmp_path / "training"
    (run / "logs" / "version_0").mkdir(parents=True)
    steps = np.arange(9, 2000, 10)
    pd.DataFrame({"epoch": 0, "step": steps, "train/loss": 10.0 / (steps + 1), "train/lr": 1e-3}).to_csv(
        run / "logs" / "version_0" / "metrics.csv", index=False)
    loss_curve(run, tmp_path / "loss.svg", "d")
    groups = svg_groups(tmp_path / "loss.svg")
    assert vertices(groups["loss"]) == vertices(groups["loss-moving-average"]) == len(steps)
    assert "(log scale)" in (tmp_path / "loss.svg").read_text()


def test_loss_curve_without_a_log_says_so(tmp_path):
    loss_curve(tmp_path, tmp_path / "loss.svg", "d")
    assert "No training log found" in (tmp_path / "loss.svg").read_text()
    ElementTree.parse(tmp_path / "loss.svg")


def test_sample_pairs_put_real_next_to_generated(tmp_path, patches):
    samples = make_samples(tmp_path, patches, random_weights=False)
    assert sample_pairs(samples, tmp_path / "pairs.jpg", "d", per_row=2, side=128) == 4
    with Image.open(tmp_path / "pairs.jpg") as sheet:
        assert sheet.width == 2 * (2 * 128 + 4 + 12) + 12
        array = np.asarray(sheet.convert("RGB")).astype(float)
    real = np.asarray(Image.fromarray(patches[0]).resize((128, 128), Image.Resampling.LANCZOS)).astype(float)
    # find the first real patch below the title bar: it matches the shared patch, left of its partner
    top = next(y for y in range(array.shape[0] - 128) if np.abs(array[y:y + 128, 12:140] - real).mean() < 6)
    flipped = real[::-1]
    assert np.abs(array[top:top + 128, 144:272] - flipped).mean() < 12


def test_sample_pairs_flag_random_weights_in_the_image(tmp_path, patches):
    random_sheet = sample_pairs(make_samples(tmp_path / "a", patches, True), tmp_path / "a.jpg", "d")
    sample_pairs(make_samples(tmp_path / "b", patches, False), tmp_path / "b.jpg", "d")
    with Image.open(tmp_path / "a.jpg") as a, Image.open(tmp_path / "b.jpg") as b:
        assert random_sheet == 4 and a.height > b.height  # the red RANDOM WEIGHTS line
        red = np.asarray(a.convert("RGB"))[:a.height - b.height + 60].astype(int)
    assert ((red[..., 0] > 140) & (red[..., 1] < 60)).sum() > 100


def test_sample_grid_and_report_sheet_are_one_pair_sheet(tmp_path, patches):
    sheet = pair_sheet([(patches[0], patches[1], "a"), (patches[2], patches[3], "b")], per_row=4, side=256)
    array = np.asarray(sheet)
    assert sheet.width == 2 * (2 * 256 + 4 + 12) + 12
    # pixels are pasted unscaled at the sheet's side: real left, generated right
    assert np.array_equal(array[34:290, 12:268], patches[0]) and np.array_equal(array[34:290, 272:528], patches[1])


def test_read_image_uses_a_pyramid_level_and_png(tmp_path, patches):
    image = np.tile(patches[0], (4, 4, 1))  # 1024 x 1024
    write_pyramid_tiff(tmp_path / "big.tif", image, 0.5)
    write_png(tmp_path / "big.png", image)
    for name in ("big.tif", "big.png"):
        small = read_image(tmp_path / name, 300)
        assert max(small.shape[:2]) == 300 and small.shape[2] == 3 and small.dtype == np.uint8
        full = read_image(tmp_path / name)  # no max_side: the full-resolution level (JPEG tiles in the TIFF)
        assert full.shape == image.shape and np.abs(full.astype(int) - image).mean() < (3 if name == "big.tif" else 1e-9)
    assert read_image(tmp_path / "big.tif", 2000).shape == (1024, 1024, 3)
    with pytest.raises(StageOutputError, match="big.jpg: cannot read the image"):
        read_image(tmp_path / "big.jpg")


def test_large_image_sheet_reads_png_and_tiff_regions(tmp_path, patches):
    large = make_large_images(tmp_path, patches)
    assert large_image_sheet(large, tmp_path / "large.jpg", "d", max_side=200) == 2
    with Image.open(tmp_path / "large.jpg") as sheet:
        assert sheet.width >= 2 * 200 + 30
        array = np.asarray(sheet.convert("RGB"))
    assert array[-200:, 10:210].std() > 20 and array[-200:, 220:420].std() > 20  # the TIFF region's pair


@pytest.mark.parametrize("random_weights", [True, False])
def test_metrics_table(tmp_path, random_weights):
    table = metrics_table(make_metrics(tmp_path, random_weights), tmp_path / "metrics.html", "d")
    text = (tmp_path / "metrics.html").read_text()
    assert ("RANDOM WEIGHTS" in text) == random_weights
    names = list(table.metric)
    assert names == (["fd_hipt_vit_s16", "embedding_cosine", "crop_fd_hipt_vit_s16"] if random_weights
                     else ["fid", "embedding_cosine", "crop_fid"])
    assert list(table.value) == ["12.5", "0.61", "n/a"] and list(table.generated) == [4, 4, 4]
    assert "lower is better" in table.meaning[0] and "higher is better" in table.meaning[1]
    assert "std 0.1, min 0.4, median 0.6, max 0.8" in table.notes[1] and "2 region(s)" in table.notes[2]
    assert "CLIP weights not found" in text


def test_every_failure_reason_has_its_description_in_the_table(tmp_path, patches):
    tiles = make_tiles(tmp_path, patches[0])
    status = pd.read_csv(tiles / "status.tsv", sep="\t")
    failed = status.iloc[[1] * len(Reason)].assign(reason=[r.value for r in Reason],
                                                    input_id=[f"in{n}" for n in range(len(Reason))])
    failed.to_csv(tiles / "status.tsv", sep="\t", index=False)
    table = slides_table(tiles, tmp_path / "slides.html", "d")
    assert list(table.reason) == [f"{r.value}: {r.description}" for r in Reason]
    assert all(r.description for r in Reason)  # would_upsample, bad_mpp_overrides, ... included
    failed.assign(reason="no_such_reason").to_csv(tiles / "status.tsv", sep="\t", index=False)
    with pytest.raises(StageOutputError, match="status.tsv: input in0 has an unknown reason 'no_such_reason'"):
        slides_table(tiles, tmp_path / "slides.html", "d")


def test_summary_and_the_command(tmp_path, patches):
    tiles = make_tiles(tmp_path, patches[0])
    training, samples = make_training(tmp_path), make_samples(tmp_path, patches, True)
    large, metrics = make_large_images(tmp_path, patches), make_metrics(tmp_path, True)
    rows = summary_page(tmp_path / "summary.html", "d", tiles=tiles, training=training, samples=samples,
                        large_images=large, metrics=metrics)
    assert [r["stage"] for r in rows] == ["1. tiling", "2. training", "3. patches", "4. large images",
                                          "5. evaluation"]
    text = (tmp_path / "summary.html").read_text()
    assert "RANDOM WEIGHTS: the diffusion model&#x27;s autoencoder and the evaluation&#x27;s feature" in text
    assert "Failed: gone.svs (not_found)" in text and "fd_hipt_vit_s16 = 12.5 (4 generated vs 4 real)" in text
    with pytest.raises(ReportInputError, match="needs --training"):
        build_assets(dataset="d", loss_curve_out=str(tmp_path / "x.svg"))
    out = tmp_path / "out"
    result = subprocess.run([sys.executable, "-m", "pipeline", "report-assets", "--dataset", "d", "--tiles", str(tiles),
                             "--slides-table", str(out / "slides.html"), "--metrics", str(metrics),
                             "--metrics-table", str(out / "metrics.html")],
                            env=pipeline_env(), capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["metrics.html", "slides.html"]
    result = subprocess.run([sys.executable, "-m", "pipeline", "report-assets", "--dataset", "d",
                             "--sample-pairs", str(out / "p.jpg")], env=pipeline_env(), capture_output=True, text=True)
    assert result.returncode == 2 and "needs --samples" in result.stderr and not (out / "p.jpg").exists()


# --- captions -------------------------------------------------------------------------------------

def render_rst(path: Path, snakemake) -> str:
    """A caption as Snakemake's report renders it: Jinja2, then docutils; any docutils warning fails."""
    from docutils.core import publish_parts
    from jinja2 import Environment

    text = Environment(trim_blocks=True, lstrip_blocks=True).from_string(path.read_text()).render(
        snakemake=snakemake, categories={}, files=[])
    return publish_parts(text, writer="html", settings_overrides={"halt_level": 2, "report_level": 2})["body"]


class Job:
    def __init__(self, random_models: str):
        self.wildcards = type("W", (), {"dataset": "demo_he_20x"})()
        # every param a caption reads (stain.rst: the method and the target's file name)
        self.params = type("P", (), {"random_models": random_models, "method": "macenko", "target": "target.png"})()


@pytest.mark.parametrize("random_models", ["the first-stage autoencoder", ""])
@pytest.mark.parametrize("caption", sorted(p.name for p in (REPO / "report").glob("*.rst") if p.name != "workflow.rst"))
def test_captions_render(caption, random_models):
    html = render_rst(REPO / "report" / caption, Job(random_models))
    assert "demo_he_20x" in html
    assert ("Random weights (demo)" in html) == bool(random_models) or caption in ("slides.rst", "stain.rst", "thumbnails.rst")


def demo_config() -> dict:
    from pipeline.config import validate_config

    config = yaml.safe_load((REPO / "workflow_config.yaml").read_text())
    validate_config(config)
    return config


def test_workflow_description_lists_datasets_and_flags_the_demo():
    config = demo_config()
    html = render_rst(REPO / "report" / "workflow.rst", type("S", (), {"config": config}))
    assert "demo_he_20x" in html and "Demo run: random weights" in html
    config["encoders"]["hipt_vit_s16"]["weights"] = "/models/vit256_small_dino.pth"
    config["latents"]["autoencoder"] = {"kind": "lid", "path": "/models/lid"}
    assert "Demo run" not in render_rst(REPO / "report" / "workflow.rst", type("S", (), {"config": config}))


def test_random_weight_models_from_the_config():
    config = demo_config()
    # the demo trains its autoencoder: only the encoder (conditioning and evaluation) is random
    assert random_weight_models(config, ["hipt_vit_s16"]) == (
        "the conditioning encoder hipt_vit_s16, the evaluation's feature extractor hipt_vit_s16")
    config["latents"]["autoencoder"] = {"kind": "random", "preset": "tiny-vq-f16", "allow_random_weights": True}
    assert random_weight_models(config, ["hipt_vit_s16"]) == (
        "the conditioning encoder hipt_vit_s16, the first-stage autoencoder, "
        "the evaluation's feature extractor hipt_vit_s16")
    config["encoders"]["hipt_vit_s16"] = {"weights": "/models/vit256_small_dino.pth"}
    config["latents"]["autoencoder"] = {"kind": "lid", "path": "/models/lid"}
    assert random_weight_models(config, ["hipt_vit_s16"]) == ""
    config["evaluation"]["feature_extractor"] = "inception"
    config["encoders"]["phikon"] = {"weights": None, "allow_random_weights": True}
    assert random_weight_models(config, ["phikon"]) == "the conditioning encoder phikon"
