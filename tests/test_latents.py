"""Latent stage: embedding shards of real H&E patches -> shards with first-stage latents.

The embedding shards are built here in the embedding stage's layout from the real 256x256 crops in
../shared/data/he_patches_256 (embeddings: a fixed random projection of the image, since the real
encoders cannot run here). The autoencoder is the small random-weight VQ preset: these tests check
the stage's bookkeeping (keys, order, shapes, dtypes, resumption), not what the latents mean.
"""

from __future__ import annotations

import io
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from pipeline.io.shards import decode_npy, encode_image, encode_json, encode_npy, read_shard, write_shard
from pipeline.latents import EncodeSettings, encode_input, flip_equivariance_error
from pipeline.models.autoencoder import random_vq
from pipeline.models.autoencoder import RandomWeightsError, vq_from_lid_release
from pipeline.latents.encode import FLIPS, apply_flip, latent_field

PATCHES = Path(__file__).resolve().parents[2] / "shared" / "data" / "he_patches_256"
SEED_FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "seed_ldm_tiny"
ENCODER = "hipt_vit_s16"
SETTINGS = EncodeSettings(batch_size=8, num_workers=0, device="cpu", flips="all")

pytestmark = pytest.mark.usefixtures("single_thread_torch")


def real_patches() -> list[tuple[str, np.ndarray]]:
    files = sorted(PATCHES.glob("*.png"))
    if len(files) < 8:
        pytest.fail(f"real patches missing: expected the PNG crops in {PATCHES}")
    return [(f.stem, np.array(Image.open(f).convert("RGB"))) for f in files]


def projection_embedding(rgb: np.ndarray, dim: int, seed: int = 1234) -> np.ndarray:
    """A deterministic stand-in for an SSL encoder: fixed random projection of a 16x16 thumbnail."""
    small = np.asarray(Image.fromarray(rgb).resize((16, 16), Image.BILINEAR), dtype=np.float32) / 255.0
    matrix = np.random.default_rng(seed).standard_normal((small.size, dim)).astype(np.float32)
    vector = (small.reshape(-1) - 0.5) @ matrix / np.sqrt(small.size)
    return vector.astype(np.float16)


def make_embedding_input(folder: Path, patches: list[tuple[str, np.ndarray]], per_shard: int,
                         encoder: str = ENCODER, dim: int = 384) -> list[str]:
    """One input in the embedding stage's layout: patches-NNNNNN.tar (+ manifest.parquet)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows, names = [], []
    for start in range(0, len(patches), per_shard):
        name = f"patches-{start // per_shard:06d}.tar"
        names.append(name)
        samples = []
        for index, (stem, rgb) in enumerate(patches[start:start + per_shard], start):
            key = f"{folder.name}_{index:05d}"
            meta = {"dataset": "test", "source": f"{stem}.png", "col": index, "row": 0, "x": 256 * index, "y": 0,
                    "encoders": {encoder: {"dim": dim, "random_weights": True}}}
            samples.append({"__key__": key, "jpg": encode_image(rgb, "jpg"), "json": encode_json(meta),
                            f"{encoder}.npy": encode_npy(projection_embedding(rgb, dim))})
            rows.append({"key": key, "source": meta["source"], "col": index, "row": 0, "shard": name})
        write_shard(folder / name, samples)
    pd.DataFrame(rows).to_parquet(folder / "manifest.parquet", index=False)
    return names


@pytest.fixture(scope="module")
def autoencoder():
    return random_vq("tiny-vq-f4", seed=0, allow_random_weights=True)


@pytest.fixture(scope="module")
def embedded(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("embeddings") / "inputs" / "slideA"
    make_embedding_input(folder, real_patches()[:18], per_shard=6)
    return folder


@pytest.fixture(scope="module")
def encoded(embedded, autoencoder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("latents") / "inputs" / "slideA"
    encode_input(embedded, out, autoencoder, SETTINGS)
    return out


def test_random_preset_must_be_allowed():
    with pytest.raises(RandomWeightsError, match="random weights"):
        random_vq("tiny-vq-f4")


def test_latent_shards_keep_everything_and_add_float16_latents(embedded, encoded):
    source_shards = sorted(embedded.glob("patches-*.tar"))
    assert [p.name for p in sorted(encoded.glob("patches-*.tar"))] == [p.name for p in source_shards]
    for shard in source_shards:
        before, after = read_shard(shard), read_shard(encoded / shard.name)
        assert [s["__key__"] for s in after] == [s["__key__"] for s in before]
        for old, new in zip(before, after):
            # every member of the embedding shard is carried over byte for byte (json gains a record)
            for field, value in old.items():
                if field != "json":
                    assert new[field] == value, field
            old_meta, new_meta = json.loads(old["json"]), json.loads(new["json"])
            record = new_meta.pop("latents")
            assert new_meta == old_meta
            assert record["random_weights"] is True and record["kind"] == "vq"
            assert record["fields"] == [latent_field(f) for f in FLIPS]
            assert set(new) - set(old) == set(record["fields"])
            for field in record["fields"]:
                latent = decode_npy(new[field])
                assert latent.dtype == np.float16 and latent.shape == (3, 64, 64)
                assert np.isfinite(latent).all() and latent.std() > 0
    manifest = pd.read_parquet(encoded / "manifest.parquet")
    assert manifest["key"].tolist() == pd.read_parquet(embedded / "manifest.parquet")["key"].tolist()
    assert manifest["latent_random_weights"].all()


def test_latents_are_the_encodings_of_the_stored_images(encoded, autoencoder):
    """latent.npy (and each flip) equals encoding the sample's own image, flipped as named."""
    sample = read_shard(sorted(encoded.glob("patches-*.tar"))[1])[2]
    rgb = np.asarray(Image.open(io.BytesIO(sample["jpg"])).convert("RGB"))
    image = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    for flip in FLIPS:
        expected = autoencoder.encode(apply_flip(image, flip))[0].numpy()
        stored = decode_npy(sample[latent_field(flip)]).astype(np.float32)
        assert np.abs(stored - expected).max() <= 1e-3 * max(1.0, np.abs(expected).max())
    # the flipped encodings really are different tensors (a flip is not a no-op on real tissue)
    assert not np.array_equal(sample["latent.npy"], sample["latent_hflip.npy"])


def test_decoding_latents_round_trips_shapes(encoded, autoencoder):
    samples = read_shard(sorted(encoded.glob("patches-*.tar"))[0])[:3]
    latents = torch.from_numpy(np.stack([decode_npy(s["latent.npy"]) for s in samples]).astype(np.float32))
    images = autoencoder.decode(latents)
    assert images.shape == (3, 3, 256, 256) and torch.isfinite(images).all()
    # decoding quantises first: the decoder sees codebook vectors only
    re_encoded = autoencoder.encode(images.clamp(-1, 1))
    assert re_encoded.shape == latents.shape


def test_resume_skips_finished_shards_and_gives_identical_bytes(embedded, encoded, autoencoder, tmp_path,
                                                              monkeypatch):
    out = tmp_path / "inputs" / "slideA"
    import pipeline.latents.encode as stage

    original, calls = stage.encode_shard, []

    def encode_then_die(source, target, *args):
        if calls:
            raise KeyboardInterrupt("killed after the first shard")
        calls.append(source.name)
        return original(source, target, *args)

    monkeypatch.setattr(stage, "encode_shard", encode_then_die)
    with pytest.raises(KeyboardInterrupt):
        encode_input(embedded, out, autoencoder, SETTINGS)
    assert sorted(p.name for p in out.iterdir()) == ["patches-000000.tar"]  # no manifest, no temp files
    first_mtime = (out / "patches-000000.tar").stat().st_mtime_ns

    resumed = []
    monkeypatch.setattr(stage, "encode_shard", lambda source, *a: resumed.append(source.name) or original(source, *a))
    time.sleep(0.01)
    encode_input(embedded, out, autoencoder, SETTINGS)
    assert resumed == ["patches-000001.tar", "patches-000002.tar"]  # the finished shard was skipped
    assert (out / "patches-000000.tar").stat().st_mtime_ns == first_mtime
    for shard in sorted(encoded.glob("patches-*.tar")):
        assert (out / shard.name).read_bytes() == shard.read_bytes(), shard.name
    assert pd.read_parquet(out / "manifest.parquet").equals(pd.read_parquet(encoded / "manifest.parquet"))


def test_flip_equivariance_is_measured(autoencoder):
    """The measurement runs and is non-trivial; for random weights it is only a smoke number."""
    images = torch.from_numpy(np.stack([rgb for _, rgb in real_patches()[:4]])).permute(0, 3, 1, 2)
    errors = flip_equivariance_error(autoencoder, images)
    assert set(errors) == {"hflip", "vflip", "hvflip", "hflip_code_mismatch", "vflip_code_mismatch",
                           "hvflip_code_mismatch"}
    assert all(0 < value < 10 for key, value in errors.items() if "mismatch" not in key)
    assert all(0 <= value <= 1 for key, value in errors.items() if "mismatch" in key)


def test_seed_folder_first_stage_encodes_to_f4_latents():
    """The seed loader's converter gives the first stage (only its tensors are converted)."""
    if not (SEED_FIXTURE / "checkpoints" / "last.ckpt").is_file():
        pytest.fail(f"LID fixture missing: {SEED_FIXTURE}")
    vq = vq_from_lid_release(SEED_FIXTURE)
    assert vq.kind == "vq" and not vq.random_weights and vq.scaling_factor == 1.0
    with np.load(SEED_FIXTURE / "golden.npz") as golden:
        latents = vq.encode(torch.from_numpy(golden["vq_img"]))
        assert np.abs(latents.numpy() - golden["vq_encoded"]).max() < 1e-4


def test_kl_autoencoder_from_local_folder_and_safetensors(tmp_path):
    """The KL option (sd-vae-ft-mse layout) loads offline from a diffusers folder or one file."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from pipeline.models.autoencoder import kl_from_local, load_autoencoder

    kwargs = {"block_out_channels": (8, 16), "down_block_types": ("DownEncoderBlock2D",) * 2,
              "up_block_types": ("UpDecoderBlock2D",) * 2, "latent_channels": 4, "norm_num_groups": 4,
              "layers_per_block": 1, "scaling_factor": 0.18215}
    torch.manual_seed(0)
    reference = AutoencoderKL(**kwargs).eval()
    reference.save_pretrained(tmp_path / "vae")
    save_file(reference.state_dict(), str(tmp_path / "vae.safetensors"))
    image = torch.from_numpy(real_patches()[0][1]).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        expected = reference.encode(image).latent_dist.mode() * 0.18215
    for vae in (load_autoencoder("kl", tmp_path / "vae"), kl_from_local(tmp_path / "vae.safetensors", kwargs)):
        assert vae.kind == "kl" and vae.latent_channels == 4 and vae.downsampling_factor == 2
        latents = vae.encode(image)
        assert latents.shape == (1, 4, 128, 128) and torch.allclose(latents, expected, atol=1e-6)
        assert vae.decode(latents).shape == (1, 3, 256, 256)
