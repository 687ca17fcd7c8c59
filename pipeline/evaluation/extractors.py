"""Feature extractors for FID-style metrics, all run through clean-fid's feature code.

* ``inception``: clean-fid's TorchScript Inception (mode "clean"), reported as ``fid`` / ``kid``.
  clean-fid loads it from one hard-coded file and downloads it when that file is absent; this
  module never lets it download: it links the configured file there, or stops with a message
  saying which file to obtain and where to put it.
* ``clip``: clean-fid's CLIP ViT-B/32 features, reported as ``clip_fid`` / ``clip_kid``; optional,
  skipped with a recorded reason when the ``clip`` package or its weights are missing.
* an encoder name from the registry (e.g. ``hipt_vit_s16``): the SSL encoder on the 256 px patch
  with its own preprocessing, reported as ``fd_<name>`` / ``kd_<name>`` — never as ``fid``, since
  its numbers are not comparable with Inception FIDs.
"""

from __future__ import annotations

import os
import platform
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.embedding.encoders import Encoder, build_encoder
from pipeline.evaluation.settings import EvaluationError, EvaluationSettings
from pipeline.io.hashing import file_sha256

INCEPTION_FILE = "inception-2015-12-05.pt"
CLIP_MODEL = "ViT-B/32"


class InceptionWeightsMissing(EvaluationError):
    """clean-fid's Inception file is not available locally (and may not be downloaded)."""


class ExtractorUnavailable(EvaluationError):
    """An optional extractor (CLIP) cannot run here; the reason says what is missing."""


@dataclass
class FeatureExtractor:
    name: str                                           # label in metrics.json
    fd_name: str                                        # metric names of the two distances
    kd_name: str
    model: Callable[[torch.Tensor], torch.Tensor]       # float [B, 3, H, W] in 0..255 -> [B, D]
    fn_resize: Callable[[np.ndarray], np.ndarray] | None  # clean-fid per-image resize; None: mode "clean"
    dim: int
    record: dict[str, Any] = field(default_factory=dict)  # what produced the features, for metrics.json

    @property
    def random_weights(self) -> bool:
        return bool(self.record.get("random_weights", False))


def cleanfid_inception_path() -> Path:
    """Where clean-fid loads Inception from: ``cleanfid.features.feature_extractor`` hard-codes
    "/tmp" ("./" on Windows). Neither TMPDIR nor any argument changes it."""
    return Path("./" if platform.system() == "Windows" else "/tmp") / INCEPTION_FILE


def _inception_url() -> str:
    from cleanfid.downloads_helper import inception_url

    return inception_url


def _same_file(a: Path, b: Path) -> bool:
    try:
        if os.path.samefile(a, b):
            return True
    except OSError:
        return False
    return a.stat().st_size == b.stat().st_size and file_sha256(a) == file_sha256(b)


def place_weights(source: Path, target: Path) -> None:
    """Make ``target`` (where a library insists on loading a file) hold ``source``: a symlink,
    replaced atomically, unless ``target`` already has the same bytes."""
    if target.exists() and _same_file(source, target):
        return
    temp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(source.resolve(), temp)
        os.replace(temp, target)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise EvaluationError(f"cannot link {source} to {target}, where the feature extractor loads it: {exc}; "
                              f"remove {target} or copy {source} there") from exc


def prepare_inception(configured: str | None, location: Path | None = None) -> Path:
    """The Inception file at clean-fid's location, linked from ``configured`` when given."""
    location = location or cleanfid_inception_path()
    source = Path(configured).expanduser() if configured else location
    if not source.is_file():
        where = (f"set evaluation.inception_weights ({source}) is not a file" if configured
                 else f"no file at {location}")
        raise InceptionWeightsMissing(
            f"Inception weights missing: {where}. FID uses clean-fid's TorchScript Inception network "
            f"{INCEPTION_FILE}, which clean-fid loads only from {location} (a fixed location) and would "
            f"otherwise download; nothing is downloaded at run time. Obtain {_inception_url()} "
            f"and place it at {location}, or anywhere and set evaluation.inception_weights to its path "
            f"(it is linked to {location} when the evaluation runs). Without it, set "
            f"evaluation.feature_extractor to an SSL encoder name: the metric is then reported as "
            f"fd_<encoder>, not fid.")
    if configured:
        place_weights(source, location)
    return location


def inception_extractor(settings: EvaluationSettings, device: torch.device) -> FeatureExtractor:
    from cleanfid.features import build_feature_extractor

    location = prepare_inception(settings.inception_weights)
    try:
        model = build_feature_extractor("clean", device, use_dataparallel=False)
    except Exception as exc:  # a corrupt or wrong file: say which one
        raise EvaluationError(f"{location}: cannot load clean-fid's Inception network: {exc}") from exc
    record = {"name": "inception", "model": "InceptionV3 pool3 (clean-fid TorchScript, mode clean)",
              "weights": str(location.resolve()), "weights_sha256": file_sha256(location),
              "random_weights": False, "dim": 2048}
    return FeatureExtractor("inception", "fid", "kid", model, None, 2048, record)


def _clip_weights_location() -> tuple[str, Path]:
    """The ViT-B/32 URL and the file CLIP's loader reads before downloading (its default cache)."""
    import clip.clip as clip_impl  # clean-fid's CLIP_fx calls clip.load(name) with the default cache

    url = clip_impl._MODELS[CLIP_MODEL]
    return url, Path("~/.cache/clip").expanduser() / os.path.basename(url)


def clip_extractor(settings: EvaluationSettings, device: torch.device) -> FeatureExtractor:
    try:
        from cleanfid.clip_features import CLIP_fx, img_preprocess_clip

        url, location = _clip_weights_location()
    except (ImportError, AttributeError, KeyError) as exc:
        raise ExtractorUnavailable(f"CLIP features unavailable: clean-fid's CLIP features need OpenAI's `clip` package "
                                   f"with {CLIP_MODEL} (pip install openai-clip): {exc}") from exc
    source = Path(settings.clip_weights).expanduser() if settings.clip_weights else location
    if not source.is_file():
        raise ExtractorUnavailable(f"CLIP features unavailable: no CLIP {CLIP_MODEL} weights at {source}; obtain "
                                   f"{url} and place it at {location} or set evaluation.clip_weights to its path")
    # CLIP's loader re-downloads a file whose SHA-256 differs from the one in its URL: check first.
    expected = url.split("/")[-2]
    if file_sha256(source) != expected:
        raise EvaluationError(f"{source}: not CLIP {CLIP_MODEL} (SHA-256 differs from {expected}, given by {url})")
    if settings.clip_weights:
        place_weights(source, location)
    fx = CLIP_fx(CLIP_MODEL, device=device)
    record = {"name": fx.name, "model": f"CLIP {CLIP_MODEL} image embedding (clean-fid)",
              "weights": str(location.resolve()), "weights_sha256": expected, "random_weights": False, "dim": 512}
    return FeatureExtractor(fx.name, "clip_fid", "clip_kid", lambda x: fx(x).float(), img_preprocess_clip, 512, record)


def keep_size(image: np.ndarray) -> np.ndarray:
    """clean-fid resize step for SSL encoders: none (the encoder's preprocess resizes, as in embedding)."""
    return image


class EncoderFeatures:
    """clean-fid hands batches as float 0..255; the encoder's preprocess wants the uint8 pixels."""

    def __init__(self, encoder: Encoder):
        self.encoder = encoder

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        # ToTensor()*255 in clean-fid's loader leaves values a rounding error off the integers.
        pixels = batch.round().clamp(0, 255).to(torch.uint8)
        return self.encoder(self.encoder.preprocess(pixels))


def encoder_extractor(encoder: Encoder) -> FeatureExtractor:
    name = encoder.spec.name
    record = {"name": name, "model": encoder.spec.description, **encoder.record(),
              "input": "the uint8 patch through the encoder's own preprocessing"}
    return FeatureExtractor(name, f"fd_{name}", f"kd_{name}", EncoderFeatures(encoder), keep_size,
                            encoder.spec.output_dim, record)


class EncoderCache:
    """Each SSL encoder is built once, from the same settings JSON the embed stage gets."""

    def __init__(self, encoder_settings: dict[str, dict[str, Any]], device: torch.device):
        self.settings = encoder_settings
        self.device = device
        self.built: dict[str, Encoder] = {}

    def get(self, name: str) -> Encoder:
        if name not in self.built:
            if name not in self.settings:
                raise EvaluationError(f"encoder {name!r} has no entry in the encoder settings (the config's "
                                      f"`encoders:` table) saying where its weights are")
            s = self.settings[name]
            encoder = build_encoder(name, weights=s.get("weights"), hub_id=s.get("hub_id"),
                                    allow_random_weights=s.get("allow_random_weights", False))
            self.built[name] = encoder.to(self.device)
        return self.built[name]


def build_extractor(name: str, settings: EvaluationSettings, encoders: EncoderCache) -> FeatureExtractor:
    if name == "inception":
        return inception_extractor(settings, encoders.device)
    if name == "clip":
        return clip_extractor(settings, encoders.device)
    return encoder_extractor(encoders.get(name))
