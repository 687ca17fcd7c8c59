# Shared set-up: validated config, resolved datasets, and the command that calls the package.
import json
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

sys.path.insert(0, workflow.basedir)  # the pipeline package lives next to this Snakefile

from pipeline.config import autoencoder_table, prepare_config, schema_path

# Relative paths in a config are relative to its file's folder (the demo's: this repository).
CONFIG_DIR = workflow.config_settings.configfiles[-1].parent if workflow.config_settings.configfiles else Path(workflow.basedir)
DATASETS = prepare_config(config, CONFIG_DIR)  # first: names every bad key; fills defaults; checks files
validate(config, str(schema_path()))
OUT = config["output_dir"]
# Datasets that list at least one encoder go through the embedding and later stages.
EMBEDDED_DATASETS = [name for name, spec in DATASETS.items() if spec.encoders]
# latents.autoencoder as the stages get it (kind trained: the path of its dataset's autoencoder stage).
AUTOENCODER = autoencoder_table(config)
# The dataset whose autoencoder stage the latents use; the `autoencoder` target trains every
# embedded dataset's when none is used.
TRAINED_AUTOENCODER = config["latents"]["autoencoder"]["dataset"] if AUTOENCODER["kind"] == "trained" and not config["latents"]["autoencoder"]["path"] else None
AUTOENCODER_DATASETS = [TRAINED_AUTOENCODER] if TRAINED_AUTOENCODER else EMBEDDED_DATASETS


def autoencoder_input():
    """The trained autoencoder's finished stage, where the latents and the export use it."""
    return [f"{OUT}/autoencoder/{TRAINED_AUTOENCODER}/metrics.json"] if TRAINED_AUTOENCODER else []

from pipeline.reporting import random_weight_models

# One line on the console when any model is randomly initialised (every output records it too).
_random = [f"{name}: {what}" for name in EMBEDDED_DATASETS if (what := random_weight_models(config, DATASETS[name].encoders))]
if _random:
    logger.warning(f"RANDOM weights, so the images and metrics only show that the pipeline runs -- {'; '.join(_random)}")

# With --use-conda each rule's env provides python; otherwise use the interpreter running
# Snakemake, which has the package installed (a bare `python` may be another one).
_python = "python" if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method else sys.executable
_PYTHONPATH = f"PYTHONPATH={shlex.quote(workflow.basedir)}${{PYTHONPATH:+:$PYTHONPATH}}"
PIPELINE = f"{_PYTHONPATH} {shlex.quote(_python)} -m pipeline"


def pipeline_on_gpus(devices):
    """The pipeline command for a stage that splits its work over `devices` GPUs of one node
    (torchrun: one process each, in one process group)."""
    if devices == 1:
        return PIPELINE
    return (f"{_PYTHONPATH} {shlex.quote(_python)} -m torch.distributed.run --standalone "
            f"--nproc-per-node {devices} -m pipeline")


def existing(path):
    """Declare an input file only when it exists. A missing slide then becomes a
    recorded `not_found` outcome of its own job instead of stopping the whole workflow."""
    return [path] if Path(path).exists() else []


def encoder_settings_json(dataset):
    """Weights settings of the encoders one dataset uses, as JSON for the embed command."""
    names = DATASETS[dataset].encoders
    return json.dumps({name: config["encoders"][name] for name in names}, sort_keys=True)


def tiled_inputs(dataset):
    """The dataset's inputs whose tiling kept patches: only they get embedding and later jobs (read
    from the tiling summary, so the jobs after it are planned once it exists)."""
    from pipeline.tiling.status import inputs_with_patches

    return inputs_with_patches(Path(checkpoints.tile_dataset.get(dataset=dataset).output.status).parent)


def first_stained_input(dataset, stage):
    """The first input of a stain-normalised dataset that kept patches, as its `stage` folder (none: [])."""
    inputs = tiled_inputs(dataset)
    return [f"{OUT}/{stage}/{dataset}/inputs/{inputs[0]}"] if inputs else []


def training_inputs(dataset):
    """Tiled inputs that are not held out: their latents train the model."""
    tiled = set(tiled_inputs(dataset))
    return [ident for ident in DATASETS[dataset].training_inputs if ident in tiled]


# Stain normalisation (rules/stain.smk): datasets with a `stain_normalization` table are embedded
# from their normalised patches. tiatoolbox cannot share the main environment, so its rule runs in
# envs/tiatoolbox.yaml with --use-conda, and otherwise in the virtual environment that
# `pipeline setup-tiatoolbox` builds on first use (pipeline/stain/environment.py).
STAINED_DATASETS = [name for name, spec in DATASETS.items() if spec.stain_normalization]
if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method:
    STAIN_PIPELINE = PIPELINE
else:
    from pipeline.stain.environment import environment_python

    STAIN_PIPELINE = (f"{PIPELINE} setup-tiatoolbox --quiet && "
                      f"{_PYTHONPATH} {shlex.quote(str(environment_python()))} -m pipeline")


def patches_to_embed(dataset, input_id):
    """The folder the embedding stage reads: the tiled input, or its stain-normalised copy."""
    stage = "stain" if DATASETS[dataset].stain_normalization else "tiles"
    return f"{OUT}/{stage}/{dataset}/inputs/{input_id}"


# Whole synthetic slides (rules/synthesize.smk): slide datasets only (aerial regions get GeoTIFFs
# from the large-image stage), the inputs that `synthesize_slide.slides` selects.
from pipeline.config import selected_slides

SLIDE_DATASETS = [name for name in EMBEDDED_DATASETS if DATASETS[name].kind == "wsi"]


def slides_to_synthesize(dataset):
    spec = DATASETS[dataset]
    return selected_slides(config["synthesize_slide"]["slides"], list(spec.inputs), spec.holdout_inputs,
                           tiled_inputs(dataset))


def synthesize_targets(wildcards):
    return [f"{OUT}/synthetic/{dataset}/{ident}/slide.json"
            for dataset in SLIDE_DATASETS for ident in slides_to_synthesize(dataset)]
