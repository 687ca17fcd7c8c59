"""The first-stage autoencoder of the latent diffusion model (a diffusers VQModel or AutoencoderKL)
with where its weights came from, as the latents stage loads it.

Sources, all loaded without any download:

- ``vq``: LID's VQ autoencoder (CompVis VQ-f4: 3 latent channels, 8192 codes, 128*[1,2,4]
  channels, scale 1.0), either from a LID release folder (``configs/*-project.yaml`` +
  ``checkpoints/last.ckpt``) or from a CompVis first-stage checkpoint (``vq-f4/model.ckpt``, keys
  without the ``first_stage_model.`` prefix; its ``loss.*`` tensors are dropped). Both go through
  :func:`pipeline.models.convert.build_vq`, the LID loader's strict converter.
- ``kl``: a KL autoencoder (sd-vae-ft-mse layout: f8, 4 channels, scale 0.18215) from a local
  diffusers folder (``config.json`` + weights) or a single ``.safetensors`` file in diffusers or
  CompVis/Stable-Diffusion key layout.
- ``trained``: an autoencoder this pipeline trained (``pipeline train-autoencoder``): a diffusers
  VQModel or AutoencoderKL folder (``config.json``, safetensors, ``provenance.json``), given as that
  folder or as the stage's output folder ``OUT/autoencoder/<dataset>`` (its ``model/``). The class
  comes from ``config.json``'s ``_class_name`` through :data:`TRAINED_CLASSES`, an explicit table.
- ``random``: small randomly initialised VQ models for demos and tests. They give latents of the
  right shape and nothing else; they are refused unless ``allow_random_weights`` is set, and every
  output written with them records ``random_weights: true``.

Latents are stored *scaled* (``latent = encode(x) * scaling_factor``), so the diffusion model sees
them as they are and ``decode`` divides the factor out again. LID's VQ models use 1.0; the KL
autoencoder's mean (not a sample of its posterior) is stored, as is usual for precomputed latents.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, VQModel
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

from pipeline.errors import PipelineError
from pipeline.models import first_stage
from pipeline.models.compvis_layout import FIRST_STAGE_PREFIX
from pipeline.models.convert import build_vq
from pipeline.models.errors import LidFormatError
from pipeline.models.presets import LID_FULL_SIZE, vq_kwargs
from pipeline.models.lid_config import VQSpec, read_lid_config
from pipeline.models.lid_release import CHECKPOINT_NAME, check_schedule, find_config, read_state_dict

# CompVis VQ-f4 (LID's first stage) as numbers: LID's full-size preset holds it.
VQ_F4: VQSpec = LID_FULL_SIZE.vq

# Stable Diffusion's KL autoencoder (stabilityai/sd-vae-ft-mse, its config.json).
SD_VAE_FT_MSE_KWARGS: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4,
    "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}

# Random-weight presets: (VQSpec, GroupNorm groups). Narrow enough that encoding a 256x256 patch
# takes a few tens of milliseconds on one CPU core; same block structure as VQ-f4 otherwise.
RANDOM_PRESETS: dict[str, tuple[VQSpec, int]] = {
    # f4 -> 3x64x64 latents from 256x256 patches, like VQ-f4.
    "tiny-vq-f4": (VQSpec(embed_dim=3, n_embed=256, z_channels=3, in_channels=3, out_channels=3,
                          ch=8, ch_mult=(1, 2, 2), num_res_blocks=1, resolution=256), 4),
    # f8 -> 3x32x32 latents: lets CPU tests train a diffusion model in seconds.
    "tiny-vq-f8": (VQSpec(embed_dim=3, n_embed=256, z_channels=3, in_channels=3, out_channels=3,
                          ch=8, ch_mult=(1, 2, 2, 2), num_res_blocks=1, resolution=256), 4),
    # f16 -> 3x16x16 latents: the cheapest preset for CPU training tests.
    "tiny-vq-f16": (VQSpec(embed_dim=3, n_embed=256, z_channels=3, in_channels=3, out_channels=3,
                           ch=8, ch_mult=(1, 2, 2, 2, 2), num_res_blocks=1, resolution=256), 4),
}


# A trained folder's config.json `_class_name` -> (class, kind): nothing else is instantiated.
TRAINED_CLASSES: dict[str, tuple[type, str]] = {"VQModel": (VQModel, "vq"), "AutoencoderKL": (AutoencoderKL, "kl")}
TRAINED_MODEL_DIR = "model"  # pipeline.autoencoder.outputs.MODEL_DIR
TRAINED_PROVENANCE = "provenance.json"  # pipeline.autoencoder.outputs.PROVENANCE_FILE


class RandomWeightsError(PipelineError):
    """A random-weight autoencoder was requested without allow_random_weights."""


def weights_sha256(model: torch.nn.Module) -> str:
    """Hash of every tensor of the state dict (name, dtype, shape, bytes), in key order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


@dataclass
class Autoencoder:
    """A diffusers VQModel or AutoencoderKL, its kind and the provenance of its weights."""

    model: VQModel | AutoencoderKL
    kind: str  # "vq" | "kl"
    source: str  # where the weights came from (path or preset name)
    random_weights: bool = False
    provenance: dict[str, Any] | None = None  # trained kind: what it was trained on (provenance.json)
    _sha256: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.kind not in ("vq", "kl"):
            raise ValueError(f"autoencoder kind must be 'vq' or 'kl', got {self.kind!r}")
        self.model.eval().requires_grad_(False)

    @property
    def scaling_factor(self) -> float:
        return float(self.model.config.scaling_factor)

    @property
    def in_channels(self) -> int:
        return int(self.model.config.in_channels)

    @property
    def latent_channels(self) -> int:
        return first_stage.latent_channels(self.model)

    @property
    def downsampling_factor(self) -> int:
        return first_stage.downsampling_factor(self.model)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def weights_sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = weights_sha256(self.model)
        return self._sha256

    def to(self, device: torch.device | str) -> Autoencoder:
        self.model.to(device)
        return self

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1], (B, C, H, W) -> scaled latents (B, c, H/f, W/f), float32.

        VQ: unquantised ``quant_conv(encoder(x))`` as LID; KL: the posterior mean.
        """
        return first_stage.encode_latents(self.model, images)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images in about [-1, 1]; VQ latents are quantised first, as LID does."""
        return first_stage.decode_latents(self.model, latents)

    def record(self) -> dict[str, Any]:
        """What identifies the latents it produces (written into shard metadata and manifests)."""
        record = {
            "kind": self.kind,
            "class": type(self.model).__name__,
            "source": self.source,
            "weights_sha256": self.weights_sha256,
            "random_weights": bool(self.random_weights),
            "scaling_factor": self.scaling_factor,
            "latent_channels": self.latent_channels,
            "downsampling_factor": self.downsampling_factor,
        }
        if self.provenance is not None:
            record["trained"] = {k: self.provenance[k] for k in ("dataset", "steps", "seed", "heldout_psnr")
                                 if k in self.provenance}
        return record


# --- builders ------------------------------------------------------------------------------------


def vq_from_lid_release(folder: str | Path) -> Autoencoder:
    """The VQ first stage of a LID release folder (only the first-stage tensors are converted)."""
    folder = Path(folder)
    config = read_lid_config(find_config(folder))
    checkpoint = folder / CHECKPOINT_NAME
    state = {k: v.float() if v.is_floating_point() else v for k, v in read_state_dict(checkpoint).items()}
    scale = check_schedule(config, state, str(checkpoint)) if "betas" in state else config.scale_factor
    vae = build_vq(config.vq, scale, state, str(checkpoint))
    return Autoencoder(vae, "vq", str(folder))


def vq_from_compvis_checkpoint(path: str | Path, spec: VQSpec = VQ_F4, scaling_factor: float = 1.0) -> Autoencoder:
    """A CompVis first-stage checkpoint (e.g. ``vq-f4/model.ckpt``) with the architecture ``spec``.

    Its ``loss.*`` tensors (discriminator, LPIPS) are not part of the autoencoder and are dropped;
    everything else must convert without leftovers (the LID loader's strict converter).
    """
    path = Path(path)
    state = read_state_dict(path)
    state = {k.removeprefix(FIRST_STAGE_PREFIX): v for k, v in state.items() if not k.startswith("loss.")}
    prefixed = {FIRST_STAGE_PREFIX + k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    return Autoencoder(build_vq(spec, scaling_factor, prefixed, str(path)), "vq", str(path))


def _load_kl_state(model: AutoencoderKL, state: dict[str, torch.Tensor], source: str) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise LidFormatError(
            f"{source}: not a KL autoencoder of the sd-vae-ft-mse layout; missing keys: "
            f"{sorted(result.missing_keys)[:10]}, unexpected keys: {sorted(result.unexpected_keys)[:10]}"
        )


def kl_from_local(path: str | Path, kwargs: dict[str, Any] | None = None) -> Autoencoder:
    """A KL autoencoder from a local diffusers folder or a ``.safetensors`` file (never downloads).

    A single file may use diffusers keys (``encoder.down_blocks.*``) or CompVis/SD keys
    (``encoder.down.*``, optionally prefixed ``first_stage_model.``/``vae.``); the latter are
    converted with diffusers' own converter. ``kwargs`` default to sd-vae-ft-mse's config.
    """
    path = Path(path)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise LidFormatError(f"{path}: not a diffusers model folder (no config.json)")
        model = AutoencoderKL.from_pretrained(path, local_files_only=True)
        return Autoencoder(model, "kl", str(path))
    if path.suffix != ".safetensors" or not path.is_file():
        raise LidFormatError(f"{path}: expected a diffusers folder or a .safetensors file")
    from safetensors.torch import load_file

    kwargs = dict(SD_VAE_FT_MSE_KWARGS if kwargs is None else kwargs)
    state = {k: v.float() for k, v in load_file(path).items()}
    if not any(k.startswith("encoder.down_blocks.") for k in state):
        state = convert_ldm_vae_checkpoint(state, kwargs)
    model = AutoencoderKL(**kwargs)
    _load_kl_state(model, state, str(path))
    return Autoencoder(model, "kl", str(path))


def trained_from_folder(path: str | Path) -> Autoencoder:
    """An autoencoder the pipeline trained: its diffusers folder, or the stage folder holding it."""
    import json

    path = Path(path)
    folder = path / TRAINED_MODEL_DIR if (path / TRAINED_MODEL_DIR / "config.json").is_file() else path
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise LidFormatError(f"{path}: not a trained autoencoder (no config.json, nor {TRAINED_MODEL_DIR}/config.json)")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except ValueError as exc:
        raise LidFormatError(f"{config_file}: cannot read: {exc}") from exc
    if class_name not in TRAINED_CLASSES:
        raise LidFormatError(f"{config_file}: _class_name {class_name!r}, expected one of {sorted(TRAINED_CLASSES)}")
    cls, kind = TRAINED_CLASSES[class_name]
    model = cls.from_pretrained(folder, local_files_only=True, use_safetensors=True)
    provenance_file = folder / TRAINED_PROVENANCE
    provenance = json.loads(provenance_file.read_text()) if provenance_file.is_file() else {}
    return Autoencoder(model, kind, str(folder), provenance=provenance)


def random_vq(preset: str = "tiny-vq-f4", seed: int = 0, allow_random_weights: bool = False) -> Autoencoder:
    """A small randomly initialised VQ autoencoder (demo/tests only; flagged random_weights)."""
    if not allow_random_weights:
        raise RandomWeightsError(
            f"autoencoder preset {preset!r} has random weights; its latents carry no learned meaning. "
            "Set allow_random_weights to use it for demos and tests."
        )
    if preset not in RANDOM_PRESETS:
        raise PipelineError(f"unknown random autoencoder preset {preset!r}; known: {sorted(RANDOM_PRESETS)}")
    spec, groups = RANDOM_PRESETS[preset]
    kwargs = vq_kwargs(spec, 1.0) | {"norm_num_groups": groups}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = VQModel(**kwargs)
        # diffusers initialises the codebook uniformly in +-1/n; spread it like real latents instead,
        # so that quantising on decode actually picks different codes.
        torch.nn.init.normal_(model.quantize.embedding.weight, std=0.5)
    return Autoencoder(model, "vq", f"random:{preset}:seed={seed}", random_weights=True)


@dataclass(frozen=True)
class AutoencoderSettings:
    """The config's `latents.autoencoder:` table."""

    kind: str = "lid"  # lid | compvis-vq | kl | trained | random
    path: str | None = None  # trained: the workflow fills in OUT/autoencoder/<dataset> when only `dataset` is given
    dataset: str | None = None  # trained: whose autoencoder stage
    preset: str | None = None  # random kind: tiny-vq-f4 | tiny-vq-f8 | tiny-vq-f16
    allow_random_weights: bool = False

    def load(self) -> Autoencoder:
        if self.kind == "trained" and self.path is None:
            raise PipelineError(f"latents.autoencoder: kind 'trained' (dataset {self.dataset!r}) needs the folder "
                                "of the trained autoencoder as `path` (the workflow gives OUT/autoencoder/<dataset>)")
        return load_autoencoder(self.kind, self.path, preset=self.preset, allow_random_weights=self.allow_random_weights)


def load_autoencoder(kind: str, path: str | Path | None = None, *, preset: str | None = None,
                     seed: int = 0, allow_random_weights: bool = False) -> Autoencoder:
    """One entry point for configs: kind = lid | compvis-vq | kl | trained | random."""
    if kind == "random":
        return random_vq(preset or "tiny-vq-f4", seed, allow_random_weights)
    if path is None:
        raise PipelineError(f"autoencoder kind {kind!r} needs a path")
    if kind == "lid":
        return vq_from_lid_release(path)
    if kind == "compvis-vq":
        return vq_from_compvis_checkpoint(path)
    if kind == "kl":
        return kl_from_local(path)
    if kind == "trained":
        return trained_from_folder(path)
    raise PipelineError(f"unknown autoencoder kind {kind!r} (lid | compvis-vq | kl | trained | random)")
