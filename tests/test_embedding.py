"""Embedding stage on real tiles of the demo slide, with randomly initialised registry encoders."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from helpers import DEMO_SLIDE, decode, make_spec, read_shards, run_pipeline, run_pipeline_killed
from pipeline.embedding.encoders import build_encoder
from pipeline.embedding.extract import EmbeddingSettings, embed_input
from pipeline.embedding.outputs import write_dataset_index
from pipeline.errors import StageOutputError
from pipeline.io.shard_stage import JpegPatches, PatchImages
from pipeline.io.shards import decode_npy
from pipeline.tiling.outputs import tile_input
from pipeline.tiling.slide import open_slide_source

SETTINGS = EmbeddingSettings(batch_size=8, num_workers=0, device="cpu")


def keep_shards(tiles, folder, count):
    """A copy of a tiling folder with only its first ``count`` shards (keeps the tests fast)."""
    folder.mkdir(parents=True)
    shards = sorted(tiles.glob("*.tar"))[:count]
    for shard in shards:
        (folder / shard.name).write_bytes(shard.read_bytes())
    manifest = pd.read_parquet(tiles / "manifest.parquet")
    manifest[manifest.shard.isin([s.name for s in shards])].to_parquet(folder / "manifest.parquet")
    return folder


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """Real demo-slide tiles: 3 shards of 4 patches."""
    root = tmp_path_factory.mktemp("tiles")
    spec = make_spec(inputs={"cmu_small_region": str(DEMO_SLIDE)}, image_format="jpg", patches_per_shard=4)
    status = tile_input(spec, "cmu_small_region", DEMO_SLIDE, root / "all", open_slide_source)
    assert status["patch_count"] > 12
    return keep_shards(root / "all", root / "cmu_small_region", 3)


@pytest.fixture(scope="module")
def embedded(tiles, hipt, tmp_path_factory):
    out = tmp_path_factory.mktemp("emb") / "inputs" / "cmu_small_region"
    return out, embed_input(tiles, out, [hipt], SETTINGS)


@pytest.fixture(scope="module")
def hipt():
    with pytest.warns(UserWarning, match="RANDOM weights"):
        return build_encoder("hipt_vit_s16", allow_random_weights=True)


def test_embeddings_match_the_encoder_and_keep_keys(tiles, hipt, embedded):
    folder, manifest = embedded
    source, embedded = read_shards(tiles), read_shards(folder)
    assert [s["__key__"] for s in embedded] == [s["__key__"] for s in source] == list(manifest.key)
    assert sorted(p.name for p in folder.glob("*.tar")) == sorted(p.name for p in tiles.glob("*.tar"))
    batch = torch.stack([torch.from_numpy(decode(s["jpg"])).permute(2, 0, 1) for s in source[:4]])
    with torch.inference_mode():
        expected = hipt(hipt.preprocess(batch)).numpy()
    for index, (before, after) in enumerate(zip(source, embedded)):
        assert after["jpg"] == before["jpg"]
        meta, original = json.loads(after["json"]), json.loads(before["json"])
        assert {k: meta[k] for k in original} == original
        record = meta["encoders"]["hipt_vit_s16"]
        assert record["random_weights"] is True and record["weights_sha256"] == "random"
        assert record["spec_sha256"] == hipt.spec_hash and record["dim"] == 384
        vector = decode_npy(after["hipt_vit_s16.npy"])
        assert vector.dtype == np.float16 and vector.shape == (384,)
        if index < 4:
            np.testing.assert_allclose(vector.astype(np.float32), expected[index], rtol=1e-2, atol=1e-2)


def test_several_encoders_each_add_their_array(tiles, hipt, tmp_path):
    with pytest.warns(UserWarning):
        dino = build_encoder("dino_vitb16", allow_random_weights=True)
    one_shard = keep_shards(tiles, tmp_path / "tiles", 1)
    embed_input(one_shard, tmp_path / "emb", [hipt, dino], SETTINGS)
    for sample in read_shards(tmp_path / "emb"):
        assert decode_npy(sample["hipt_vit_s16.npy"]).shape == (384,)
        assert decode_npy(sample["dino_vitb16.npy"]).shape == (768,)
        assert set(json.loads(sample["json"])["encoders"]) == {"hipt_vit_s16", "dino_vitb16"}


def test_killed_run_resumes_without_redoing_finished_shards(tiles, embedded, tmp_path):
    out = tmp_path / "emb"
    args = ["embed-input", "--tiles", str(tiles), "--out", str(out),
            "--encoders", json.dumps({"hipt_vit_s16": {"allow_random_weights": True}}),
            "--settings", json.dumps({"batch_size": 8, "num_workers": 0, "device": "cpu"})]
    run_pipeline_killed("pipeline.embedding.extract:embed_shard", 1, args)
    finished = sorted(out.glob("*.tar"))
    assert len(finished) == 1 and not (out / "manifest.parquet").exists()
    first_stat = finished[0].stat()
    run_pipeline(args)
    assert finished[0].stat().st_mtime_ns == first_stat.st_mtime_ns  # not recomputed
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    reference, _ = embedded
    for name in sorted(p.name for p in reference.glob("*.tar")) + ["manifest.parquet"]:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name


def test_dataset_index(embedded):
    folder, _ = embedded
    root = folder.parent.parent
    index = write_dataset_index([folder], root / "index.parquet")
    for column in ("key", "input_id", "slide", "x", "y", "col", "row", "shard"):
        assert column in index.columns
    assert set(index.input_id) == {"cmu_small_region"}
    assert all((root / "inputs" / shard).exists() for shard in index.shard)
    assert list(index.key) == [s["__key__"] for s in read_shards(folder)]


def test_jpeg_decoded_on_the_device_in_batches_matches_the_worker_decode(tiles, hipt, embedded, tmp_path):
    """decode: device (batched TorchCodec decode; nvJPEG on CUDA, libjpeg-turbo here) sees the
    pixels the PIL workers see, so the embeddings agree; a corrupt patch names its shard."""
    samples = read_shards(tiles)
    workers, on_device = PatchImages(samples), JpegPatches(samples, "tiles")
    assert JpegPatches.holds_jpeg(samples)
    batched = torch.cat(list(on_device.batches(5, torch.device("cpu"))))
    assert batched.dtype == torch.uint8 and batched.shape == (len(samples), 3, 256, 256)
    by_workers = torch.stack([workers[i] for i in range(len(workers))])
    difference = (batched.int() - by_workers.int()).abs()
    assert difference.max() <= 2 and difference.float().mean() < 0.05  # IDCT rounding at most

    folder, _ = embedded
    settings = EmbeddingSettings(batch_size=8, num_workers=0, device="cpu", decode="device")
    assert settings.decodes_on_device() and not SETTINGS.decodes_on_device()  # auto on a CPU: workers
    embed_input(tiles, tmp_path / "device", [hipt], settings)
    reference = np.stack([decode_npy(s["hipt_vit_s16.npy"]) for s in read_shards(folder)]).astype(np.float32)
    vectors = np.stack([decode_npy(s["hipt_vit_s16.npy"]) for s in read_shards(tmp_path / "device")]).astype(np.float32)
    cosine = (reference * vectors).sum(1) / np.linalg.norm(reference, axis=1) / np.linalg.norm(vectors, axis=1)
    assert cosine.min() > 0.999

    broken = [{**samples[0], "jpg": samples[0]["jpg"][:200]}]
    with pytest.raises(StageOutputError, match="broken.tar: a JPEG patch among samples 0-0 does not decode"):
        next(JpegPatches(broken, "broken.tar").batches(4, torch.device("cpu")))
