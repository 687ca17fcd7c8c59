"""tiatoolbox's own virtual environment, for runs without conda (`pipeline setup-tiatoolbox`).

tiatoolbox 2.1.x declares torch<2.13 and about forty other tight pins, so it can never enter the
main environment (torch 2.14.1). Installing it whole would pull another torch (gigabytes) for a
stage that uses none of it, so the environment gets tiatoolbox without its declared dependencies
plus exactly the packages that the stain normalisers and this pipeline's stain stage import, every
one pinned in `envs/tiatoolbox-lock.txt` and installed with `--no-deps` (nothing else can come in).
`envs/tiatoolbox.yaml` is the same set for `--use-conda`.

The environment lives outside the checkout, under `$RLDIFF_ENV_DIR` (default
`~/.cache/rldiff-pipeline`), in a folder named after the hash of the lock and the Python version:
every checkout and CI run on a machine shares it, and a changed lock gets a new one. It is built
under a lock file (parallel stain jobs wait for the first one) and counts as ready only once its
marker is written, after the stage's imports have been checked in it.

Standard library only (pipeline.io.atomic is too): the Snakemake rules import this module to find
the environment's python.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import sys
import time
import venv
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.io.atomic import write_text_atomic

REPO = Path(__file__).resolve().parents[2]
LOCK_FILE = REPO / "envs" / "tiatoolbox-lock.txt"
ENV_DIR_VARIABLE = "RLDIFF_ENV_DIR"
READY_MARKER = "rldiff-ready.json"
# What the new environment must import before it counts as ready: the stage and tiatoolbox's modules.
CHECK_IMPORTS = ("from pipeline.stain.tia import import_stain_modules; import_stain_modules(); "
                 "import pipeline.stain.normalize, pipeline.cli, sys; "
                 "assert 'torch' not in sys.modules, 'the stain stage imported torch'")


class EnvironmentSetupError(PipelineError):
    """tiatoolbox's environment could not be built; the message says which step failed and why."""


def lock_text() -> str:
    if not LOCK_FILE.is_file():
        raise EnvironmentSetupError(f"{LOCK_FILE} does not exist: tiatoolbox's environment is built from the pinned "
                                    "list in a checkout of this repository")
    return LOCK_FILE.read_text()


def environment_key() -> str:
    """Hash of the pins and the Python version (the environment's folder name)."""
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    return hashlib.sha256(f"{python}\n{lock_text()}".encode()).hexdigest()[:16]


def environment_dir() -> Path:
    root = os.environ.get(ENV_DIR_VARIABLE) or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") \
        / "rldiff-pipeline"
    return Path(root).expanduser().absolute() / f"tiatoolbox-{environment_key()}"


def environment_python(folder: Path | None = None) -> Path:
    return (folder or environment_dir()) / "bin" / "python"


def is_ready(folder: Path) -> bool:
    marker = folder / READY_MARKER
    try:
        return json.loads(marker.read_text()).get("key") == environment_key() and environment_python(folder).exists()
    except (OSError, ValueError):
        return False


def ensure_environment(say=print) -> Path:
    """The environment's folder, built first if it is not ready (about 1.5 minutes, see README)."""
    folder = environment_dir()
    if is_ready(folder):
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another job may be building it: wait, then use its result
        if is_ready(folder):
            return folder
        say(f"building tiatoolbox's environment in {folder} (once per machine and lock file)")
        started = time.perf_counter()
        build(folder)
        seconds = time.perf_counter() - started
        write_text_atomic(folder / READY_MARKER, json.dumps({"key": environment_key(), "lock": str(LOCK_FILE),
                                                             "seconds": round(seconds, 1)}))
        say(f"tiatoolbox's environment is ready ({seconds:.0f} s): {environment_python(folder)}")
    return folder


def build(folder: Path) -> None:
    # clear=True: whatever a killed build left there is replaced (it never got its marker).
    venv.EnvBuilder(with_pip=True, clear=True, symlinks=True).create(folder)
    python = str(environment_python(folder))
    run([python, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:", "--requirement",
         str(LOCK_FILE)], "installing the pinned packages")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    run([python, "-c", CHECK_IMPORTS], "importing the stain stage in it", env=env)


def run(command: list[str], step: str, env: dict[str, str] | None = None) -> None:
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise EnvironmentSetupError(f"tiatoolbox's environment: {step} failed ({' '.join(command[:4])} ...):\n"
                                    f"{(result.stdout + result.stderr)[-3000:]}")
