"""Read LID's CompVis `*-project.yaml` as plain data.

The YAML names Python classes (`target:`), but nothing here imports or instantiates them: each
`target` is only compared with the LID classes this package re-implements, and only numbers,
lists and flags are read. Architecture options LID exposes but never used are accepted only
at their default, so a config that would build a different network fails loudly instead of
loading into the wrong one. Only the `model` section is read; `data` and `lightning` (training
set-up) are ignored.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pipeline.models.errors import LidFormatError

# Where in the config a `target` may appear, and which LID classes it may name there.
KNOWN_TARGETS: dict[str, frozenset[str]] = {
    "model": frozenset({"ldm.models.diffusion.ddpm.LatentDiffusion"}),
    "model.params.unet_config": frozenset({"ldm.modules.diffusionmodules.openaimodel.UNetModel"}),
    "model.params.first_stage_config": frozenset(
        {"ldm.models.autoencoder.VQModelInterface", "ldm.models.autoencoder.VQModel"}
    ),
    "model.params.first_stage_config.params.lossconfig": frozenset({"torch.nn.Identity"}),
    "model.params.cond_stage_config": frozenset({"ldm.modules.encoders.modules.PatchEmbedder"}),
    "model.params.scheduler_config": frozenset({"ldm.lr_scheduler.LambdaLinearScheduler"}),
}

_REQUIRED = object()


@dataclass(frozen=True)
class UNetSpec:
    """LID's UNet (CompVis `UNetModel` with a spatial transformer), as numbers."""

    in_channels: int
    out_channels: int
    model_channels: int
    channel_mult: tuple[int, ...]
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]  # downsampling factors (1, 2, 4, ...) with attention
    num_heads: int  # -1 when num_head_channels sets the heads per level
    num_head_channels: int  # -1 when num_heads is fixed
    transformer_depth: int
    context_dim: int
    image_size: int  # latent side length

    def heads_at(self, channels: int) -> int:
        """Attention heads of a transformer with `channels` channels (LID's legacy rule)."""
        if self.num_head_channels != -1:
            return channels // self.num_head_channels
        return self.num_heads


@dataclass(frozen=True)
class VQSpec:
    """LID's first stage (CompVis `VQModelInterface`: Encoder, codebook, Decoder)."""

    embed_dim: int  # codebook vector size = latent channels seen by the UNet
    n_embed: int  # codebook entries
    z_channels: int
    in_channels: int
    out_channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    resolution: int


@dataclass(frozen=True)
class ConditionSpec:
    """LID's `PatchEmbedder`: optional L2 normalisation, then one Linear layer."""

    patch_embed_dim: int
    target_dim: int
    normalize_ssl: bool


@dataclass(frozen=True)
class ScheduleSpec:
    """CompVis "linear" schedule: betas = linspace(sqrt(start), sqrt(end), timesteps) ** 2."""

    timesteps: int
    linear_start: float
    linear_end: float


@dataclass(frozen=True)
class LidConfig:
    unet: UNetSpec
    vq: VQSpec
    condition: ConditionSpec
    schedule: ScheduleSpec
    scale_factor: float  # latent scale of the LDM; LID's models use 1.0
    scale_by_std: bool  # if true, the checkpoint's `scale_factor` buffer is authoritative
    source: str  # the file (or preset name) it was read from, for error messages


class _Params:
    """One mapping of the YAML, read key by key so that errors name the file and the key path."""

    def __init__(self, data: Any, path: str, source: str) -> None:
        if not isinstance(data, Mapping):
            raise LidFormatError(f"{source}: '{path}' must be a mapping, got {type(data).__name__}")
        self.data, self.path, self.source = data, path, source

    def _fail(self, key: str, reason: str) -> LidFormatError:
        return LidFormatError(f"{self.source}: '{self.path}.{key}' {reason}")

    def _get(self, key: str, default: Any) -> Any:
        if key in self.data:
            return self.data[key]
        if default is _REQUIRED:
            raise self._fail(key, "is missing")
        return default

    def int(self, key: str, default: Any = _REQUIRED) -> int:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self._fail(key, f"must be an integer, got {value!r}")
        return value

    def float(self, key: str, default: Any = _REQUIRED) -> float:
        value = self._get(key, default)
        if isinstance(value, str):  # PyYAML reads "1.e-4"-style numbers as strings
            try:
                value = float(value)
            except ValueError:
                raise self._fail(key, f"must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self._fail(key, f"must be a number, got {value!r}")
        return float(value)

    def bool(self, key: str, default: Any = _REQUIRED) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise self._fail(key, f"must be true or false, got {value!r}")
        return value

    def int_list(self, key: str) -> tuple[int, ...]:
        value = self._get(key, _REQUIRED)
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise self._fail(key, f"must be a list of integers, got {value!r}")
        return tuple(value)

    def section(self, key: str) -> _Params:
        return _Params(self._get(key, _REQUIRED), f"{self.path}.{key}", self.source)

    def require(self, key: str, supported: Any, default: Any) -> None:
        """Accept an option only at the one value this package implements."""
        value = self._get(key, default)
        if value != supported:
            raise self._fail(key, f"is {value!r}; only {supported!r} is supported (LID's models use it)")

    def reject_unknown(self, known: set[str]) -> None:
        unknown = sorted(set(self.data) - known)
        if unknown:
            raise LidFormatError(f"{self.source}: unknown keys under '{self.path}': {unknown}")


def _targets(node: Any, path: str) -> Iterator[tuple[str, Any]]:
    """Every (mapping path, target value) in a YAML subtree."""
    if isinstance(node, Mapping):
        if "target" in node:
            yield path, node["target"]
        for key, child in node.items():
            yield from _targets(child, f"{path}.{key}")
    elif isinstance(node, list):
        for index, child in enumerate(node):
            yield from _targets(child, f"{path}[{index}]")


def check_targets(model_section: Any, source: str) -> None:
    """Compare every `target:` under `model` with the LID classes known at that place."""
    for path, target in _targets(model_section, "model"):
        allowed = KNOWN_TARGETS.get(path, frozenset())
        if target not in allowed:
            expected = sorted(allowed) if allowed else "no target at this place"
            raise LidFormatError(
                f"{source}: unknown target {target!r} at '{path}.target'; known LID targets here: {expected}"
            )


# UNetModel options with no effect on the weights or the float32 forward pass.
_UNET_IGNORED = {
    "use_checkpoint", "use_fp16", "use_bf16", "dropout", "ckpt_path", "ignore_keys",
    "num_heads_upsample", "use_new_attention_order",  # only used by the non-transformer AttentionBlock
}
# UNetModel options accepted only at their default: (supported value, default when absent).
_UNET_FIXED = {
    "use_spatial_transformer": (True, False), "conv_resample": (True, True), "dims": (2, 2),
    "num_classes": (None, None), "use_scale_shift_norm": (False, False), "resblock_updown": (False, False),
    "n_embed": (None, None), "legacy": (True, True), "disable_self_attentions": (None, None),
    "num_attention_blocks": (None, None), "disable_middle_self_attn": (False, False),
    "use_linear_in_transformer": (False, False), "adm_in_channels": (None, None),
}


def _parse_unet(p: _Params, latent_size: int) -> UNetSpec:
    numbers = {"in_channels", "out_channels", "model_channels", "channel_mult", "num_res_blocks",
               "attention_resolutions", "num_heads", "num_head_channels", "transformer_depth",
               "context_dim", "image_size"}
    p.reject_unknown(numbers | _UNET_IGNORED | set(_UNET_FIXED))
    for key, (supported, default) in _UNET_FIXED.items():
        p.require(key, supported, default)
    spec = UNetSpec(
        in_channels=p.int("in_channels"),
        out_channels=p.int("out_channels"),
        model_channels=p.int("model_channels"),
        channel_mult=p.int_list("channel_mult"),
        num_res_blocks=p.int("num_res_blocks"),
        attention_resolutions=p.int_list("attention_resolutions"),
        num_heads=p.int("num_heads", -1),
        num_head_channels=p.int("num_head_channels", -1),
        transformer_depth=p.int("transformer_depth", 1),
        context_dim=p.int("context_dim"),
        image_size=p.int("image_size", latent_size),
    )
    if spec.num_heads == -1 and spec.num_head_channels == -1:
        raise LidFormatError(f"{p.source}: '{p.path}' sets neither num_heads nor num_head_channels")
    return spec


_VQ_IGNORED = {"ckpt_path", "ignore_keys", "image_key", "monitor", "lossconfig", "sane_index_shape",
               "batch_resize_range", "scheduler_config", "lr_g_factor"}
_DD_IGNORED = {"dropout"}
_DD_FIXED = {"double_z": (False, True), "attn_resolutions": ([], _REQUIRED), "resamp_with_conv": (True, True),
             "give_pre_end": (False, False), "tanh_out": (False, False), "use_linear_attn": (False, False),
             "attn_type": ("vanilla", "vanilla")}


def _parse_vq(p: _Params) -> VQSpec:
    p.reject_unknown({"embed_dim", "n_embed", "ddconfig", "remap", "colorize_nlabels", "use_ema"} | _VQ_IGNORED)
    p.require("use_ema", False, False)
    p.require("remap", None, None)
    p.require("colorize_nlabels", None, None)
    dd = p.section("ddconfig")
    numbers = {"z_channels", "resolution", "in_channels", "out_ch", "ch", "ch_mult", "num_res_blocks"}
    dd.reject_unknown(numbers | _DD_IGNORED | set(_DD_FIXED))
    for key, (supported, default) in _DD_FIXED.items():
        dd.require(key, supported, default)
    return VQSpec(
        embed_dim=p.int("embed_dim"),
        n_embed=p.int("n_embed"),
        z_channels=dd.int("z_channels"),
        in_channels=dd.int("in_channels"),
        out_channels=dd.int("out_ch"),
        ch=dd.int("ch"),
        ch_mult=dd.int_list("ch_mult"),
        num_res_blocks=dd.int("num_res_blocks"),
        resolution=dd.int("resolution"),
    )


def _parse_condition(p: _Params) -> ConditionSpec:
    p.reject_unknown({"patch_ssl_key", "patch_embed_dim", "target_dim", "normalize_ssl"})
    # Defaults are those of LID's PatchEmbedder (its NAIP config relies on them).
    return ConditionSpec(
        patch_embed_dim=p.int("patch_embed_dim", 768),
        target_dim=p.int("target_dim", 512),
        normalize_ssl=p.bool("normalize_ssl", False),
    )


def parse_lid_config(raw: Any, source: str) -> LidConfig:
    """Turn a loaded LID config (the YAML as dicts and lists) into a LidConfig."""
    if not isinstance(raw, Mapping) or "model" not in raw:
        raise LidFormatError(f"{source}: not a CompVis latent-diffusion config (no top-level 'model')")
    check_targets(raw["model"], source)
    model = _Params(raw["model"], "model", source).section("params")
    # Training-only keys of LatentDiffusion are ignored; these change what inference computes.
    model.require("parameterization", "eps", "eps")
    model.require("beta_schedule", "linear", "linear")
    model.require("given_betas", None, None)
    model.require("conditioning_key", "crossattn", None)
    model.require("use_ema", False, True)
    model.require("learn_logvar", False, False)
    model.require("use_positional_encodings", False, False)
    config = LidConfig(
        unet=_parse_unet(model.section("unet_config").section("params"), model.int("image_size", 64)),
        vq=_parse_vq(model.section("first_stage_config").section("params")),
        condition=_parse_condition(model.section("cond_stage_config").section("params")),
        schedule=ScheduleSpec(
            timesteps=model.int("timesteps", 1000),
            linear_start=model.float("linear_start", 1e-4),
            linear_end=model.float("linear_end", 2e-2),
        ),
        scale_factor=model.float("scale_factor", 1.0),
        scale_by_std=model.bool("scale_by_std", False),
        source=source,
    )
    _check_consistent(config)
    return config


def _check_consistent(config: LidConfig) -> None:
    unet, vq, cond = config.unet, config.vq, config.condition
    if unet.in_channels != vq.embed_dim or unet.out_channels != vq.embed_dim:
        raise LidFormatError(
            f"{config.source}: UNet in/out channels ({unet.in_channels}/{unet.out_channels}) "
            f"differ from the first stage's embed_dim ({vq.embed_dim})"
        )
    if unet.context_dim != cond.target_dim:
        raise LidFormatError(
            f"{config.source}: UNet context_dim {unet.context_dim} differs from the condition "
            f"stage's target_dim {cond.target_dim}"
        )


def read_lid_config(path: Path) -> LidConfig:
    """Parse a LID `*-project.yaml` with yaml.safe_load (no Python objects are constructed)."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise LidFormatError(f"{path}: not valid YAML ({error})") from None
    return parse_lid_config(raw, str(path))
