"""Stage 7: evaluation of generated patches and large images (FID/KID via clean-fid, embedding
similarity); results in one metrics.json (docs/data_contract.md, "Stage 7")."""

from pipeline.evaluation.extractors import ExtractorUnavailable, InceptionWeightsMissing
from pipeline.evaluation.run import describe, evaluate
from pipeline.evaluation.settings import EvaluationError, EvaluationSettings

__all__ = ["EvaluationError", "EvaluationSettings", "ExtractorUnavailable", "InceptionWeightsMissing",
           "describe", "evaluate"]
