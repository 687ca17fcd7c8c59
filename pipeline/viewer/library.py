"""OpenSeadragon, the viewer's pan and zoom: from the npm registry, never committed.

``package.json`` and ``package-lock.json`` at the repository's root pin it; the first viewer
build runs ``npm ci`` there (into the git-ignored ``node_modules/``), and every build copies the
library into the site, so the site works offline and from the file system.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import subprocess
from pathlib import Path

from pipeline.errors import PipelineError

REPOSITORY = Path(__file__).resolve().parents[2]
PACKAGE = "openseadragon"
BUILD = Path("node_modules") / PACKAGE / "build" / PACKAGE  # openseadragon.min.js, images/
SCRIPT = "openseadragon.min.js"


def locked_version(root: Path) -> str:
    lock = root / "package-lock.json"
    if not lock.is_file():
        raise PipelineError(f"{lock}: not found; the viewer installs OpenSeadragon with npm from the repository's "
                            "package.json and package-lock.json (run it from a checkout of the repository)")
    try:
        return json.loads(lock.read_text())["packages"][f"node_modules/{PACKAGE}"]["version"]
    except (KeyError, json.JSONDecodeError) as exc:
        raise PipelineError(f"{lock}: does not pin {PACKAGE} ({exc})") from exc


def installed_version(root: Path) -> str | None:
    manifest = root / "node_modules" / PACKAGE / "package.json"
    try:
        return json.loads(manifest.read_text()).get("version")
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def openseadragon_build(root: Path = REPOSITORY) -> Path:
    """The folder holding openseadragon.min.js and its button images, installed with `npm ci`
    when missing or not the locked version."""
    wanted = locked_version(root)
    build = root / BUILD
    if installed_version(root) == wanted and (build / SCRIPT).is_file():
        return build
    npm = shutil.which("npm")
    if npm is None:
        raise PipelineError("npm not found: the viewer installs OpenSeadragon from the npm registry once "
                            f"(`npm ci` in {root}); install Node.js with npm (Debian: apt-get install npm)")
    # One install at a time (parallel builds, tests): npm ci first deletes node_modules/.
    with open(root / "package-lock.json", "rb") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if installed_version(root) != wanted or not (build / SCRIPT).is_file():
            result = subprocess.run([npm, "ci", "--ignore-scripts", "--no-audit", "--no-fund", "--omit=dev"],
                                    cwd=root, capture_output=True, text=True)
            if result.returncode != 0:
                raise PipelineError(f"`npm ci` in {root} failed (exit {result.returncode}):\n"
                                    f"{(result.stdout + result.stderr)[-2000:]}")
    if installed_version(root) != wanted or not (build / SCRIPT).is_file():
        raise PipelineError(f"{root / BUILD / SCRIPT}: still missing after `npm ci` ({PACKAGE} {wanted} expected)")
    return build


def copy_library(build: Path, destination: Path) -> None:
    """The script, its button images and its licence into ``destination``."""
    destination.mkdir(parents=True)
    shutil.copy2(build / SCRIPT, destination / SCRIPT)
    shutil.copytree(build / "images", destination / "images")
    licence = build.parents[1] / "LICENSE.txt"
    if licence.is_file():
        shutil.copy2(licence, destination / "LICENSE.txt")
