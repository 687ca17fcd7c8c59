"""Load, validate and resolve workflow_config.yaml.

The JSON schema in ``pipeline/schemas`` is the single description of every key; this module
fills its defaults, turns magnification labels into micrometres per pixel and expands the
input globs into named inputs, so every stage sees the same resolved dataset specs.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import re
import typing
import unicodedata
import warnings
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import jsonschema
import yaml

from pipeline.errors import PipelineError

SCHEMA_RESOURCE = "schemas/workflow_config.schema.yaml"


class ConfigError(PipelineError):
    """The configuration is invalid; the message names the key and the reason."""


def schema_path() -> Path:
    return Path(str(resources.files("pipeline").joinpath(SCHEMA_RESOURCE)))


def load_schema() -> dict[str, Any]:
    return yaml.safe_load(schema_path().read_text())


def _validator_with_defaults(schema: dict[str, Any]) -> jsonschema.protocols.Validator:
    """A validator that also writes each property's default into the instance."""
    base = jsonschema.validators.validator_for(schema)

    def set_defaults(validator, properties, instance, sub_schema):
        if isinstance(instance, dict):
            for key, prop in properties.items():
                if "default" in prop and key not in instance:
                    instance[key] = prop["default"]
        yield from base.VALIDATORS["properties"](validator, properties, instance, sub_schema)

    extended = jsonschema.validators.extend(base, {"properties": set_defaults})
    return extended(schema)


def _key_path(error: jsonschema.ValidationError) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "<top level>"


# Values renamed when the upstream method got its own name (LID, Large-Image-Diffusion) instead of
# "seed"; the old spellings are accepted, with a warning, for one release.
RENAMED_VALUES: dict[tuple[str, ...], dict[str, str]] = {
    ("latents", "autoencoder", "kind"): {"seed": "lid"},
    ("training", "preset"): {"seed": "lid"},
    ("large_image", "mode"): {"seed": "lid"},
    ("large_image", "sampler"): {"seed_ddim": "lid_ddim"},
}


class RenamedValueWarning(FutureWarning):
    """A config value in a spelling that is going away (shown by default, unlike DeprecationWarning)."""


def renamed_value(path: tuple[str, ...], value: Any) -> Any:
    """The current spelling of a config value at ``path`` (warning once per use of an old one)."""
    new = RENAMED_VALUES.get(path, {}).get(value) if isinstance(value, str) else None
    if new is None:
        return value
    warnings.warn(f"{'.'.join(path)}: {value!r} is deprecated and will be removed in the next release; "
                  f"write {new!r}", RenamedValueWarning, stacklevel=3)
    return new


def apply_renamed_values(config: dict[str, Any]) -> None:
    for path in RENAMED_VALUES:
        table = config
        for key in path[:-1]:
            table = table.get(key) if isinstance(table, dict) else None
        if isinstance(table, dict) and path[-1] in table:
            table[path[-1]] = renamed_value(path, table[path[-1]])


def _specific(error: jsonschema.ValidationError) -> jsonschema.ValidationError:
    """For a table that may also be null (`anyOf: [null, table]`), the table's own error (an unknown
    or missing key, a wrong value) instead of "is not valid under any of the given schemas"."""
    if error.validator == "anyOf" and isinstance(error.instance, dict):
        inner = [e for e in error.context if not (e.validator == "type" and e.validator_value == "null")]
        if inner:
            return jsonschema.exceptions.best_match(inner)
    return error


def validate_config(config: dict[str, Any]) -> dict[str, Any]:
    """Validate ``config`` in place against the schema and fill defaults; return it."""
    apply_renamed_values(config)
    validator = _validator_with_defaults(load_schema())
    errors = sorted(map(_specific, validator.iter_errors(config)), key=lambda e: list(e.absolute_path))
    if errors:
        lines = [f"  {_key_path(e)}: {e.message}" for e in errors]
        raise ConfigError("invalid workflow configuration:\n" + "\n".join(lines))
    return config


def schema_default(*path: str) -> Any:
    """The schema's default for the config key at ``path`` (e.g. ``schema_default("seed")``)."""
    node = load_schema()
    for key in path:
        node = node["properties"][key]
    return node["default"]


Settings = TypeVar("Settings")


def settings_from_table(cls: type[Settings], table: Mapping[str, Any], key: str, **derived: Any) -> Settings:
    """A stage's settings dataclass from its validated config table, plus ``derived`` values that
    the pipeline supplies (not config keys, e.g. the run seed).

    Every key of the table must be a field (an unknown one is named); lists become tuples where
    the field is a tuple and mappings become nested settings where the field is a dataclass, so
    the JSON a rule passes round-trips. The dataclass's defaults are the schema's (a test checks
    every stage), so a table without defaults filled in gives the same settings.
    """
    fields = {field.name: field for field in dataclasses.fields(cls)}
    unknown = sorted(set(table) - set(fields))
    if unknown:
        raise ConfigError(f"{key}: unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in {**table, **derived}.items():
        hint = hints[name]
        if isinstance(value, Mapping) and dataclasses.is_dataclass(hint):
            value = settings_from_table(hint, value, f"{key}.{name}")
        elif isinstance(value, list) and (hint is tuple or typing.get_origin(hint) is tuple):
            value = tuple(value)
        values[name] = value
    try:
        return cls(**values)
    except PipelineError:  # typed: its message already names the setting
        raise
    except ValueError as exc:  # the dataclass's own checks: say which table they are about
        raise ConfigError(f"{key}: {exc}") from exc


MAGNIFICATION_RE = re.compile(r"^([0-9]+(?:\.[0-9]+)?)[xX]$")


def resolution_to_mpp(value: float | str, kind: str, key: str = "resolution") -> float:
    """Micrometres (slides) or metres (aerial) per pixel from a number or a label like '20x'.

    Magnification labels follow the usual convention 10 / magnification um/px (20x = 0.5,
    5x = 2.0); they only make sense for slides.
    """
    if isinstance(value, (int, float)):
        return float(value)
    match = MAGNIFICATION_RE.match(value)
    if not match:
        raise ConfigError(f"{key}: {value!r} is neither a number nor a magnification like '20x'")
    if kind != "wsi":
        raise ConfigError(f"{key}: magnification {value!r} is for slides; give metres per pixel for {kind} data")
    return 10.0 / float(match.group(1))


_ID_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


def input_id(path: Path) -> str:
    """A file's identifier in keys and output folders: its name without the extension, ASCII,
    with every run of characters other than letters, digits, '_' and '-' replaced by '-'.

    WebDataset splits a sample key at its first dot, and TCGA slide names contain dots.
    """
    stem = path.name
    for suffix in (".ome.tiff", ".ome.tif"):
        if stem.lower().endswith(suffix):
            stem = stem[: -len(suffix)]
            break
    else:
        stem = path.stem
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode()
    cleaned = _ID_UNSAFE.sub("-", ascii_stem).strip("-")
    return cleaned or "input"


RGB_BANDS = 3  # slides' patches, and the preview every image has: the first three bands


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    """One dataset after validation: everything a stage needs, as plain data."""

    name: str
    kind: str
    inputs: dict[str, str]  # input id -> absolute path
    target_mpp: float  # um/px for slides, m/px for aerial
    # The rest: the schema's `datasets.<name>` keys and defaults (tests/test_settings.py checks).
    patch_size: int = 256
    tissue_threshold: float = 0.5
    mpp_overrides: str | None = None
    mpp_from_objective: bool = False
    bands: tuple[int, ...] = (1, 2, 3)
    max_nodata_fraction: float = 0.05
    max_upsample: float = 1.5  # source pixel size / target pixel size allowed
    image_format: str = "jpg"
    jpeg_quality: int = 95
    patches_per_shard: int = 2000
    encoders: tuple[str, ...] = ()
    # Kept out of training for sampling and evaluation (see pipeline.splits).
    holdout_inputs: tuple[str, ...] = ()  # input ids
    holdout_fraction: float = 0.1
    # The validated `stain_normalization` table (target made absolute), or None: off. Plain data:
    # the stain stage builds its settings from it (pipeline.stain.settings).
    stain_normalization: dict[str, Any] | None = None

    @property
    def band_count(self) -> int:
        """Bands of the dataset's patches: 3 (RGB) for slides, the configured bands for aerial images."""
        return len(self.bands) if self.kind == "aerial" else RGB_BANDS

    @property
    def training_inputs(self) -> list[str]:
        return [ident for ident in self.inputs if ident not in self.holdout_inputs]

    def only(self, input_id: str) -> "DatasetSpec":
        """What one tiling job needs: the spec restricted to one input, without the settings of
        later stages (so that changing them does not re-tile)."""
        return dataclasses.replace(self, inputs={input_id: self.inputs[input_id]}, encoders=(),
                                   holdout_inputs=(), holdout_fraction=0.0, stain_normalization=None)

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        if data["stain_normalization"] is None:
            # Off: the JSON the rules pass stays what it was before the option existed, so existing
            # results are not re-run for a changed parameter.
            del data["stain_normalization"]
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "DatasetSpec":
        data = json.loads(text)
        data["bands"] = tuple(data["bands"])
        data["encoders"] = tuple(data["encoders"])
        data["holdout_inputs"] = tuple(data.get("holdout_inputs", ()))
        return cls(**data)


def expand_inputs(patterns: list[str], base_dir: Path, dataset: str) -> dict[str, str]:
    """Expand paths and globs (relative ones against ``base_dir``) into {input id: absolute path},
    sorted by path."""
    paths: list[Path] = []
    for pattern in patterns:
        full = str(absolute_path(pattern, base_dir))
        # A missing file (no glob) is reported by its tiling job as `not_found`, not here.
        matches = sorted(glob.glob(full)) if glob.has_magic(full) else [full]
        if not matches:
            where = "" if Path(pattern).is_absolute() else f" (relative to {base_dir})"
            raise ConfigError(f"datasets.{dataset}.inputs: pattern {pattern!r} matches no file{where}")
        paths.extend(Path(m) for m in matches)
    by_id: dict[str, str] = {}
    for path in sorted(dict.fromkeys(paths)):
        ident = input_id(path)
        if ident in by_id:
            raise ConfigError(
                f"datasets.{dataset}.inputs: {by_id[ident]!r} and {str(path)!r} would share the "
                f"identifier {ident!r}; rename one of them"
            )
        by_id[ident] = str(path)
    return by_id


def absolute_path(value: str, base_dir: Path) -> Path:
    """A path from the config: ``~`` expanded, a relative one taken from ``base_dir`` (the config
    file's folder)."""
    path = Path(value).expanduser()
    return path if path.is_absolute() else base_dir / path


def held_out_inputs(patterns: list[str], inputs: dict[str, str], base_dir: Path, dataset: str) -> tuple[str, ...]:
    """Input ids of the dataset inputs that the holdout patterns name (paths or globs)."""
    if not patterns:
        return ()
    chosen = expand_inputs(patterns, base_dir, dataset)
    strangers = sorted(set(chosen) - set(inputs))
    if strangers:
        raise ConfigError(f"datasets.{dataset}.holdout.inputs: {[chosen[i] for i in strangers]} are not inputs "
                          "of the dataset")
    return tuple(ident for ident in inputs if ident in chosen)


def resolve_datasets(config: dict[str, Any], base_dir: Path) -> dict[str, DatasetSpec]:
    """Turn a validated config into dataset specs (magnifications resolved, globs expanded)."""
    specs = {}
    for name, ds in config["datasets"].items():
        overrides = ds["mpp_overrides"]
        if overrides is not None:
            overrides = str(absolute_path(overrides, base_dir))
        inputs = expand_inputs(ds["inputs"], base_dir, name)
        specs[name] = DatasetSpec(
            name=name,
            kind=ds["kind"],
            inputs=inputs,
            target_mpp=resolution_to_mpp(ds["resolution"], ds["kind"], f"datasets.{name}.resolution"),
            patch_size=ds["patch_size"],
            tissue_threshold=ds["tissue_threshold"],
            mpp_overrides=overrides,
            mpp_from_objective=ds["mpp_from_objective"],
            bands=tuple(ds["bands"]),
            max_nodata_fraction=ds["max_nodata_fraction"],
            max_upsample=float(ds["max_upsample"]),
            image_format=ds["image_format"],
            jpeg_quality=ds["jpeg_quality"],
            patches_per_shard=ds["patches_per_shard"],
            encoders=tuple(ds["encoders"]),
            holdout_inputs=held_out_inputs(ds["holdout"]["inputs"], inputs, base_dir, name),
            holdout_fraction=float(ds["holdout"]["fraction"]),
            stain_normalization=stain_table(ds, base_dir, name),
        )
        if specs[name].band_count > RGB_BANDS and ds["image_format"] != "tif":
            raise ConfigError(f"datasets.{name}.image_format: {ds['image_format']} holds {RGB_BANDS} bands, but "
                              f"bands {list(ds['bands'])} are {specs[name].band_count}; set image_format: tif")
        if not specs[name].training_inputs:
            raise ConfigError(f"datasets.{name}.holdout.inputs: every input is held out, nothing is left to train on")
        for encoder in ds["encoders"]:
            if encoder not in config["encoders"]:
                raise ConfigError(f"datasets.{name}.encoders: {encoder!r} has no entry under "
                                  f"`encoders:` saying where its weights are")
    return specs


def stain_table(ds: dict[str, Any], base_dir: Path, name: str) -> dict[str, Any] | None:
    """A dataset's `stain_normalization` table with its target made absolute (None: off)."""
    table = ds.get("stain_normalization")
    if table is None:
        return None
    if ds["kind"] != "wsi":
        raise ConfigError(f"datasets.{name}.stain_normalization: stain normalisation is for H&E slides (kind wsi), "
                          f"not {ds['kind']} images")
    return {**table, "target": str(absolute_path(table["target"], base_dir))}


# Settings that name files, relative to the config file's folder like the dataset inputs:
# (table path, key, what it must be).
PATH_SETTINGS = ((("latents", "autoencoder"), "path", "path"), (("training",), "init_from", "dir"),
                 (("evaluation",), "inception_weights", "file"), (("evaluation",), "clip_weights", "file"))


def resolve_paths(config: dict[str, Any], base_dir: Path) -> None:
    """Make the file settings outside `datasets:` absolute, in place (inputs: resolve_datasets)."""
    for table_path, key, _ in PATH_SETTINGS:
        table = _table_at(config, table_path)
        if table.get(key):
            table[key] = str(absolute_path(table[key], base_dir))
    for settings in config["encoders"].values():
        if settings.get("weights"):
            settings["weights"] = str(absolute_path(settings["weights"], base_dir))


def _table_at(config: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    for key in path:
        config = config[key]
    return config


def check_files(config: dict[str, Any], specs: dict[str, DatasetSpec]) -> None:
    """What would fail hours later, checked now: every weights file or folder that a stage will
    load exists, no encoder that a stage uses is left without weights (unless random weights are
    allowed), and every mpp_overrides table exists. All problems are named at once, by key."""
    problems = []

    def need(key: str, value: str | None, kind: str, what: str) -> None:
        if value is None:
            return
        path = Path(value)
        ok = path.is_file() if kind == "file" else path.is_dir() if kind == "dir" else path.exists()
        if not ok:
            expected = {"file": "a file", "dir": "a folder", "path": "a file or folder"}[kind]
            problems.append(f"{key}: {value} does not exist or is not {expected} ({what})")

    for spec in specs.values():
        need(f"datasets.{spec.name}.mpp_overrides", spec.mpp_overrides, "file", "the mpp override table")
        if spec.stain_normalization:
            need(f"datasets.{spec.name}.stain_normalization.target", spec.stain_normalization["target"], "path",
                 "the stain normalisation target: an H&E image or a folder of patch images")
    embedded = [spec for spec in specs.values() if spec.encoders]
    if embedded:
        evaluation = config["evaluation"]
        used = {name for spec in embedded for name in spec.encoders}
        extractor = evaluation["feature_extractor"]
        if extractor not in ("inception", "clip"):
            used.add(extractor)
            if extractor not in config["encoders"]:
                problems.append(f"evaluation.feature_extractor: {extractor!r} has no entry under `encoders:` saying "
                                "where its weights are")
        for name in sorted(used & set(config["encoders"])):
            settings = config["encoders"][name]
            if settings["weights"]:
                need(f"encoders.{name}.weights", settings["weights"], "file", f"{name}'s upstream checkpoint")
            elif not settings["hub_id"] and not settings["allow_random_weights"]:
                problems.append(f"encoders.{name}.weights: no weights for {name}; give the local path of its upstream "
                                "checkpoint (or hub_id, with network access), or allow_random_weights: true for a "
                                "demo whose embeddings mean nothing")
        autoencoder = config["latents"]["autoencoder"]
        if autoencoder["kind"] == "random":
            if not autoencoder["allow_random_weights"]:
                problems.append("latents.autoencoder.kind: 'random' gives latents that mean nothing; set "
                                "latents.autoencoder.allow_random_weights: true for a demo, or give real weights")
        elif autoencoder["kind"] == "trained" and not autoencoder["path"]:
            if autoencoder["dataset"] not in specs:
                problems.append(f"latents.autoencoder.dataset: kind 'trained' needs the dataset whose patches train "
                                f"it (one of {', '.join(specs)}), or the path of a trained autoencoder; got "
                                f"{autoencoder['dataset']!r}")
        elif not autoencoder["path"]:
            problems.append(f"latents.autoencoder.path: kind {autoencoder['kind']!r} needs the path of its weights "
                            "(lid: a LID release folder; compvis-vq: a CompVis first-stage model.ckpt; kl: a "
                            "diffusers folder or .safetensors)")
        need("latents.autoencoder.path", autoencoder["path"], "path", f"the {autoencoder['kind']} autoencoder")
        need("training.init_from", config["training"]["init_from"], "dir", "the LID release to start from")
        need("evaluation.inception_weights", evaluation["inception_weights"], "file", "clean-fid's Inception network")
        need("evaluation.clip_weights", evaluation["clip_weights"], "file", "CLIP ViT-B/32")
        problems += latent_shape_problems(config, embedded)
        problems += band_problems(config, embedded, specs)
    if problems:
        raise ConfigError("invalid workflow configuration:\n" + "\n".join(f"  {p}" for p in problems))


# Downsampling factor and latent channels of the random presets (pipeline.models.autoencoder.RANDOM_PRESETS).
RANDOM_PRESET_SHAPES = {"tiny-vq-f4": (4, 3), "tiny-vq-f8": (8, 3), "tiny-vq-f16": (16, 3)}


def latents_made(config: dict[str, Any]) -> tuple[int, int, str] | None:
    """(downsampling factor, latent channels, what says so) of the configured autoencoder, where the
    config alone tells (the trained and random kinds); None for weights read from files."""
    autoencoder = config["latents"]["autoencoder"]
    if autoencoder["kind"] == "trained" and not autoencoder["path"]:
        table = config["autoencoder"]
        return int(table["downsampling"]), int(table["latent_channels"]), "the `autoencoder:` table"
    if autoencoder["kind"] == "random" and autoencoder["preset"] in RANDOM_PRESET_SHAPES:
        f, c = RANDOM_PRESET_SHAPES[autoencoder["preset"]]
        return f, c, f"latents.autoencoder.preset {autoencoder['preset']}"
    return None


def band_problems(config: dict[str, Any], embedded: list[DatasetSpec], specs: dict[str, DatasetSpec]) -> list[str]:
    """Each embedded dataset's bands against the autoencoder's input channels, where the config alone
    tells them: a trained one takes its dataset's bands, a random preset RGB (weights read from
    files are checked by the latents stage)."""
    autoencoder = config["latents"]["autoencoder"]
    if autoencoder["kind"] == "trained" and not autoencoder["path"] and autoencoder["dataset"] in specs:
        trained_on = specs[autoencoder["dataset"]]
        in_channels, what = trained_on.band_count, f"trained on datasets.{trained_on.name}"
    elif autoencoder["kind"] == "random" and autoencoder["preset"] in RANDOM_PRESET_SHAPES:
        in_channels, what = RGB_BANDS, f"latents.autoencoder.preset {autoencoder['preset']}"
    else:
        return []
    return [f"datasets.{spec.name}.bands: its patches have {spec.band_count} bands, but the autoencoder ({what}) "
            f"takes {in_channels} channels; one latents.autoencoder serves every dataset, so their bands must agree"
            for spec in embedded if spec.band_count != in_channels]


def latent_shape_problems(config: dict[str, Any], specs: list[DatasetSpec]) -> list[str]:
    """The UNet's latent size and channels against what the autoencoder makes of each dataset's patches."""
    made = latents_made(config)
    if made is None or config["training"]["init_from"]:
        return []
    f, channels, source = made
    training, problems = config["training"], []
    for spec in specs:
        side = spec.patch_size // f
        if side != training["latent_size"]:
            problems.append(f"training.latent_size: {training['latent_size']}, but the autoencoder makes {side}x{side} "
                            f"latents of datasets.{spec.name}'s {spec.patch_size} px patches (f{f}, {source}); "
                            f"set training.latent_size: {side}")
    if channels != training["latent_channels"]:
        problems.append(f"training.latent_channels: {training['latent_channels']}, but the autoencoder makes "
                        f"{channels}-channel latents ({source})")
    return problems


def autoencoder_table(config: dict[str, Any]) -> dict[str, Any]:
    """`latents.autoencoder` as the stages get it: kind 'trained' with only a `dataset` points at that
    dataset's autoencoder stage folder, OUT/autoencoder/<dataset>."""
    table = dict(config["latents"]["autoencoder"])
    if table["kind"] == "trained" and not table["path"] and table["dataset"]:
        table["path"] = str(Path(config["output_dir"]) / "autoencoder" / table["dataset"])
    return table


def prepare_config(config: dict[str, Any], base_dir: Path) -> dict[str, DatasetSpec]:
    """Validate a loaded config in place (defaults filled, relative paths taken from ``base_dir``,
    the config file's folder), check the files it names, and resolve its datasets."""
    validate_config(config)
    resolve_paths(config, base_dir)
    specs = resolve_datasets(config, base_dir)
    check_slide_selection(config, specs)
    check_files(config, specs)
    return specs


def check_slide_selection(config: dict[str, Any], specs: dict[str, DatasetSpec]) -> None:
    """synthesize_slide.slides, where it lists input ids: each is an input of a slide (wsi) dataset."""
    selection = config["synthesize_slide"]["slides"]
    if isinstance(selection, str):
        return
    known = {ident for spec in specs.values() if spec.kind == "wsi" for ident in spec.inputs}
    strangers = [ident for ident in selection if ident not in known]
    if strangers:
        raise ConfigError(f"synthesize_slide.slides: {strangers} are not inputs of any slide (wsi) dataset; "
                          f"known: {sorted(known)}")


def selected_slides(selection: str | Sequence[str], inputs: Sequence[str], held_out: Sequence[str],
                    tiled: Sequence[str]) -> list[str]:
    """The input ids of one dataset that `synthesize_slide.slides` selects, among its tiled inputs
    (those that kept patches): "all", "held_out" (the inputs the model never trained on), or a list
    of input ids (of any dataset: the ones of this dataset are taken)."""
    if selection == "all":
        chosen = list(inputs)
    elif selection == "held_out":
        chosen = list(held_out)
    elif isinstance(selection, str):
        raise ConfigError(f"synthesize_slide.slides: {selection!r}; expected all, held_out or a list of input ids")
    else:
        chosen = [ident for ident in inputs if ident in set(selection)]
    tiled = set(tiled)
    return [ident for ident in chosen if ident in tiled]


def load_config(path: str | Path) -> tuple[dict[str, Any], dict[str, DatasetSpec]]:
    """Read, validate and resolve a config file; relative paths in it are relative to its folder."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{path}: cannot read the configuration: {exc}") from exc
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: the configuration must be a mapping")
    try:
        specs = prepare_config(config, path.absolute().parent)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    return config, specs
