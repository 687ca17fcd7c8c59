"""CompVis state dict -> diffusers models, with diffusers' own CompVis converters.

Models are built on the meta device and receive the checkpoint tensors directly (`assign=True`):
no random initialisation, no second copy of the weights. Every step is strict: a checkpoint key
the converter leaves unused, or a model key it does not fill, is an error naming both.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from diffusers import UNet2DConditionModel, VQModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint
from torch import nn

from pipeline.models.compvis_layout import CONDITION_PREFIX, FIRST_STAGE_PREFIX, UNET_PREFIX
from pipeline.models.condition import PatchEmbeddingCondition
from pipeline.models.errors import LidFormatError
from pipeline.models.presets import unet_kwargs, vq_kwargs
from pipeline.models.lid_config import ConditionSpec, UNetSpec, VQSpec

StateDict = Mapping[str, torch.Tensor]

# diffusers' VAE converter handles KL autoencoders, which have no codebook; carried over by hand.
CODEBOOK_KEY = "quantize.embedding.weight"


def _group(state: StateDict, prefix: str) -> dict[str, torch.Tensor]:
    return {key: value for key, value in state.items() if key.startswith(prefix)}


def _check_all_used(group: StateDict, converted: StateDict, what: str, source: str) -> None:
    """Each source tensor must reappear in the output, as itself or as a view of itself."""
    used = {id(t) for t in converted.values()} | {id(t._base) for t in converted.values() if t._base is not None}
    leftovers = sorted(key for key, tensor in group.items() if id(tensor) not in used)
    if leftovers or len(converted) != len(group):
        raise LidFormatError(
            f"{source}: converting the {what} left checkpoint keys unused: {leftovers or '(key collision)'} "
            f"({len(group)} keys in, {len(converted)} out)"
        )


def _load_strict(model: nn.Module, state: StateDict, what: str, source: str) -> None:
    try:
        result = model.load_state_dict(dict(state), strict=False, assign=True)
    except RuntimeError as error:  # shape mismatches
        raise LidFormatError(
            f"{source}: the {what} weights do not fit the model built from the config: {error}"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise LidFormatError(
            f"{source}: the {what} does not match its diffusers model; missing keys: "
            f"{sorted(result.missing_keys)}, unexpected keys: {sorted(result.unexpected_keys)}"
        )
    left_on_meta = [name for name, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left_on_meta and not all(t.is_meta for t in state.values()):
        raise LidFormatError(f"{source}: the {what} has tensors the checkpoint did not fill: {left_on_meta}")
    model.eval().requires_grad_(False)


def build_unet(spec: UNetSpec, state: StateDict, source: str) -> UNet2DConditionModel:
    """LID's UNet from the `model.diffusion_model.*` tensors of a checkpoint state dict."""
    kwargs = unet_kwargs(spec)
    group = _group(state, UNET_PREFIX)
    converted = convert_ldm_unet_checkpoint(group, kwargs)
    _check_all_used(group, converted, "UNet", source)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**kwargs)
    _load_strict(unet, converted, "UNet", source)
    return unet


def build_vq(spec: VQSpec, scaling_factor: float, state: StateDict, source: str) -> VQModel:
    """LID's VQ autoencoder from the `first_stage_model.*` tensors of a checkpoint state dict."""
    kwargs = vq_kwargs(spec, scaling_factor)
    group = _group(state, FIRST_STAGE_PREFIX)
    converted = convert_ldm_vae_checkpoint(group, kwargs)
    codebook = FIRST_STAGE_PREFIX + CODEBOOK_KEY
    if codebook not in group:
        raise LidFormatError(f"{source}: the first stage has no codebook ('{codebook}' is missing)")
    converted[CODEBOOK_KEY] = group[codebook]
    _check_all_used(group, converted, "first stage", source)
    with torch.device("meta"):
        vae = VQModel(**kwargs)
    _load_strict(vae, converted, "first stage", source)
    return vae


def build_condition(spec: ConditionSpec, state: StateDict, source: str) -> PatchEmbeddingCondition:
    """The condition stage from the `cond_stage_model.*` tensors (same names, prefix removed)."""
    group = {key.removeprefix(CONDITION_PREFIX): value for key, value in _group(state, CONDITION_PREFIX).items()}
    with torch.device("meta"):
        condition = PatchEmbeddingCondition.from_spec(spec)
    _load_strict(condition, group, "condition stage", source)
    return condition
