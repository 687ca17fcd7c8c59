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
    "training": {"sampling", "evaluation", "reporting"},
    "latents": {"sampling", "training", "evaluation", "reporting"},
    "tiling": {"embedding", "autoencoder", "latents", "training", "sampling", "evaluation", "reporting", "models"},
    "io": {"tiling", "embedding", "autoencoder", "latents", "training", "sampling", "evaluation", "reporting", "models"},
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
