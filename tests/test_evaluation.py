"""Evaluation: FID-style distances through clean-fid with features computed once per set, crop
distances of large images, embedding similarity, metrics.json labels and sample counts, and the
message when Inception's weights are missing.

The SSL encoder (random HIPT ViT-S/16) stands in for Inception, which cannot be downloaded here;
its numbers mean nothing about image quality, but every code path and relation is the same.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, ImageFilter

from pipeline import cli
from pipeline.embedding.extract import EmbeddingSettings, embed_images
from pipeline.config import ConfigError
from pipeline.errors import StageOutputError
from pipeline.evaluation import EvaluationError, EvaluationSettings, InceptionWeightsMissing, evaluate
from pipeline.evaluation import run as evaluation_run
from pipeline.evaluation.distances import features_frechet_distance, gaussian_stats, kernel_distance
from pipeline.evaluation.extractors import (INCEPTION_FILE, EncoderCache, build_extractor, cleanfid_inception_path,
                                            prepare_inception)

pytestmark = [pytest.mark.filterwarnings("ignore:encoder 'hipt_vit_s16' is built with RANDOM weights"),
              # clean-fid's own frechet_distance, called here only to compare against
              pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")]

ENCODERS = {"hipt_vit_s16": {"weights": None, "hub_id": None, "allow_random_weights": True}}
SETTINGS = {"feature_extractor": "hipt_vit_s16", "batch_size": 8, "num_workers": 0, "device": "cpu",
            "kid_subsets": 20, "clip_fid": True}
CPU = torch.device("cpu")
N_PATCHES = 8
K = 2  # large-image grid side: 512 px, 4 crops


def rgb(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def save(image: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)
    return path


def blurred(image: np.ndarray, radius: float = 3) -> np.ndarray:
    return np.asarray(Image.fromarray(image).filter(ImageFilter.GaussianBlur(radius)))


def noisy(image: np.ndarray, rng: np.random.Generator, sigma: float = 25) -> np.ndarray:
    return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def embed(encoder, images: list[np.ndarray]) -> np.ndarray:
    """The conditions the sampling stage would have used: the embed stage's own function."""
    tensors = [torch.from_numpy(np.array(i)).permute(2, 0, 1) for i in images]
    vectors = embed_images([encoder], tensors, EmbeddingSettings(batch_size=8, num_workers=0, device="cpu"))
    return vectors[encoder.spec.name].astype(np.float32)


@pytest.fixture(scope="module")
def he_patches(shared_data) -> list[Path]:
    patches = sorted((shared_data / "he_patches_256").glob("*.png"))
    assert len(patches) == 22
    return patches


@pytest.fixture(scope="module")
def encoders(single_thread_torch) -> EncoderCache:
    return EncoderCache(ENCODERS, CPU)


def write_samples(folder: Path, real: list[np.ndarray], generated: list[np.ndarray], conditions: np.ndarray) -> None:
    """A patch-samples folder as the sampling stage writes it (docs/data_contract.md)."""
    rows = []
    for index, (r, g) in enumerate(zip(real, generated)):
        key = f"slide-a_r{index:05d}_c00000"
        save(r, folder / "real" / f"{key}.png")
        save(g, folder / "generated" / f"{key}.png")
        rows.append({"sample_id": key, "key": key, "input_id": "slide-a",
                     "generated": f"generated/{key}.png", "real": f"real/{key}.png"})
    pd.DataFrame(rows).to_parquet(folder / "manifest.parquet", index=False)
    np.save(folder / "conditions.npy", conditions)
    (folder / "sample.json").write_text(json.dumps({
        "dataset": "demo_he_20x", "mpp": 0.5, "embedding_key": "hipt_vit_s16", "model": "results/models/demo_he_20x",
        "sampler": {"sampler": "plms", "steps": 50, "guidance_scale": 2.0, "eta": 0.0, "seed": 0}}))


def write_large_images(folder: Path, reference: np.ndarray, generated: np.ndarray, embeddings: np.ndarray) -> None:
    """A large-image folder with one region, as the large-image stage writes it (no embedding_key:
    it falls back to the patch samples' key)."""
    region = folder / "region-000"
    save(reference, region / "reference.png")
    save(generated, region / "generated.png")
    np.save(region / "embeddings.npy", embeddings)
    (region / "region.json").write_text(json.dumps({"region": "region-000", "k": K}))
    pd.DataFrame([{"region": "region-000", "input_id": "tiatoolbox_target_image", "col": 0, "row": 0, "k": K,
                   "generated_png": "region-000/generated.png", "reference_png": "region-000/reference.png",
                   "mpp": 0.5, "dataset": "demo_he_20x", "sampler": "dpmsolver++", "steps": 20, "seed": 7,
                   "seam_score": 0.1}]).to_parquet(folder / "manifest.parquet", index=False)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, shared_data, he_patches, encoders):
    """One evaluation through the CLI: blurred patches against their real patches, and a large
    image identical to its reference region. Records every feature computation it makes."""
    root = tmp_path_factory.mktemp("evaluation")
    encoder = encoders.get("hipt_vit_s16")
    real = [rgb(p) for p in he_patches[::3][:N_PATCHES]]  # every third: several source images
    samples = root / "samples" / "demo_he_20x"
    write_samples(samples, real, [blurred(r) for r in real], embed(encoder, real))

    reference = rgb(shared_data / "he_images" / "tiatoolbox_target_image.png")[:K * 256, :K * 256]
    crops = [reference[r * 256:(r + 1) * 256, c * 256:(c + 1) * 256] for r in range(K) for c in range(K)]
    large = root / "large_images" / "demo_he_20x"
    write_large_images(large, reference, reference.copy(), embed(encoder, crops).reshape(K, K, -1))

    calls = []
    compute = evaluation_run.folder_features

    def recording(extractor, files, settings, device):
        features = compute(extractor, files, settings, device)
        calls.append({"extractor": extractor, "files": [Path(f) for f in files], "features": features})
        return features

    out = root / "results" / "run" / "metrics.json"
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation_run, "folder_features", recording)
        code = cli.main(["evaluate", "--samples", str(samples), "--large-images", str(large),
                         "--settings", json.dumps(SETTINGS), "--encoders", json.dumps(ENCODERS), "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    return {"result": result, "metrics": {m["name"]: m for m in result["metrics"]}, "calls": calls,
            "samples": samples, "large": large, "out": out}


def test_metrics_are_labelled_with_the_extractor_actually_used(evaluated):
    metrics = evaluated["metrics"]
    assert set(metrics) == {
        "fd_hipt_vit_s16", "kd_hipt_vit_s16", "embedding_cosine", "embedding_cosine_real",
        "crop_fd_hipt_vit_s16", "crop_kd_hipt_vit_s16", "crop_embedding_cosine", "crop_embedding_cosine_real"}
    for metric in metrics.values():  # never called fid/kid: these are not Inception numbers
        assert "fid" not in metric["name"] and "kid" not in metric["name"]
        extractor = metric["feature_extractor"]
        assert extractor["name"] == "hipt_vit_s16" and extractor["dim"] == 384
        assert extractor["random_weights"] is True and extractor["weights_sha256"] == "random"
        assert any("RANDOM weights" in w for w in metric["warnings"])
    assert metrics["fd_hipt_vit_s16"]["scope"] == "patches"
    assert metrics["crop_fd_hipt_vit_s16"]["scope"] == "large_image_crops"
    # clip_fid was asked for; without the clip package or its weights it is skipped, with the reason
    [skipped] = evaluated["result"]["skipped"]
    assert skipped["name"] == "clip_fid" and "CLIP" in skipped["reason"]


def test_metrics_carry_sample_counts_context_and_degenerate_covariance_warning(evaluated):
    result, metrics = evaluated["result"], evaluated["metrics"]
    assert result["format"] == "rldiff-metrics/1" and result["settings"]["feature_extractor"] == "hipt_vit_s16"
    fd, kd = metrics["fd_hipt_vit_s16"], metrics["kd_hipt_vit_s16"]
    assert fd["samples"] == kd["samples"] == {"generated": N_PATCHES, "real": N_PATCHES}
    assert metrics["crop_fd_hipt_vit_s16"]["samples"] == {"generated": K * K, "real": K * K}
    assert metrics["embedding_cosine"]["samples"] == {"generated": N_PATCHES, "real": 0}
    assert fd["dataset"] == "demo_he_20x" and fd["mpp"] == 0.5
    assert fd["sampler"]["sampler"] == {"sampler": "plms", "steps": 50, "guidance_scale": 2.0, "eta": 0.0, "seed": 0}
    crop = metrics["crop_fd_hipt_vit_s16"]
    assert crop["sampler"] == {"sampler": "dpmsolver++", "steps": 20, "seed": 7, "seam_score": 0.1}
    assert crop["regions"] == 1 and crop["mpp"] == 0.5
    # 8 samples for 384-dimensional features: the covariance is singular, and the record says so
    assert any("degenerate covariance" in w and "384" in w for w in fd["warnings"])
    assert kd["kid"] == {"subsets": 20, "seed": 0, "subset_size": N_PATCHES}
    # written atomically: nothing else (no temporary file, no crop scratch folder) is left behind
    assert [p.name for p in evaluated["out"].parent.iterdir()] == ["metrics.json"]


def test_patch_fd_equals_cleanfid_compute_fid_on_the_same_folders(evaluated, encoders):
    from cleanfid.fid import compute_fid, frechet_distance as cleanfid_frechet_distance

    samples = evaluated["samples"]
    patch_calls = [c for c in evaluated["calls"] if c["files"][0].parent.parent == samples]
    # features are computed once per set, and both the FD and the KD come from them
    assert [c["files"][0].parent.name for c in patch_calls] == ["generated", "real"]
    generated, real = (c["features"] for c in patch_calls)

    extractor = build_extractor("hipt_vit_s16", EvaluationSettings(**SETTINGS), encoders)
    reference = compute_fid(str(samples / "generated"), str(samples / "real"), mode="clean",
                            custom_feat_extractor=extractor.model, custom_fn_resize=extractor.fn_resize,
                            num_workers=0, batch_size=SETTINGS["batch_size"], device=CPU, verbose=False)
    # the same features that compute_fid computes from the folders ...
    same_features = cleanfid_frechet_distance(*gaussian_stats(generated), *gaussian_stats(real))
    assert same_features == pytest.approx(reference, rel=1e-9)
    # ... give the reported numbers
    metrics = evaluated["metrics"]
    assert metrics["fd_hipt_vit_s16"]["value"] == pytest.approx(features_frechet_distance(generated, real), rel=1e-12)
    assert metrics["kd_hipt_vit_s16"]["value"] == pytest.approx(kernel_distance(generated, real, 20, 1000), rel=1e-12)
    # our trace term is exact where clean-fid's sqrtm keeps ~4 digits on singular covariances
    assert metrics["fd_hipt_vit_s16"]["value"] == pytest.approx(reference, rel=1e-3)
    assert reference > 1.0


@pytest.fixture(scope="module")
def real_and_degraded_features(he_patches, encoders):
    """Features of the 22 real patches, and of half of them with noise and with blur."""
    extractor = build_extractor("hipt_vit_s16", EvaluationSettings(**SETTINGS), encoders)
    images = [rgb(p) for p in he_patches]
    rng = np.random.default_rng(0)
    degraded = [noisy(i, rng) for i in images[1::2]] + [blurred(i) for i in images[1::2]]
    batches = np.array_split(np.stack(images + degraded), 6)  # small batches: faster on one core
    with torch.no_grad():
        features = np.concatenate([extractor.model(torch.from_numpy(b).permute(0, 3, 1, 2).float()).numpy()
                                   for b in batches])
    half = len(images[1::2])
    return {"real": features[:22], "noisy": features[22:22 + half], "blurred": features[22 + half:]}


def test_fd_of_a_set_against_itself_is_zero(real_and_degraded_features, evaluated):
    real = real_and_degraded_features["real"]
    assert abs(features_frechet_distance(real, real)) < 1e-6
    # end to end: a large image identical to its reference region
    assert abs(evaluated["metrics"]["crop_fd_hipt_vit_s16"]["value"]) < 1e-6


def test_sets_degraded_by_noise_or_blur_score_worse(real_and_degraded_features):
    features = real_and_degraded_features
    half_a, half_b = features["real"][0::2], features["real"][1::2]  # the degraded sets are half_b's patches
    clean_fd = features_frechet_distance(half_a, half_b)
    clean_kd = kernel_distance(half_a, half_b, 100, 1000)
    for name in ("noisy", "blurred"):
        assert features_frechet_distance(half_a, features[name]) > 1.05 * clean_fd, name
        assert kernel_distance(half_a, features[name], 100, 1000) > clean_kd, name


def test_embedding_similarity_pairs_each_image_with_its_condition(evaluated):
    metrics = evaluated["metrics"]
    # the real patch that produced a condition matches it up to float16 rounding; two different
    # patches reach at most 0.998 under this random encoder, so a pairing off by a row would show
    for name in ("embedding_cosine_real", "crop_embedding_cosine_real", "crop_embedding_cosine"):
        assert metrics[name]["min"] > 0.9999, name
    cosine = metrics["embedding_cosine"]
    assert cosine["value"] < metrics["embedding_cosine_real"]["value"]  # blurred patches drift away
    assert {"std", "min", "median", "max"} <= set(cosine) and cosine["std"] > 0
    assert cosine["feature_extractor"]["name"] == "hipt_vit_s16" and cosine["feature_extractor"]["random_weights"]


def test_missing_inception_weights_say_which_file_to_obtain_and_where(evaluated, tmp_path, capsys):
    from cleanfid.downloads_helper import inception_url

    configured = tmp_path / "models" / INCEPTION_FILE
    settings = EvaluationSettings(**{**SETTINGS, "feature_extractor": "inception",
                                     "inception_weights": str(configured)})
    out = tmp_path / "metrics.json"
    with pytest.raises(InceptionWeightsMissing) as error:
        evaluate(out, settings, ENCODERS, samples=evaluated["samples"])
    message = str(error.value)
    assert str(configured) in message and inception_url in message
    assert f"place it at {cleanfid_inception_path()}" in message
    assert not out.exists()
    # through the CLI: exit status 2 and the same message
    code = cli.main(["evaluate", "--samples", str(evaluated["samples"]), "--out", str(out),
                     "--settings", json.dumps(settings.to_dict())])
    assert code == 2 and str(configured) in capsys.readouterr().err
    # no configured file: the message names the location clean-fid loads from
    location = tmp_path / "tmp" / INCEPTION_FILE
    with pytest.raises(InceptionWeightsMissing, match=f"no file at {location}"):
        prepare_inception(None, location)


def test_configured_inception_is_linked_where_cleanfid_loads_it(tmp_path, monkeypatch):
    import cleanfid.features

    weights = tmp_path / "models" / "inception.pt"
    weights.parent.mkdir()
    weights.write_bytes(b"not really inception")
    location = tmp_path / "tmp" / INCEPTION_FILE
    assert prepare_inception(str(weights), location) == location
    assert location.is_symlink() and location.resolve() == weights.resolve()
    prepare_inception(str(weights), location)  # again: already in place
    assert location.resolve() == weights.resolve()

    # the location is the one clean-fid's own code uses (guards against a clean-fid change)
    loaded_from = []

    class Recorder(torch.nn.Module):
        def __init__(self, path, download, resize_inside):
            super().__init__()
            loaded_from.append(Path(path) / INCEPTION_FILE)

    monkeypatch.setattr(cleanfid.features, "InceptionV3W", Recorder)
    cleanfid.features.build_feature_extractor("clean", CPU, use_dataparallel=False)
    assert loaded_from == [cleanfid_inception_path()]


def test_frechet_distance_agrees_with_cleanfid_on_full_rank_covariances():
    from cleanfid.fid import frechet_distance as cleanfid_frechet_distance

    rng = np.random.default_rng(1)
    a = rng.normal(size=(400, 16)) @ rng.normal(size=(16, 16))
    b = rng.normal(0.3, 1.2, size=(300, 16)) @ rng.normal(size=(16, 16))
    ours = features_frechet_distance(a, b)
    assert ours == pytest.approx(cleanfid_frechet_distance(*gaussian_stats(a), *gaussian_stats(b)), rel=1e-9)


def test_kid_is_reproducible_and_leaves_numpy_random_state_alone():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(50, 8)).astype(np.float32), rng.normal(size=(60, 8)).astype(np.float32)
    np.random.seed(123)
    expected_next = np.random.random()
    np.random.seed(123)
    first = kernel_distance(a, b, 10, 20)
    assert np.random.random() == expected_next
    assert kernel_distance(a, b, 10, 20) == first


def test_bad_inputs_are_reported_with_the_file_and_reason(evaluated, tmp_path):
    settings = EvaluationSettings(**SETTINGS)
    samples = shutil.copytree(evaluated["samples"], tmp_path / "samples")
    np.save(samples / "conditions.npy", np.zeros((3, 384), np.float32))
    with pytest.raises(StageOutputError, match=r"conditions\.npy: shape \(3, 384\), expected \[8, D\]"):
        evaluate(tmp_path / "m.json", settings, ENCODERS, samples=samples)

    np.save(samples / "conditions.npy", np.zeros((8, 100), np.float32))
    with pytest.raises(EvaluationError, match="conditions have 100 dimensions, but hipt_vit_s16 gives 384"):
        evaluate(tmp_path / "m.json", settings, ENCODERS, samples=samples)

    shutil.rmtree(samples)
    samples = shutil.copytree(evaluated["samples"], tmp_path / "samples")
    missing = next((samples / "generated").iterdir())
    missing.unlink()
    with pytest.raises(StageOutputError, match=f"do not exist, e.g. {missing}"):
        evaluate(tmp_path / "m.json", settings, ENCODERS, samples=samples)

    large = shutil.copytree(evaluated["large"], tmp_path / "large")
    small = large / "region-000" / "generated.png"
    Image.fromarray(rgb(small)[:300, :300]).save(small)
    with pytest.raises(EvaluationError, match=f"{small}: 300x300 px is smaller than the 2x2 grid"):
        evaluate(tmp_path / "m.json", settings, ENCODERS, large_images=large)

    with pytest.raises(ConfigError, match="evaluation: unknown setting.*feature_extractr"):
        EvaluationSettings.from_dict({"feature_extractr": "inception"})
    with pytest.raises(EvaluationError, match="'vgg16' is not one of inception, clip, hipt_vit_s16"):
        EvaluationSettings(feature_extractor="vgg16")


def test_config_evaluation_section_matches_the_settings():
    import yaml

    from helpers import REPO
    from pipeline.config import validate_config

    config = validate_config({"datasets": {"d": {"kind": "wsi", "inputs": ["x.svs"], "resolution": "20x"}}})
    assert config["evaluation"] == EvaluationSettings().to_dict()  # schema defaults = dataclass defaults
    demo = validate_config(yaml.safe_load((REPO / "workflow_config.yaml").read_text()))
    assert EvaluationSettings.from_dict(demo["evaluation"]).feature_extractor == "hipt_vit_s16"
