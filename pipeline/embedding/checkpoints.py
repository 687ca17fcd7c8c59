"""Reading encoder weight files safely and converting upstream checkpoint layouts to timm keys.

Every published encoder ships its weights in its own layout (a DINO training checkpoint, a
Hugging Face ``ViTModel``, a patched timm 0.5.4 Swin, the facebookresearch DINOv2 hub files...).
A *layout* here says, for every key the timm model expects, which upstream key(s) it is made
from and how; which upstream keys are training-only and dropped; and how the file wraps its state
dict. Conversion is strict: an upstream key that is neither used nor explicitly dropped, or one
that is missing, is an error naming the keys (in the file's own naming) and the file.

Files are read with ``torch.load(weights_only=True)`` (or safetensors); arbitrary pickles are
never executed. The one class allowed beyond tensors and containers is ``argparse.Namespace``,
which DINO-style training checkpoints (HIPT's ``vit256_small_dino.pth``) store as ``args``.
"""

from __future__ import annotations

import argparse
import math
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.errors import PipelineError

Shapes = Mapping[str, torch.Size]
Combine = Callable[[list[torch.Tensor], torch.Size], torch.Tensor]


class CheckpointError(PipelineError):
    """A weights file that cannot be read or does not match the layout it is declared to have."""


# ----------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------

def read_checkpoint(path: str | Path) -> Any:
    """The object stored in a weights file: safetensors, or a weights-only ``torch.load``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as error:  # noqa: BLE001 - re-raised with the file named
            raise CheckpointError(f"{path}: not a readable safetensors file ({error})") from error
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as error:
        raise CheckpointError(
            f"{path}: cannot be read with torch.load(weights_only=True) ({error}). Only tensors, "
            "plain containers and argparse.Namespace are accepted; arbitrary pickles are never "
            "executed. Re-save the state dict with torch.save(state_dict) or as .safetensors from "
            "a trusted environment.") from error


# ----------------------------------------------------------------------------------------------
# Tensor transforms used by the layouts
# ----------------------------------------------------------------------------------------------

def _take(tensors: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    return tensors[0]


def _concat_rows(tensors: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Hugging Face's separate query/key/value projections -> timm's fused qkv (q, k, v order)."""
    return torch.cat(tensors, dim=0)


def _square_side(count: int, what: str) -> int:
    side = math.isqrt(count)
    if side * side != count:
        raise CheckpointError(f"{what}: {count} position tokens do not form a square grid")
    return side


def dino_resample_pos_embed(pos_embed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """DINO/HIPT ``interpolate_pos_encoding``: class token kept, patch grid resized bicubically
    with ``scale_factor = (grid + 0.1) / old_grid`` (no antialias), exactly as the original
    ``vision_transformer.py`` does at every forward on a non-224 input (HIPT runs it at 256 px).
    Baking it in at load time gives the same numbers once instead of per batch."""
    if pos_embed.shape == shape:
        return pos_embed
    dim = pos_embed.shape[-1]
    old = _square_side(pos_embed.shape[1] - 1, "pos_embed")
    new = _square_side(shape[1] - 1, "target pos_embed")
    grid = pos_embed[:, 1:].reshape(1, old, old, dim).permute(0, 3, 1, 2)
    scale = (new + 0.1) / old
    grid = F.interpolate(grid.float(), scale_factor=(scale, scale), mode="bicubic", align_corners=False)
    if tuple(grid.shape[-2:]) != (new, new):  # pragma: no cover - guarded by the +0.1 offset
        raise CheckpointError(f"pos_embed resampled to {tuple(grid.shape[-2:])}, expected {new}x{new}")
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, dim).to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], grid], dim=1)


def _dinov2_cls_token(tensors: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """DINOv2 adds ``pos_embed[:, 0]`` (never interpolated) to the class token; timm's
    ``no_embed_class`` model has no class position, so it is folded into the token."""
    cls_token, pos_embed = tensors
    return cls_token + pos_embed[:, :1]


def _dinov2_patch_pos_embed(tensors: list[torch.Tensor], shape: torch.Size) -> torch.Tensor:
    """Patch part of DINOv2's position embedding resized to the model's grid the way the
    facebookresearch ``*_reg`` hub models do at run time (``interpolate_antialias=True``,
    ``interpolate_offset=0``: bicubic to an explicit size, antialiased, in float32)."""
    patch = tensors[0][:, 1:]
    if patch.shape == shape:
        return patch
    dim = patch.shape[-1]
    old = _square_side(patch.shape[1], "pos_embed")
    new = _square_side(shape[1], "target pos_embed")
    grid = patch.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=True)
    return grid.permute(0, 2, 3, 1).reshape(1, new * new, dim).to(patch.dtype)


# ----------------------------------------------------------------------------------------------
# Layouts
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    sources: tuple[str, ...]
    combine: Combine = _take


@dataclass(frozen=True)
class Layout:
    name: str
    description: str
    containers: tuple[str, ...]                 # keys the state dict may be wrapped under
    rename: Callable[[str], str]                # upstream key -> normalised upstream key
    dropped: Callable[[str], bool]              # normalised upstream keys that are training-only
    rule: Callable[[str], Rule]                 # timm key -> where it comes from


def _identity(key: str) -> str:
    return key


def _nothing(key: str) -> bool:
    return False


def _same_key(key: str) -> Rule:
    return Rule((key,))


def _strip_prefixes(key: str, prefixes: tuple[str, ...]) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in prefixes:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


# HIPT vit256 (DINO training checkpoint): model under "teacher", `module.`/`backbone.` prefixes,
# DINO projection head `head.*` dropped; 224-px position grid resampled to 256 px DINO-style.
def _hipt_rule(key: str) -> Rule:
    if key == "pos_embed":
        return Rule(("pos_embed",), lambda t, shape: dino_resample_pos_embed(t[0], shape))
    return Rule((key,))


HIPT_DINO = Layout(
    name="dino_teacher",
    description="DINO training checkpoint (HIPT vit256_small_dino.pth): state dict under 'teacher', "
                "'module.'/'backbone.' prefixes, DINO head 'head.*' dropped, pos_embed resampled "
                "with DINO's interpolate_pos_encoding to the model's grid",
    containers=("teacher",),
    rename=lambda key: _strip_prefixes(key, ("module.", "backbone.")),
    dropped=lambda key: key.startswith("head."),
    rule=_hipt_rule,
)

# Hugging Face transformers ViTModel (Phikon).
_HF_BLOCK = {
    "norm1": "layernorm_before",
    "attn.proj": "attention.output.dense",
    "norm2": "layernorm_after",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_HF_TOP = {
    "cls_token": "embeddings.cls_token",
    "pos_embed": "embeddings.position_embeddings",
    "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
    "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
    "norm.weight": "layernorm.weight",
    "norm.bias": "layernorm.bias",
}
_TIMM_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)\.(weight|bias)$")


def _hf_vit_rule(key: str) -> Rule:
    if key in _HF_TOP:
        return Rule((_HF_TOP[key],))
    match = _TIMM_BLOCK_KEY.fullmatch(key)
    if match:
        index, module, kind = match.groups()
        layer = f"encoder.layer.{index}"
        if module == "attn.qkv":
            return Rule(tuple(f"{layer}.attention.attention.{part}.{kind}" for part in ("query", "key", "value")),
                        _concat_rows)
        if module in _HF_BLOCK:
            return Rule((f"{layer}.{_HF_BLOCK[module]}.{kind}",))
    raise KeyError(f"no Hugging Face ViT equivalent for timm key {key!r}")


HF_VIT = Layout(
    name="hf_vit",
    description="Hugging Face transformers ViTModel state dict (.bin or .safetensors): split "
                "query/key/value fused into qkv; 'pooler.*' and 'embeddings.mask_token' dropped",
    containers=(),
    rename=lambda key: _strip_prefixes(key, ("vit.",)),
    dropped=lambda key: key.startswith("pooler.") or key == "embeddings.mask_token",
    rule=_hf_vit_rule,
)

# CTransPath: patched timm 0.5.4 Swin-T with ConvStem; downsample at the END of stage i there,
# at the START of stage i + 1 in current timm. Buffers of the old implementation are dropped.
_DOWNSAMPLE = re.compile(r"layers\.(\d+)\.downsample\.(.+)$")


def _swin_old_rule(key: str) -> Rule:
    match = _DOWNSAMPLE.fullmatch(key)
    if match:
        stage, rest = int(match.group(1)), match.group(2)
        return Rule((f"layers.{stage - 1}.downsample.{rest}",))
    return Rule((key,))


CTRANSPATH = Layout(
    name="timm054_swin_convstem",
    description="CTransPath ctranspath.pth: state dict under 'model' from TransPath's patched timm "
                "0.5.4 Swin-T (ConvStem patch_embed.proj.0-6, PatchMerging at the end of each "
                "stage, head Identity); relative_position_index/attn_mask buffers dropped",
    containers=("model",),
    rename=_identity,
    dropped=lambda key: key.endswith(".relative_position_index") or key.endswith(".attn_mask"),
    rule=_swin_old_rule,
)

# Plain timm-named state dicts (DINO's released backbones, UNI's pytorch_model.bin).
TIMM = Layout(
    name="timm",
    description="plain state dict with timm VisionTransformer names (no wrapper, no head)",
    containers=(),
    rename=_identity,
    dropped=_nothing,
    rule=_same_key,
)


# DINOv2 (facebookresearch hub files, e.g. dinov2_vitl14_reg4_pretrain.pth).
def _dinov2_rule(key: str) -> Rule:
    if key == "cls_token":
        return Rule(("cls_token", "pos_embed"), _dinov2_cls_token)
    if key == "pos_embed":
        return Rule(("pos_embed",), _dinov2_patch_pos_embed)
    if key == "reg_token":
        return Rule(("register_tokens",))
    return Rule((key,))


DINOV2 = Layout(
    name="dinov2",
    description="facebookresearch/dinov2 hub state dict: 'register_tokens' -> reg_token, class "
                "position folded into cls_token, patch positions (37x37 at 518 px) resampled to the "
                "model grid as the *_reg hub models do, 'mask_token' dropped, chunked "
                "'blocks.C.N.' accepted",
    containers=(),
    rename=lambda key: re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key),
    dropped=lambda key: key == "mask_token",
    rule=_dinov2_rule,
)

LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (HIPT_DINO, HF_VIT, CTRANSPATH, TIMM, DINOV2)}


# ----------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------

def _short(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def unwrap_state_dict(raw: Any, layout: Layout, path: str | Path) -> dict[str, torch.Tensor]:
    """The tensor dict inside a file's object (e.g. under 'teacher' or 'model')."""
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: expected a state dict (mapping), found {type(raw).__name__}")
    for container in layout.containers:
        if container in raw:
            raw = raw[container]
            break
    if not isinstance(raw, Mapping):
        raise CheckpointError(f"{path}: expected a state dict under {layout.containers}, found {type(raw).__name__}")
    not_tensors = [str(k) for k, v in raw.items() if not isinstance(v, torch.Tensor)]
    if not_tensors:
        wrappers = f" (state dict expected under one of {list(layout.containers)})" if layout.containers else ""
        raise CheckpointError(f"{path}: entries that are not tensors: {_short(not_tensors)}{wrappers}")
    return dict(raw)


def convert_state_dict(raw: Any, layout_name: str, expected: Shapes, path: str | Path) -> dict[str, torch.Tensor]:
    """Upstream checkpoint object -> state dict with exactly the keys and shapes in ``expected``.

    Raises CheckpointError naming missing upstream keys, unexpected upstream keys, or shape
    mismatches, and the file."""
    layout = LAYOUTS[layout_name]
    state: dict[str, torch.Tensor] = {}
    original: dict[str, str] = {}
    for key, tensor in unwrap_state_dict(raw, layout, path).items():
        name = layout.rename(key)
        if name in state:
            raise CheckpointError(f"{path}: keys {original[name]!r} and {key!r} both map to {name!r}")
        state[name], original[name] = tensor, key

    converted: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    used: set[str] = set()
    origin: dict[str, tuple[str, ...]] = {}
    for target, shape in expected.items():
        rule = layout.rule(target)
        origin[target] = rule.sources
        absent = [source for source in rule.sources if source not in state]
        used.update(source for source in rule.sources if source in state)
        if absent:
            missing.extend(s for s in absent if s not in missing)
            continue
        try:
            converted[target] = rule.combine([state[s] for s in rule.sources], shape)
        except CheckpointError as error:
            raise CheckpointError(f"{path}: {target}: {error}") from error
        except (RuntimeError, ValueError) as error:
            raise CheckpointError(f"{path}: cannot build {target!r} from {list(rule.sources)}: {error}") from error
    unexpected = [original[key] for key in state if key not in used and not layout.dropped(key)]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short(unexpected)}")
        raise CheckpointError(f"{path}: does not match the {layout.name!r} checkpoint layout "
                              f"({layout.description}); " + "; ".join(parts))
    wrong = [f"{k} (from {', '.join(origin[k])}): {tuple(v.shape)} from the file (after conversion), {tuple(expected[k])} in the model"
             for k, v in converted.items() if v.shape != expected[k]]
    if wrong:
        raise CheckpointError(f"{path}: shape mismatch for {len(wrong)} tensors: " + "; ".join(wrong[:10]))
    return converted
