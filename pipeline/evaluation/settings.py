"""Settings of the evaluation stage (the config's `evaluation:` table) and its error type."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from pipeline.embedding.encoders import ENCODERS
from pipeline.errors import PipelineError

# Names of the feature extractors that are not SSL encoders from the registry.
CLEANFID_EXTRACTORS = ("inception", "clip")


class EvaluationError(PipelineError):
    """The evaluation cannot run; the message names the file or setting and the reason."""


@dataclass(frozen=True)
class EvaluationSettings:
    """The config's `evaluation:` table (defaults equal the schema's; tests/test_settings.py checks)."""

    feature_extractor: str = "inception"   # "inception" | "clip" | an encoder name from the registry
    inception_weights: str | None = None   # None: the file must already be where clean-fid loads it
    clip_fid: bool = False                 # also CLIP-FID, when CLIP and its weights are available
    clip_weights: str | None = None        # None: CLIP's own cache, ~/.cache/clip/ViT-B-32.pt
    kid_subsets: int = 100
    kid_subset_size: int = 1000
    batch_size: int = 32
    num_workers: int = 2
    device: str = "auto"
    prior_grids: int = 256                 # grids sampled from the prior for its figures
    prior_steps: int = 50                  # DDIM steps of those samples

    def __post_init__(self) -> None:
        known = (*CLEANFID_EXTRACTORS, *ENCODERS)
        if self.feature_extractor not in known:
            raise EvaluationError(f"evaluation.feature_extractor: {self.feature_extractor!r} is not one of "
                                  f"{', '.join(known)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvaluationSettings":
        from pipeline.config import settings_from_table

        return settings_from_table(cls, data, "evaluation")

    @classmethod
    def from_json(cls, text: str) -> "EvaluationSettings":
        return cls.from_dict(json.loads(text) if text else {})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
