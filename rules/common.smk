# Shared set-up: validated config, resolved datasets, and the command that calls the package.
import json
import shlex
import sys
from pathlib import Path

from snakemake.settings.types import DeploymentMethod
from snakemake.utils import validate

sys.path.insert(0, workflow.basedir)  # the pipeline package lives next to this Snakefile

from pipeline.config import resolve_datasets, schema_path, validate_config

validate_config(config)  # first: its message lists every bad key; also fills nested defaults
validate(config, str(schema_path()))
DATASETS = resolve_datasets(config, Path.cwd())
OUT = config["output_dir"]
# Datasets that list at least one encoder go through the embedding and later stages.
EMBEDDED_DATASETS = [name for name, spec in DATASETS.items() if spec.encoders]

# With --use-conda each rule's env provides python; otherwise use the interpreter running
# Snakemake, which has the package installed (a bare `python` may be another one).
_python = "python" if DeploymentMethod.CONDA in workflow.deployment_settings.deployment_method else sys.executable
PIPELINE = (
    f"PYTHONPATH={shlex.quote(workflow.basedir)}${{PYTHONPATH:+:$PYTHONPATH}} "
    f"{shlex.quote(_python)} -m pipeline"
)


def existing(path):
    """Declare an input file only when it exists. A missing slide then becomes a
    recorded `not_found` outcome of its own job instead of stopping the whole workflow."""
    return [path] if Path(path).exists() else []


def encoder_settings_json(dataset):
    """Weights settings of the encoders one dataset uses, as JSON for the embed command."""
    names = DATASETS[dataset].encoders
    return json.dumps({name: config["encoders"][name] for name in names}, sort_keys=True)
