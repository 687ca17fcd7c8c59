"""The package's layering (docs/architecture.md): which packages may import which."""

from __future__ import annotations

import ast

import pytest

from helpers import REPO

PACKAGE = REPO / "pipeline"
# package -> packages it must never import (directly, lazily or not)
FORBIDDEN = {
    "sampling": {"training", "latents", "reporting"},
    "models": {"sampling", "training", "latents", "evaluation", "reporting", "tiling", "autoencoder"},
    "autoencoder": {"embedding", "latents", "training", "sampling", "evaluation", "reporting"},
    "training": {"sampling", "evaluation", "reporting", "prior"},
    "prior": {"sampling", "latents", "evaluation", "reporting", "autoencoder"},
    "latents": {"sampling", "training", "evaluation", "reporting"},
    "tiling": {"embedding", "autoencoder", "latents", "training", "sampling", "evaluation", "reporting", "models"},
    "io": {"tiling", "embedding", "autoencoder", "latents", "training", "sampling", "evaluation", "reporting", "models",
           "stain", "viewer"},
    # runs in tiatoolbox's environment, which has no torch: nothing of the torch stages
    "stain": {"tiling", "embedding", "autoencoder", "latents", "training", "sampling", "evaluation", "reporting",
              "models"},
    # reads the stages' files itself (no torch in its env); only the sampling stage's reader may join
    "viewer": {"tiling", "embedding", "autoencoder", "latents", "training", "evaluation", "reporting", "models",
               "stain"},
}


def imported_packages(package: str) -> dict[str, str]:
    """pipeline.<x> packages imported anywhere in pipeline/<package>/ -> the first file doing so."""
    found: dict[str, str] = {}
    for path in sorted((PACKAGE / package).rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            for name in names:
                parts = name.split(".")
                if parts[0] == "pipeline" and len(parts) > 1:
                    found.setdefault(parts[1], str(path.relative_to(REPO)))
    return found


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_layering(package):
    imports = imported_packages(package)
    wrong = {name: where for name, where in imports.items() if name in FORBIDDEN[package]}
    assert not wrong, f"pipeline.{package} imports {wrong}"


def test_the_workflow_plans_its_jobs_without_importing_torch():
    """Every snakemake start (dry runs, each SLURM job step) parses the rule files: what they import
    of the package must not pull in torch (seconds per start); the jobs' own commands do."""
    import re
    import subprocess
    import sys

    modules = sorted({m for path in (REPO / "rules").glob("*.smk")
                      for m in re.findall(r"^\s*from (pipeline[\w.]*) import", path.read_text(), re.M)})
    assert "pipeline.config" in modules and "pipeline.tiling.status" in modules
    probe = f"import sys; [__import__(m) for m in {modules!r}]; print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'webdataset')))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", result.stdout[:500]
