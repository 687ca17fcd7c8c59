"""Registry of the self-supervised patch encoders the diffusion models are conditioned on.

Each entry is plain data (:class:`EncoderSpec`): the timm architecture and its constructor
arguments, how a 256x256 patch is turned into the encoder's input, which token is the embedding,
and the layout of the upstream weights file. :func:`build_encoder` builds the network with
``timm.create_model`` (never ``pretrained=True``: nothing is downloaded unless a ``hub_id`` is
passed explicitly), loads a local upstream checkpoint strictly through
:mod:`pipeline.embedding.checkpoints`, and wraps it in an :class:`Encoder` that records what
produced the embeddings (spec hash, weights hash, random or not).

Numerical choices follow the upstream inference code:

* ``hipt_vit_s16``: HIPT ``get_vit256`` + ``eval_transforms`` - native 256 px, mean = std = 0.5,
  DINO ViT-S/16 whose 14x14 position grid is resampled to 16x16 by DINO's
  ``interpolate_pos_encoding`` (bicubic, ``scale_factor=(16 + 0.1) / 14``), baked in at load.
* ``phikon``: owkin/phikon (iBOT ViT-B/16, HF ``ViTModel``) - 224 px, ImageNet statistics, CLS of
  ``last_hidden_state``; LayerNorm eps 1e-6 as trained by iBOT (the HF config was corrected from
  1e-12 to 1e-6 to match).
* ``ctranspath``: TransPath ``ctranspath()`` - Swin-T with ConvStem, head Identity, average pool
  of the final normed tokens, 224 px, ImageNet statistics.
* ``dino_vitb16``: facebookresearch/dino ViT-B/16 - CLS after the final norm, 224 px, ImageNet.
* ``uni``: MahmoodLab/UNI - timm ViT-L/16, LayerScale init 1e-5, 224 px, ImageNet statistics.
* ``dinov2_vitl14_reg``: facebookresearch/dinov2 ``dinov2_vitl14_reg`` - ViT-L/14 + 4 registers,
  the 37x37 position grid resampled to 16x16 (bicubic, antialiased, as the hub ``*_reg`` models
  do), CLS after the final norm (``x_norm_clstoken``), 224 px, ImageNet statistics.

Resizing (when ``input_size`` is not the patch size) reproduces the PIL ``Resize`` -> ``ToTensor``
path of the upstream pipelines: torch's antialiased bilinear/bicubic kernels are PIL's, applied
as PIL does in two separable passes (width, then height), each rounded and clipped to 0..255.
It agrees with PIL to within one grey level (PIL's fixed-point rounding).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.embedding.checkpoints import LAYOUTS, convert_state_dict, read_checkpoint
from pipeline.errors import PipelineError
from pipeline.io.hashing import file_sha256

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)

DOCUMENTATION_FIELDS = ("description", "weights_file")  # not part of an encoder's spec hash
POOLING = {"cls": "token", "avg": "avg"}          # spec pooling -> timm global_pool
INTERPOLATIONS = ("bilinear", "bicubic")


class RandomWeightsWarning(UserWarning):
    """An encoder was built without pretrained weights: its embeddings carry no meaning."""


@dataclass(frozen=True)
class EncoderSpec:
    name: str
    arch: str                                      # timm architecture name
    model_kwargs: dict[str, Any]                   # timm.create_model keyword arguments (plain data)
    input_size: int                                # side the 256 px patch is resized to (256: native)
    interpolation: str                             # "bilinear" | "bicubic" (antialiased)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: str                                   # "cls" | "avg"
    output_dim: int
    checkpoint_layout: str                         # key of checkpoints.LAYOUTS
    patch_embed: str | None = None                 # key of PATCH_EMBEDS when timm's default is not it
    hub_id: str | None = None                      # Hugging Face repo with the upstream-layout file
    hub_filename: str | None = None
    weights_file: str = ""                         # name of the upstream file (documentation)
    description: str = ""

    def __post_init__(self) -> None:
        if self.pooling not in POOLING:
            raise ValueError(f"{self.name}: pooling must be one of {sorted(POOLING)}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"{self.name}: interpolation must be one of {INTERPOLATIONS}")
        if self.checkpoint_layout not in LAYOUTS:
            raise ValueError(f"{self.name}: unknown checkpoint layout {self.checkpoint_layout!r}")
        if self.patch_embed is not None and self.patch_embed not in PATCH_EMBEDS:
            raise ValueError(f"{self.name}: unknown patch embedding {self.patch_embed!r}")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f"{self.name}: mean and std need three channels")
        forbidden = {"pretrained", "num_classes", "global_pool", "embed_layer"} & set(self.model_kwargs)
        if forbidden:
            raise ValueError(f"{self.name}: model_kwargs may not set {sorted(forbidden)}")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True, separators=(",", ":"))

    @property
    def spec_hash(self) -> str:
        """What makes the numbers: every field but the documentation ones, so that rewording a
        description does not change the recorded identity of existing embeddings."""
        numbers = {k: v for k, v in dataclasses.asdict(self).items() if k not in DOCUMENTATION_FIELDS}
        return hashlib.sha256(json.dumps(numbers, sort_keys=True, separators=(",", ":")).encode()).hexdigest()

    def __hash__(self) -> int:  # the dict field makes the generated hash unusable
        return hash(self.to_json())


class ConvStem(nn.Module):
    """CTransPath's convolutional patch embedding for Swin (stride 4 = two 3x3 stride-2 convs
    with BatchNorm + ReLU, then a 1x1 conv to the embedding width, then the Swin patch norm).
    Parameter names match TransPath's ``patch_embed.proj.{0,1,3,4,6}`` and ``patch_embed.norm``;
    the output is NHWC as current timm Swin stages expect."""

    def __init__(self, img_size: Any = 224, patch_size: Any = 4, in_chans: int = 3, embed_dim: int = 96,
                 norm_layer: Any = None, output_fmt: str = "NHWC", **_: Any):
        super().__init__()
        patch = patch_size if isinstance(patch_size, int) else patch_size[0]
        if patch != 4 or embed_dim % 8:
            raise ValueError("ConvStem needs patch size 4 and an embedding width divisible by 8")
        if output_fmt != "NHWC":
            raise ValueError("ConvStem only produces NHWC (timm Swin) output")
        size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.img_size = size
        self.patch_size = (4, 4)
        self.grid_size = (size[0] // 4, size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers: list[nn.Module] = []
        width_in, width_out = in_chans, embed_dim // 8
        for _ in range(2):
            layers += [nn.Conv2d(width_in, width_out, kernel_size=3, stride=2, padding=1, bias=False),
                       nn.BatchNorm2d(width_out), nn.ReLU(inplace=True)]
            width_in, width_out = width_out, width_out * 2
        layers.append(nn.Conv2d(width_in, embed_dim, kernel_size=1))
        self.proj = nn.Sequential(*layers)
        if norm_layer is None:
            self.norm: nn.Module = nn.Identity()
        elif isinstance(norm_layer, str):
            from timm.layers import get_norm_layer

            self.norm = get_norm_layer(norm_layer)(embed_dim)
        else:
            self.norm = norm_layer(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))


PATCH_EMBEDS: dict[str, type[nn.Module]] = {"conv_stem": ConvStem}


ENCODERS: dict[str, EncoderSpec] = {spec.name: spec for spec in (
    EncoderSpec(
        name="hipt_vit_s16",
        arch="vit_small_patch16_224",
        model_kwargs={"img_size": 256, "dynamic_img_size": True},
        input_size=256, interpolation="bilinear", mean=HALF, std=HALF, pooling="cls", output_dim=384,
        checkpoint_layout="dino_teacher", weights_file="vit256_small_dino.pth",
        description="HIPT ViT-S/16 (vit256, DINO on TCGA 256 px patches at 20x); LID's BRCA 20x conditioning",
    ),
    EncoderSpec(
        name="phikon",
        arch="vit_base_patch16_224",
        model_kwargs={"img_size": 224},
        input_size=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls",
        output_dim=768, checkpoint_layout="hf_vit", hub_id="owkin/phikon", hub_filename="pytorch_model.bin",
        weights_file="pytorch_model.bin or model.safetensors (HF ViTModel)",
        description="Phikon (owkin, iBOT ViT-B/16 on TCGA); LID's CRC 20x conditioning",
    ),
    EncoderSpec(
        name="ctranspath",
        arch="swin_tiny_patch4_window7_224",
        model_kwargs={"img_size": 224},
        input_size=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="avg",
        output_dim=768, checkpoint_layout="timm054_swin_convstem", patch_embed="conv_stem",
        weights_file="ctranspath.pth",
        description="CTransPath (Swin-T + ConvStem, SRCL on TCGA/PAIP); LID's BRCA 5x conditioning; "
                    "256 px fails the 7x7 windows, so patches are resized to 224",
    ),
    EncoderSpec(
        name="dino_vitb16",
        arch="vit_base_patch16_224",
        model_kwargs={"img_size": 224},
        input_size=224, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls",
        output_dim=768, checkpoint_layout="timm", weights_file="dino_vitbase16_pretrain.pth",
        description="DINO ViT-B/16 (ImageNet self-supervised); LID's NAIP conditioning",
    ),
    EncoderSpec(
        name="uni",
        arch="vit_large_patch16_224",
        model_kwargs={"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        input_size=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls",
        output_dim=1024, checkpoint_layout="timm", hub_id="MahmoodLab/UNI", hub_filename="pytorch_model.bin",
        weights_file="pytorch_model.bin",
        description="UNI (MahmoodLab, DINOv2-trained ViT-L/16 on Mass-100K); gated on the hub",
    ),
    EncoderSpec(
        name="dinov2_vitl14_reg",
        arch="vit_large_patch14_reg4_dinov2",
        model_kwargs={"img_size": 224},
        input_size=224, interpolation="bicubic", mean=IMAGENET_MEAN, std=IMAGENET_STD, pooling="cls",
        output_dim=1024, checkpoint_layout="dinov2", weights_file="dinov2_vitl14_reg4_pretrain.pth",
        description="DINOv2 ViT-L/14 with 4 registers (LVD-142M)",
    ),
)}


def get_spec(name: str) -> EncoderSpec:
    try:
        return ENCODERS[name]
    except KeyError:
        raise PipelineError(f"unknown encoder {name!r}; known encoders: {', '.join(sorted(ENCODERS))}") from None


def _create_model(spec: EncoderSpec) -> nn.Module:
    import timm

    kwargs = dict(spec.model_kwargs)
    if spec.patch_embed is not None:
        kwargs["embed_layer"] = PATCH_EMBEDS[spec.patch_embed]
    # pretrained is always False: weights only ever come from a local file passed explicitly.
    return timm.create_model(spec.arch, pretrained=False, num_classes=0,
                             global_pool=POOLING[spec.pooling], **kwargs)


@functools.lru_cache(maxsize=None)
def expected_shapes(spec: EncoderSpec) -> Mapping[str, torch.Size]:
    """State-dict keys and shapes of the spec's model (built on the meta device: no memory, fast)."""
    with torch.device("meta"):
        model = _create_model(spec)
    return {key: value.shape for key, value in model.state_dict().items()}


class Encoder(nn.Module):
    """A frozen encoder: ``preprocess`` (uint8 patches -> normalised input) then ``forward``."""

    def __init__(self, spec: EncoderSpec, model: nn.Module, weights_sha256: str, random_weights: bool):
        super().__init__()
        self.spec = spec
        self.model = model
        self.weights_sha256 = weights_sha256
        self.random_weights = random_weights
        self.spec_hash = spec.spec_hash
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, H, W] (0..255) -> float32 [B, 3, S, S] normalised encoder input."""
        if images.dtype != torch.uint8:
            raise TypeError(f"{self.spec.name}: preprocess expects uint8 images (0..255), got {images.dtype}")
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{self.spec.name}: preprocess expects [B, 3, H, W], got {tuple(images.shape)}")
        x = images.float()
        size = self.spec.input_size
        # PIL resizes an 8-bit image in two separable passes, width then height, each rounded and
        # clipped to 0..255 (bicubic overshoot is clipped after the first pass); do the same.
        if x.shape[-1] != size:
            x = self._resize(x, (x.shape[-2], size))
        if x.shape[-2] != size:
            x = self._resize(x, (size, size))
        x = x / 255.0
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def _resize(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = F.interpolate(x, size=size, mode=self.spec.interpolation, align_corners=False, antialias=True)
        return x.round_().clamp_(0.0, 255.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).float()

    def record(self) -> dict[str, Any]:
        """What identifies this encoder's embeddings (each embedding shard's json holds it per encoder)."""
        return {"spec_sha256": self.spec_hash, "weights_sha256": self.weights_sha256,
                "random_weights": bool(self.random_weights), "dim": self.spec.output_dim}

    def extra_repr(self) -> str:
        source = "RANDOM weights" if self.random_weights else f"weights sha256 {self.weights_sha256[:12]}"
        return f"name={self.spec.name}, {source}"


def _seeded_model(spec: EncoderSpec) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return _create_model(spec)


def _hub_file(spec: EncoderSpec, hub_id: str) -> Path:
    repo, _, filename = hub_id.partition(":")
    filename = filename or (spec.hub_filename if repo == spec.hub_id else None)
    if not filename:
        raise PipelineError(f"{spec.name}: say which file of {repo!r} to use as 'repo:filename'")
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id=repo, filename=filename))


def load_weights(spec: EncoderSpec, path: str | Path) -> dict[str, torch.Tensor]:
    """A local upstream checkpoint converted strictly to the spec's timm state dict."""
    return convert_state_dict(read_checkpoint(path), spec.checkpoint_layout, expected_shapes(spec), path)


@dataclass(frozen=True)
class EncoderSettings:
    """One entry of the config's `encoders:` table: where an encoder's weights come from."""

    weights: str | None = None  # local upstream checkpoint
    hub_id: str | None = None  # "repo" or "repo:filename", for users with network access
    allow_random_weights: bool = False  # demo and tests only

    def build(self, name: str) -> Encoder:
        return build_encoder(name, weights=self.weights, hub_id=self.hub_id,
                             allow_random_weights=self.allow_random_weights)


def build_encoder(name: str, weights: str | Path | None = None, *, allow_random_weights: bool = False,
                  hub_id: str | None = None) -> Encoder:
    """Build the registered encoder ``name`` with weights from a local upstream checkpoint.

    ``hub_id`` ("repo" or "repo:filename" on the Hugging Face hub) downloads the upstream file
    instead, for users with network access. Without weights, ``allow_random_weights=True`` gives a
    deterministic random initialisation (seed 0) for tests and dry runs, with a warning."""
    spec = get_spec(name)
    if weights is not None and hub_id is not None:
        raise PipelineError(f"{name}: pass either weights (a local file) or hub_id, not both")
    if weights is None and hub_id is not None:
        weights = _hub_file(spec, hub_id)
    if weights is None:
        if not allow_random_weights:
            raise PipelineError(
                f"encoder {name!r} needs pretrained weights: pass weights=<path to {spec.weights_file or 'the upstream checkpoint'}>"
                + (f" or hub_id={spec.hub_id!r}" if spec.hub_id else "")
                + "; embeddings from random weights are meaningless (allow_random_weights=True only for tests)")
        warnings.warn(f"encoder {name!r} is built with RANDOM weights (seed 0): its embeddings are "
                      "MEANINGLESS and must not be used to condition or evaluate a model",
                      RandomWeightsWarning, stacklevel=2)
        return Encoder(spec, _seeded_model(spec), weights_sha256="random", random_weights=True)

    path = Path(weights)
    state = load_weights(spec, path)
    return Encoder(spec, _model_with_weights(spec, state), weights_sha256=file_sha256(path), random_weights=False)


def _model_with_weights(spec: EncoderSpec, state: dict[str, torch.Tensor]) -> nn.Module:
    """The spec's model holding ``state`` (already checked to have exactly its keys and shapes).

    When every buffer is in the state dict, the model is built on the meta device and the loaded
    tensors are assigned to it, which skips a random initialisation that would be overwritten
    anyway (seconds for a ViT-L). Models with buffers computed at construction and not saved
    (Swin's relative_position_index / attn_mask) are built normally, then loaded."""
    with torch.device("meta"):
        model = _create_model(spec)
    persistent = model.state_dict()
    if any(name not in persistent for name, _ in model.named_buffers()):
        model = _seeded_model(spec)
        model.load_state_dict(state, strict=True)
        return model
    state = {key: value.to(dtype=persistent[key].dtype).contiguous() for key, value in state.items()}
    model.load_state_dict(state, strict=True, assign=True)
    leftover = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if leftover:  # pragma: no cover - strict loading assigns every parameter and buffer
        raise RuntimeError(f"{spec.name}: tensors left without values: {leftover}")
    return model
