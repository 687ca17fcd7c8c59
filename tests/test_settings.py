"""The schema is the one source of settings: every stage's settings dataclass has exactly the
schema's keys (plus values the pipeline derives) and the schema's defaults, and is built from its
table by the one helper, which names an unknown key."""

from __future__ import annotations

import dataclasses

import pytest

from pipeline.autoencoder.settings import AutoencoderTrainSettings
from pipeline.config import ConfigError, DatasetSpec, load_schema, settings_from_table
from pipeline.embedding.encoders import EncoderSettings
from pipeline.embedding.extract import EmbeddingSettings
from pipeline.evaluation.settings import EvaluationSettings
from pipeline.latents.encode import EncodeSettings
from pipeline.models.autoencoder import AutoencoderSettings
from pipeline.prior.settings import PriorSettings
from pipeline.sampling.config import LargeImageSettings
from pipeline.sampling.generate import GenerateSettings
from pipeline.sampling.patches import PatchSamplingConfig
from pipeline.stain.settings import StainSettings
from pipeline.sampling.slide import SlideSettings
from pipeline.training.config import TrainConfig
from pipeline.viewer import ViewerSettings

# (table path in the schema, its dataclass, fields the pipeline derives instead of reading a key)
STAGES = [
    (("encoders", "*"), EncoderSettings, set()),
    (("embedding",), EmbeddingSettings, set()),
    (("latents",), EncodeSettings, set()),
    (("latents", "autoencoder"), AutoencoderSettings, set()),
    (("autoencoder",), AutoencoderTrainSettings, {"in_channels", "seed"}),
    (("training",), TrainConfig, {"embedding_key", "patch_embed_dim", "holdout_fraction", "seed"}),
    (("sampling",), PatchSamplingConfig, {"seed"}),
    (("large_image",), LargeImageSettings, set()),
    (("synthesize_slide",), SlideSettings, set()),
    (("evaluation",), EvaluationSettings, set()),
    (("datasets", "*", "stain_normalization"), StainSettings, set()),
    (("viewer",), ViewerSettings, set()),
    (("prior",), PriorSettings, {"embedding_key", "seed"}),
    (("generate",), GenerateSettings, set()),
]
# Keys a table must give (the schema's `required`): no default on either side; example values.
REQUIRED_VALUES = {"method": "macenko", "target": "/data/target.png"}
# datasets.<name>: resolved by pipeline.config.resolve_datasets (paths, magnifications, holdout).
DATASET_FIELDS = {"resolution": "target_mpp", "holdout": None}  # schema key -> DatasetSpec field
DATASET_DERIVED = {"name", "inputs", "target_mpp", "holdout_inputs", "holdout_fraction"}


def table_schema(path: tuple[str, ...]) -> dict:
    schema = load_schema()
    node = schema
    for key in path:
        node = node["additionalProperties"] if key == "*" else node["properties"][key]
        while "$ref" in node or "anyOf" in node:
            if "anyOf" in node:  # a table that may be null: the table
                (node,) = [branch for branch in node["anyOf"] if branch.get("type") != "null"]
            else:
                node = schema["$defs"][node["$ref"].rsplit("/", 1)[-1]]
    return node


def plain(value):
    """Defaults as the schema writes them (tuples as lists, nested settings as tables)."""
    if isinstance(value, tuple):
        return [plain(v) for v in value]
    if dataclasses.is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    return value


def dataclass_defaults(cls) -> dict:
    return {f.name: plain(f.default if f.default is not dataclasses.MISSING else f.default_factory())
            for f in dataclasses.fields(cls)
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}


@pytest.mark.parametrize("path, cls, derived", STAGES, ids=[".".join(s[0]) for s in STAGES])
def test_schema_defaults_are_the_dataclass_defaults(path, cls, derived):
    table = table_schema(path)
    properties = table["properties"]
    fields = {f.name for f in dataclasses.fields(cls)}
    assert set(properties) == fields - derived, f"keys only in the schema: {set(properties) - fields}, only in " \
                                                f"{cls.__name__}: {fields - derived - set(properties)}"
    defaults = dataclass_defaults(cls)
    for key in table.get("required", []):
        assert key not in defaults and "default" not in properties[key], f"{'.'.join(path)}.{key} is required: no default"
    for key, prop in properties.items():
        if key in table.get("required", []):
            continue
        if prop.get("type") == "object" and "properties" in prop:  # a nested table: its own entry
            assert plain(defaults[key]) == {k: v["default"] for k, v in prop["properties"].items()}
            continue
        assert "default" in prop, f"{'.'.join(path)}.{key} has no default in the schema"
        assert defaults[key] == prop["default"], f"{'.'.join(path)}.{key}: schema {prop['default']!r}, " \
                                                 f"{cls.__name__} {defaults[key]!r}"


def test_dataset_defaults_are_the_spec_defaults():
    properties = table_schema(("datasets", "*"))["properties"]
    defaults = dataclass_defaults(DatasetSpec)
    fields = {f.name for f in dataclasses.fields(DatasetSpec)}
    keys = {DATASET_FIELDS.get(key, key) for key in properties} - {None}
    assert keys | DATASET_DERIVED == fields
    for key, prop in properties.items():
        if key in DATASET_FIELDS or "default" not in prop:
            continue
        assert defaults[key] == prop["default"], key
    holdout = properties["holdout"]["properties"]
    assert defaults["holdout_fraction"] == holdout["fraction"]["default"]


@pytest.mark.parametrize("path, cls, derived", STAGES, ids=[".".join(s[0]) for s in STAGES])
def test_the_helper_builds_every_stage_and_names_an_unknown_key(path, cls, derived):
    key = ".".join(path).replace("*", "hipt_vit_s16")
    needed = {name: value for name, value in {"embedding_key": "hipt_vit_s16", "patch_embed_dim": 384,
                                              "holdout_fraction": 0.0, "seed": 0, "in_channels": 3}.items() if name in derived}
    needed.update({name: REQUIRED_VALUES[name] for name in table_schema(path).get("required", [])})
    assert settings_from_table(cls, {}, key, **needed) == cls(**needed)
    with pytest.raises(ConfigError, match=rf"{key}: unknown setting\(s\) batchsize"):
        settings_from_table(cls, {"batchsize": 3}, key, **needed)


def test_json_tables_round_trip_into_the_settings():
    """What a rule passes (JSON: lists, nested tables) builds the same settings as Python values."""
    latents = settings_from_table(EncodeSettings, {"autoencoder": {"kind": "random", "preset": "tiny-vq-f16",
                                                                   "allow_random_weights": True}, "flips": "none"},
                                  "latents")
    assert latents.autoencoder == AutoencoderSettings(kind="random", preset="tiny-vq-f16", allow_random_weights=True)
    training = settings_from_table(TrainConfig, {"adam_betas": [0.5, 0.9]}, "training", embedding_key="uni",
                                   patch_embed_dim=1024, holdout_fraction=0.1, seed=3)
    assert training.adam_betas == (0.5, 0.9) and training.seed == 3
    with pytest.raises(ConfigError, match="training: unknown model preset 'big'"):
        settings_from_table(TrainConfig, {"preset": "big"}, "training", embedding_key="uni", patch_embed_dim=1024,
                            holdout_fraction=0.0, seed=0)
