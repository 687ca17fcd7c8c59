"""Encoder registry: random builds, preprocessing, and strict loading of upstream-layout checkpoints.

Nothing is downloaded. Upstream-layout checkpoints are written here from randomly initialised
(then perturbed) models, renamed to the upstream names the way each upstream code base names
them; the reference embeddings are computed by small functional re-implementations of the
upstream forward passes (DINO/HIPT ViT with DINO's position interpolation, Hugging Face ViT with
split q/k/v, old-timm Swin with ConvStem and end-of-stage PatchMerging, DINOv2 with registers),
so a wrong key mapping, q/k/v order, downsample placement or position resampling shows up as a
numerical mismatch.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.embedding.checkpoints import CheckpointError
from pipeline.embedding.encoders import (
    ENCODERS,
    Encoder,
    RandomWeightsWarning,
    build_encoder,
    expected_shapes,
)

PATCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "he_patches_256" / "cmu1_small_region_x1024_y768.png"
NAMES = list(ENCODERS)
TOLERANCE = 1e-4
VIT_L = ("uni", "dinov2_vitl14_reg")

# ----------------------------------------------------------------------------------------------
# Fixtures and builders
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def patch() -> torch.Tensor:
    if not PATCH.is_file():
        pytest.fail(f"real H&E patch missing: {PATCH}")
    array = np.asarray(Image.open(PATCH).convert("RGB"))
    assert array.shape == (256, 256, 3)
    return torch.from_numpy(array.copy()).permute(2, 0, 1).unsqueeze(0).contiguous()


_RANDOM: dict[str, Encoder] = {}
_SECOND: dict[str, Encoder] = {}


def random_encoder(name: str) -> Encoder:
    """The first random build of ``name`` (built once per test session)."""
    if name not in _RANDOM:
        with pytest.warns(RandomWeightsWarning, match="MEANINGLESS"):
            _RANDOM[name] = build_encoder(name, allow_random_weights=True)
    return _RANDOM[name]


def second_random_encoder(name: str) -> Encoder:
    if name not in _SECOND:
        with pytest.warns(RandomWeightsWarning):
            _SECOND[name] = build_encoder(name, allow_random_weights=True)
    return _SECOND[name]


def take_reference_model(name: str) -> torch.nn.Module:
    """A second random build, handed over to be perturbed (so it is not reused afterwards)."""
    encoder = second_random_encoder(name)
    del _SECOND[name]
    return encoder.model


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Give every constant tensor (zero biases, LayerNorm 1/0, LayerScale 1e-5, BN running
    statistics 0/1) distinct non-trivial values, so that a mapping mistake cannot hide behind
    symmetric values; randomly initialised weights are kept as they are (cheap for ViT-L)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, tensor in model.state_dict().items():
            head = tensor.flatten()[:4096]
            constant = bool((head == head[0]).all()) if tensor.numel() else False
            if not tensor.is_floating_point() or not (constant or key.endswith("relative_position_bias_table")):
                continue
            noise = torch.randn(tensor.shape, generator=generator)
            if key.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif key.endswith(".gamma") or key.endswith("weight"):  # LayerScale, norm and BN scales
                tensor.copy_(1.0 + 0.1 * noise)
            elif key.endswith("relative_position_bias_table"):
                tensor.copy_(noise)
            else:  # biases, BN running means
                tensor.copy_(0.05 * noise)


def tiny(tensors: dict) -> dict:
    """Same keys, shapes and dtypes, one shared element of storage per tensor (fast to write)."""
    out = {}
    for key, value in tensors.items():
        if isinstance(value, dict):
            out[key] = tiny(value)
        elif isinstance(value, torch.Tensor):
            out[key] = torch.zeros((), dtype=value.dtype).expand(value.shape)
        else:
            out[key] = value
    return out


def meta_state(name: str) -> dict[str, torch.Tensor]:
    return {k: torch.empty(shape, device="meta") for k, shape in expected_shapes(ENCODERS[name]).items()}


def randn(shape, generator=None, like=None) -> torch.Tensor:
    if like is not None and like.is_meta:
        return torch.empty(shape, device="meta")
    return 0.05 * torch.randn(shape, generator=generator)


# ----------------------------------------------------------------------------------------------
# Upstream layouts, written from timm-named state dicts
# ----------------------------------------------------------------------------------------------

def hipt_upstream(sd: dict[str, torch.Tensor], generator=None, module_prefix: str = "") -> dict:
    """HIPT's DINO training checkpoint: teacher/student MultiCropWrappers, DINO head, args."""
    pos = sd["pos_embed"]
    backbone = dict(sd)
    backbone["pos_embed"] = randn((1, 197, pos.shape[-1]), generator, like=pos)  # trained at 224 px
    head = {"head.mlp.0.weight": randn((2048, 384), generator, like=pos),
            "head.mlp.0.bias": randn((2048,), generator, like=pos),
            "head.last_layer.weight_g": randn((65536, 1), generator, like=pos),
            "head.last_layer.weight_v": randn((65536, 256), generator, like=pos)}
    teacher = {f"{module_prefix}backbone.{k}": v for k, v in backbone.items()}
    teacher.update({f"{module_prefix}{k}": v for k, v in head.items()})
    return {"teacher": teacher, "epoch": 100,
            "args": argparse.Namespace(arch="vit_small", patch_size=16, out_dim=65536, lr=0.0005)}


def hf_upstream(sd: dict[str, torch.Tensor], generator=None) -> dict[str, torch.Tensor]:
    """Hugging Face ViTModel names; timm's fused qkv split into query/key/value."""
    out = {"embeddings.cls_token": sd["cls_token"], "embeddings.position_embeddings": sd["pos_embed"],
           "embeddings.patch_embeddings.projection.weight": sd["patch_embed.proj.weight"],
           "embeddings.patch_embeddings.projection.bias": sd["patch_embed.proj.bias"],
           "layernorm.weight": sd["norm.weight"], "layernorm.bias": sd["norm.bias"]}
    depth = 1 + max(int(k.split(".")[1]) for k in sd if k.startswith("blocks."))
    for i in range(depth):
        b, layer = f"blocks.{i}.", f"encoder.layer.{i}."
        for kind in ("weight", "bias"):
            q, k, v = sd[f"{b}attn.qkv.{kind}"].chunk(3, dim=0)
            out[f"{layer}attention.attention.query.{kind}"] = q
            out[f"{layer}attention.attention.key.{kind}"] = k
            out[f"{layer}attention.attention.value.{kind}"] = v
            out[f"{layer}attention.output.dense.{kind}"] = sd[f"{b}attn.proj.{kind}"]
            out[f"{layer}layernorm_before.{kind}"] = sd[f"{b}norm1.{kind}"]
            out[f"{layer}layernorm_after.{kind}"] = sd[f"{b}norm2.{kind}"]
            out[f"{layer}intermediate.dense.{kind}"] = sd[f"{b}mlp.fc1.{kind}"]
            out[f"{layer}output.dense.{kind}"] = sd[f"{b}mlp.fc2.{kind}"]
    width = sd["norm.weight"].shape[0]
    out["pooler.dense.weight"] = randn((width, width), generator, like=sd["norm.weight"])
    out["pooler.dense.bias"] = randn((width,), generator, like=sd["norm.weight"])
    return out


def ctranspath_upstream(sd: dict[str, torch.Tensor], generator=None) -> dict:
    """TransPath's patched timm 0.5.4 Swin: PatchMerging stored at the END of the previous stage,
    relative_position_index and attn_mask buffers persisted, state dict under 'model'."""
    out = {}
    for key, value in sd.items():
        match = re.fullmatch(r"layers\.(\d+)\.downsample\.(.+)", key)
        out[f"layers.{int(match.group(1)) - 1}.downsample.{match.group(2)}" if match else key] = value
    like = sd["norm.weight"]
    for stage, depth in enumerate((2, 2, 6, 2)):
        side = 56 >> stage
        for block in range(depth):
            prefix = f"layers.{stage}.blocks.{block}.attn."
            out[prefix + "relative_position_index"] = (torch.empty((49, 49), dtype=torch.long, device="meta")
                                                      if like.is_meta else torch.zeros((49, 49), dtype=torch.long))
            if block % 2 and side > 7:
                windows = (side // 7) ** 2
                out[f"layers.{stage}.blocks.{block}.attn_mask"] = (torch.empty((windows, 49, 49), device="meta")
                                                                   if like.is_meta else torch.zeros((windows, 49, 49)))
    return {"model": out}


def plain_upstream(sd: dict[str, torch.Tensor], generator=None) -> dict[str, torch.Tensor]:
    return dict(sd)


def dinov2_upstream(sd: dict[str, torch.Tensor], generator=None) -> dict[str, torch.Tensor]:
    """facebookresearch DINOv2: class position inside pos_embed (37x37 grid at 518 px), registers,
    mask token."""
    width = sd["cls_token"].shape[-1]
    out = {k: v for k, v in sd.items() if k not in ("cls_token", "reg_token", "pos_embed")}
    out["cls_token"] = randn((1, 1, width), generator, like=sd["cls_token"])
    out["pos_embed"] = randn((1, 1 + 37 * 37, width), generator, like=sd["cls_token"])
    out["register_tokens"] = sd["reg_token"]
    out["mask_token"] = randn((1, width), generator, like=sd["cls_token"])
    return out


UPSTREAM = {"hipt_vit_s16": hipt_upstream, "phikon": hf_upstream, "ctranspath": ctranspath_upstream,
            "dino_vitb16": plain_upstream, "uni": plain_upstream, "dinov2_vitl14_reg": dinov2_upstream}
SUFFIX = {"phikon": ".safetensors", "uni": ".bin"}


def save_upstream(obj: dict, path: Path) -> None:
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous().clone() for k, v in obj.items()}, str(path))
    else:
        torch.save(obj, path)


# ----------------------------------------------------------------------------------------------
# Functional reference forwards, written from the upstream code's structure and names
# ----------------------------------------------------------------------------------------------

def layer_norm(x, sd, prefix, eps):
    return F.layer_norm(x, x.shape[-1:], sd[prefix + "weight"], sd[prefix + "bias"], eps)


def attention(y, q, k, v, heads):
    batch, tokens, width = y.shape

    def split(t):
        return t.reshape(batch, tokens, heads, width // heads).transpose(1, 2)

    q, k, v = split(q), split(k), split(v)
    weights = ((q * (width // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    return (weights @ v).transpose(1, 2).reshape(batch, tokens, width)


def vit_blocks(h, sd, depth, heads, eps=1e-6, layer_scale=False):
    """DINO / UNI / DINOv2 block names: norm1, attn.qkv (fused q|k|v), attn.proj, [ls1.gamma], ..."""
    for i in range(depth):
        p = f"blocks.{i}."
        y = layer_norm(h, sd, p + "norm1.", eps)
        q, k, v = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"]).chunk(3, dim=-1)
        y = F.linear(attention(y, q, k, v, heads), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = h + (y * sd[p + "ls1.gamma"] if layer_scale else y)
        y = layer_norm(h, sd, p + "norm2.", eps)
        y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                     sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        h = h + (y * sd[p + "ls2.gamma"] if layer_scale else y)
    return layer_norm(h, sd, "norm.", eps)


def patch_tokens(x, weight, bias):
    return F.conv2d(x, weight, bias, stride=weight.shape[-1]).flatten(2).transpose(1, 2)


def reference_dino_vit(sd, x, heads, depth=12, layer_scale=False):
    """facebookresearch/dino (and HIPT) VisionTransformer.forward, interpolate_pos_encoding included."""
    h = patch_tokens(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"])
    h = torch.cat([sd["cls_token"].expand(len(x), -1, -1), h], dim=1)
    pos = sd["pos_embed"]
    n_old, n_new = pos.shape[1] - 1, h.shape[1] - 1
    if n_old != n_new:
        old, grid = int(math.sqrt(n_old)), x.shape[-1] // sd["patch_embed.proj.weight"].shape[-1]
        patch_pos = F.interpolate(pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2),
                                  scale_factor=((grid + 0.1) / math.sqrt(n_old),) * 2, mode="bicubic")
        pos = torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)
    return vit_blocks(h + pos, sd, depth, heads, layer_scale=layer_scale)[:, 0]


def reference_hf_vit(sd, x, heads=12, depth=12, eps=1e-6):
    """transformers ViTModel(...).last_hidden_state[:, 0] from the HF-named tensors."""
    h = patch_tokens(x, sd["embeddings.patch_embeddings.projection.weight"],
                     sd["embeddings.patch_embeddings.projection.bias"])
    h = torch.cat([sd["embeddings.cls_token"].expand(len(x), -1, -1), h], dim=1) + sd["embeddings.position_embeddings"]
    for i in range(depth):
        p = f"encoder.layer.{i}."
        y = layer_norm(h, sd, p + "layernorm_before.", eps)
        q, k, v = (F.linear(y, sd[f"{p}attention.attention.{n}.weight"], sd[f"{p}attention.attention.{n}.bias"])
                   for n in ("query", "key", "value"))
        h = h + F.linear(attention(y, q, k, v, heads), sd[p + "attention.output.dense.weight"],
                         sd[p + "attention.output.dense.bias"])
        y = layer_norm(h, sd, p + "layernorm_after.", eps)
        y = F.gelu(F.linear(y, sd[p + "intermediate.dense.weight"], sd[p + "intermediate.dense.bias"]))
        h = h + F.linear(y, sd[p + "output.dense.weight"], sd[p + "output.dense.bias"])
    return layer_norm(h, sd, "layernorm.", eps)[:, 0]


def reference_dinov2(sd, x, heads=16, depth=24):
    """facebookresearch/dinov2 DinoVisionTransformer (num_register_tokens=4, interpolate_offset=0,
    interpolate_antialias=True) -> x_norm_clstoken."""
    h = patch_tokens(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"])
    h = torch.cat([sd["cls_token"].expand(len(x), -1, -1), h], dim=1)
    pos = sd["pos_embed"]
    old, grid = int(math.sqrt(pos.shape[1] - 1)), x.shape[-1] // 14
    patch_pos = F.interpolate(pos[:, 1:].reshape(1, old, old, -1).permute(0, 3, 1, 2), size=(grid, grid),
                              mode="bicubic", antialias=True)
    h = h + torch.cat([pos[:, :1], patch_pos.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1])], dim=1)
    h = torch.cat([h[:, :1], sd["register_tokens"].expand(len(x), -1, -1), h[:, 1:]], dim=1)
    return vit_blocks(h, sd, depth, heads, layer_scale=True)[:, 0]


def _relative_index(window: int) -> torch.Tensor:
    coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (window - 1)
    return rel[..., 0] * (2 * window - 1) + rel[..., 1]


def _windows(x, window):
    b, h, w, c = x.shape
    return x.view(b, h // window, window, w // window, window, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, window * window, c)


def _shift_mask(side, window, shift):
    labels = torch.zeros(1, side, side, 1)
    count = 0
    for rows in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
        for cols in (slice(0, -window), slice(-window, -shift), slice(-shift, None)):
            labels[:, rows, cols, :] = count
            count += 1
    labels = _windows(labels, window).squeeze(-1)
    mask = labels[:, None, :] - labels[:, :, None]
    return mask.masked_fill(mask != 0, -100.0)


def reference_ctranspath(sd, x, heads=(3, 6, 12, 24), depths=(2, 2, 6, 2), window=7):
    """TransPath ctranspath(): timm 0.5.4 SwinTransformer with ConvStem and head Identity."""
    def bn(t, i):
        p = f"patch_embed.proj.{i}."
        return F.batch_norm(t, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"],
                            False, 0.0, 1e-5)

    h = F.relu(bn(F.conv2d(x, sd["patch_embed.proj.0.weight"], stride=2, padding=1), 1))
    h = F.relu(bn(F.conv2d(h, sd["patch_embed.proj.3.weight"], stride=2, padding=1), 4))
    h = F.conv2d(h, sd["patch_embed.proj.6.weight"], sd["patch_embed.proj.6.bias"])
    batch, width, side, _ = h.shape
    h = layer_norm(h.flatten(2).transpose(1, 2), sd, "patch_embed.norm.", 1e-5)
    for stage, depth in enumerate(depths):
        win = min(window, side)
        index = _relative_index(win).view(-1)
        for block in range(depth):
            p = f"layers.{stage}.blocks.{block}."
            shift = win // 2 if (block % 2 and side > window) else 0
            y = layer_norm(h, sd, p + "norm1.", 1e-5).view(batch, side, side, width)
            if shift:
                y = torch.roll(y, (-shift, -shift), (1, 2))
            y = _windows(y, win)
            tokens = win * win
            qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
            qkv = qkv.reshape(len(y), tokens, 3, heads[stage], width // heads[stage]).permute(2, 0, 3, 1, 4)
            q, k, v = qkv[0] * (width // heads[stage]) ** -0.5, qkv[1], qkv[2]
            logits = q @ k.transpose(-2, -1)
            table = sd[p + "attn.relative_position_bias_table"]
            logits = logits + table[index].view(tokens, tokens, -1).permute(2, 0, 1)
            if shift:
                mask = _shift_mask(side, win, shift)
                logits = (logits.view(batch, len(mask), heads[stage], tokens, tokens) + mask[None, :, None])
                logits = logits.view(-1, heads[stage], tokens, tokens)
            y = (logits.softmax(-1) @ v).transpose(1, 2).reshape(len(y), tokens, width)
            y = F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
            y = y.view(batch, side // win, side // win, win, win, width).permute(0, 1, 3, 2, 4, 5)
            y = y.reshape(batch, side, side, width)
            if shift:
                y = torch.roll(y, (shift, shift), (1, 2))
            h = h + y.reshape(batch, side * side, width)
            y = layer_norm(h, sd, p + "norm2.", 1e-5)
            h = h + F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                             sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        if stage < len(depths) - 1:  # old timm: PatchMerging at the end of the stage
            p = f"layers.{stage}.downsample."
            g = h.view(batch, side, side, width)
            g = torch.cat([g[:, 0::2, 0::2], g[:, 1::2, 0::2], g[:, 0::2, 1::2], g[:, 1::2, 1::2]], dim=-1)
            side, width = side // 2, width * 2
            g = layer_norm(g.reshape(batch, side * side, 2 * width), sd, p + "norm.", 1e-5)
            h = F.linear(g, sd[p + "reduction.weight"])
    return layer_norm(h, sd, "norm.", 1e-5).mean(1)


def reference_forward(name: str, upstream: dict, x: torch.Tensor) -> torch.Tensor:
    if name == "hipt_vit_s16":
        sd = {k.removeprefix("backbone."): v for k, v in upstream["teacher"].items() if k.startswith("backbone.")}
        return reference_dino_vit(sd, x, heads=6)
    if name == "phikon":
        return reference_hf_vit(upstream, x)
    if name == "ctranspath":
        return reference_ctranspath(upstream["model"], x)
    if name == "dino_vitb16":
        return reference_dino_vit(upstream, x, heads=12)
    if name == "uni":
        return reference_dino_vit(upstream, x, heads=16, depth=24, layer_scale=True)
    if name == "dinov2_vitl14_reg":
        return reference_dinov2(upstream, x)
    raise AssertionError(name)


# ----------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------

def test_registry_is_plain_data():
    expected = {"hipt_vit_s16": 384, "phikon": 768, "ctranspath": 768, "dino_vitb16": 768, "uni": 1024,
                "dinov2_vitl14_reg": 1024}
    assert {name: spec.output_dim for name, spec in ENCODERS.items()} == expected
    for name, spec in ENCODERS.items():
        assert spec.name == name
        # The hash covers what makes the numbers, not the documentation.
        reworded = dataclasses.replace(spec, description="other words", weights_file="other.pth")
        assert reworded.spec_hash == spec.spec_hash != dataclasses.replace(spec, input_size=512).spec_hash
        assert spec.pooling == ("avg" if name == "ctranspath" else "cls")
        imagenet = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
        assert (spec.mean, spec.std) == (((0.5,) * 3, (0.5,) * 3) if name == "hipt_vit_s16" else imagenet)
        assert spec.input_size == (256 if name == "hipt_vit_s16" else 224)
    assert ENCODERS["uni"].model_kwargs["init_values"] == 1e-5
    assert ENCODERS["hipt_vit_s16"].model_kwargs["dynamic_img_size"] is True


def test_weights_are_required(tmp_path):
    with pytest.raises(ValueError, match="needs pretrained weights"):
        build_encoder("phikon")
    with pytest.raises(ValueError, match="unknown encoder"):
        build_encoder("resnet50", allow_random_weights=True)
    with pytest.raises(ValueError, match="not both"):
        build_encoder("phikon", weights=tmp_path / "x.pth", hub_id="owkin/phikon")
    with pytest.raises(FileNotFoundError, match="x.pth"):
        build_encoder("phikon", weights=tmp_path / "x.pth")


class NotATensor:
    pass


def test_arbitrary_pickles_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"teacher": {"cls_token": torch.zeros(1)}, "payload": NotATensor()}, path)
    with pytest.raises(CheckpointError, match="weights_only"):
        build_encoder("hipt_vit_s16", weights=path)


@pytest.mark.parametrize("name", NAMES)
def test_random_build_width_and_determinism(name, patch):
    encoder = random_encoder(name)
    spec = ENCODERS[name]
    assert encoder.random_weights and encoder.weights_sha256 == "random"
    assert encoder.spec is spec and encoder.spec_hash == spec.spec_hash
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    with torch.inference_mode():
        first = encoder(encoder.preprocess(patch))
        # ViT-L entries: one forward (seconds on CPU); their determinism is that of the same timm
        # ViT code checked on the ViT-S/B entries, plus identical weights across builds (below).
        second = first if name in VIT_L else encoder(encoder.preprocess(patch))
    assert first.shape == (1, spec.output_dim) and first.dtype == torch.float32
    assert torch.isfinite(first).all()
    assert torch.equal(first, second)


@pytest.mark.parametrize("name", NAMES)
def test_two_random_builds_have_identical_weights(name):
    first, second = random_encoder(name).state_dict(), second_random_encoder(name).state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("name", NAMES)
def test_preprocess(name, patch):
    encoder = random_encoder(name)
    spec = ENCODERS[name]
    size = spec.input_size
    mean, std = torch.tensor(spec.mean).view(1, 3, 1, 1), torch.tensor(spec.std).view(1, 3, 1, 1)

    x = encoder.preprocess(patch)
    assert x.shape == (1, 3, size, size) and x.dtype == torch.float32
    assert (x >= (0 - mean) / std - 1e-6).all() and (x <= (1 - mean) / std + 1e-6).all()
    for value in (255, 0):
        flat = encoder.preprocess(torch.full((2, 3, 256, 256), value, dtype=torch.uint8))
        target = ((value / 255 - mean) / std).expand(2, 3, size, size)
        assert flat.shape == (2, 3, size, size)
        torch.testing.assert_close(flat, target, atol=1e-6, rtol=0)

    # Same as the upstream PIL path: Resize (PIL, antialiased) -> ToTensor -> Normalize.
    image = Image.fromarray(patch[0].permute(1, 2, 0).numpy())
    if size != 256:
        resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[spec.interpolation]
        image = image.resize((size, size), resample)
    pil = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).unsqueeze(0).float() / 255
    pil = (pil - mean) / std
    if size == 256:
        torch.testing.assert_close(x, pil, atol=1e-6, rtol=0)
    else:
        levels = ((x - pil) * std * 255).abs()  # in grey levels; PIL rounds in fixed point
        assert levels.max() <= 2.0 + 1e-3, f"{levels.max():.3f} grey levels from PIL"
        assert levels.mean() < 0.15

    with pytest.raises(TypeError, match="uint8"):
        encoder.preprocess(patch.float())


@pytest.mark.parametrize("name", NAMES)
def test_upstream_checkpoint_round_trip(name, patch, tmp_path):
    reference = take_reference_model(name)
    perturb_(reference, seed=NAMES.index(name) + 1)
    generator = torch.Generator().manual_seed(100 + NAMES.index(name))
    upstream = UPSTREAM[name](reference.state_dict(), generator)
    path = tmp_path / f"{name}_upstream{SUFFIX.get(name, '.pth')}"
    save_upstream(upstream, path)

    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomWeightsWarning)
        encoder = build_encoder(name, weights=path)
    assert not encoder.random_weights
    assert encoder.weights_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()

    with torch.inference_mode():
        x = encoder.preprocess(patch)
        got = encoder(x)
        want = reference_forward(name, upstream, x)
        if name in ("phikon", "ctranspath", "dino_vitb16"):  # same grid: the timm model agrees too
            torch.testing.assert_close(reference(x), want, atol=TOLERANCE, rtol=0)
    error = (got - want).abs().max().item()
    print(f"{name}: max |encoder - upstream reference| = {error:.2e}")
    assert got.shape == want.shape == (1, ENCODERS[name].output_dim)
    assert error < TOLERANCE, f"{name}: max abs error {error:.3e}"
    assert want.abs().max() > 0.1  # the comparison is not between two near-zero vectors
    path.unlink()


def _tiny_upstream(name: str) -> dict:
    sd = meta_state(name)
    if name == "hipt_vit_s16":
        return tiny(hipt_upstream(sd, module_prefix="module."))
    return tiny(UPSTREAM[name](sd))


# (state dict container, a key in the file's own naming, how the error names it)
MISSING = {
    "hipt_vit_s16": ("teacher", "module.backbone.blocks.2.mlp.fc1.weight", "blocks.2.mlp.fc1.weight"),
    "phikon": (None, "encoder.layer.3.attention.attention.key.weight", "encoder.layer.3.attention.attention.key.weight"),
    "ctranspath": ("model", "layers.1.downsample.reduction.weight", "layers.1.downsample.reduction.weight"),
    "dino_vitb16": (None, "blocks.11.attn.qkv.bias", "blocks.11.attn.qkv.bias"),
    "uni": (None, "blocks.5.ls2.gamma", "blocks.5.ls2.gamma"),
    "dinov2_vitl14_reg": (None, "register_tokens", "register_tokens"),
}


@pytest.mark.parametrize("name", NAMES)
def test_missing_key_is_an_error(name, tmp_path):
    container, key, reported = MISSING[name]
    upstream = _tiny_upstream(name)
    state = upstream[container] if container else upstream
    del state[key]
    path = tmp_path / f"{name}_missing.pth"
    torch.save(upstream, path)
    with pytest.raises(CheckpointError) as error:
        build_encoder(name, weights=path)
    message = str(error.value)
    assert "missing keys" in message and repr(reported) in message and str(path) in message
    assert "unexpected" not in message


@pytest.mark.parametrize("name", NAMES)
def test_extra_key_is_an_error(name, tmp_path):
    container, key, _ = MISSING[name]
    upstream = _tiny_upstream(name)
    state = upstream[container] if container else upstream
    extra = key.rsplit(".", 1)[0] + ".surprise" if "." in key else "surprise_token"
    state[extra] = torch.zeros(3)
    path = tmp_path / f"{name}_extra.pth"
    torch.save(upstream, path)
    with pytest.raises(CheckpointError) as error:
        build_encoder(name, weights=path)
    message = str(error.value)
    assert "unexpected keys" in message and repr(extra) in message and str(path) in message
    assert "missing" not in message


def test_shape_mismatch_is_an_error(tmp_path):
    upstream = _tiny_upstream("dino_vitb16")
    upstream["blocks.0.mlp.fc1.weight"] = torch.zeros(()).expand(100, 768)
    path = tmp_path / "wrong_shape.pth"
    torch.save(upstream, path)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.fc1\.weight.*\(100, 768\)"):
        build_encoder("dino_vitb16", weights=path)


def test_hipt_position_interpolation_is_dinos_not_timms():
    """The baked-in 256 px grid follows DINO's scale_factor=(16 + 0.1)/14 rule, which differs
    measurably from timm's size-based antialiased resampling."""
    from timm.layers import resample_abs_pos_embed

    from pipeline.embedding.checkpoints import dino_resample_pos_embed

    pos = torch.randn(1, 197, 8, generator=torch.Generator().manual_seed(0))
    ours = dino_resample_pos_embed(pos, torch.Size((1, 257, 8)))
    timm_way = resample_abs_pos_embed(pos, (16, 16), num_prefix_tokens=1)
    assert ours.shape == timm_way.shape == (1, 257, 8)
    assert torch.equal(ours[:, 0], pos[:, 0])
    assert (ours - timm_way).abs().max() > 1e-2


def test_hub_id_downloads_only_when_asked(monkeypatch, tmp_path):
    """hub_id resolves to the upstream file on the hub (faked here: tests never download)."""
    import huggingface_hub

    calls = []

    def fake_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(tmp_path / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(FileNotFoundError, match="pytorch_model.bin"):
        build_encoder("phikon", hub_id="owkin/phikon")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        build_encoder("phikon", hub_id="owkin/phikon:model.safetensors")
    with pytest.raises(ValueError, match="repo:filename"):
        build_encoder("uni", hub_id="someone/else")
    assert calls == [("owkin/phikon", "pytorch_model.bin"), ("owkin/phikon", "model.safetensors")]
