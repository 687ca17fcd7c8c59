"""Every rule that runs the pipeline names a conda env providing what its code imports, pinned as
in pyproject.toml.

Conda cannot run here, so this is checked statically and generically, so that rules added later are
checked too: Snakemake's own parser lists the workflow's rules; each rule's shell command names
`pipeline <subcommand>`; that subcommand's handler in pipeline.cli and every pipeline module it
reaches (an `ast` import graph, lazy imports inside functions included) give the third-party
imports; the installed distributions' metadata maps import names to package names
(PIL -> pillow, yaml -> pyyaml, skimage -> scikit-image, ...).
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import subprocess
import sys
import tomllib
from functools import cache
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from helpers import REPO

# Prints the workflow's rules as JSON, parsed by Snakemake itself (new rule files included).
LIST_RULES = """
import json, sys
from pathlib import Path
from snakemake.api import SnakemakeApi
from snakemake.settings.types import OutputSettings, ResourceSettings
with SnakemakeApi(OutputSettings()) as api:
    workflow = api.workflow(resource_settings=ResourceSettings(), snakefile=Path(sys.argv[1]),
                            workdir=Path(sys.argv[2]))._workflow
    print(json.dumps([{"name": r.name, "conda": r.conda_env if isinstance(r.conda_env, (str, type(None)))
                       else repr(r.conda_env), "shell": r.shellcmd, "script": r.script,
                       "folder": str(Path(r.snakefile).parent)} for r in workflow.rules]))
"""
# How rules call the package: `{params.pipeline} tile-input ...` (PIPELINE in rules/common.smk).
PIPELINE_CALL = re.compile(r"(?:\{params\.pipeline\}|\{PIPELINE\}|-m pipeline)\s+([A-Za-z][\w-]*)")
# conda-forge names that differ from the PyPI distribution of the same code.
CONDA_TO_PYPI = {"pytorch": "torch"}
# Entries of an env file that are tools, not imports.
ENV_TOOLS = {"python", "pip", "nodejs"}
# Imports of optional features, which the code reports as unavailable when the package is absent
# (a `try/except ImportError` around the import itself is recognised without being listed here).
OPTIONAL_IMPORTS = {
    "clip": "CLIP features in pipeline/evaluation/extractors.py: skipped with a recorded reason",
}
# Environments of tools that cannot share the main one: pinned by their own lock file (every package
# ==, installed with --no-deps), not by pyproject.toml, and never installed here.
ISOLATED_ENVS = {"tiatoolbox.yaml": REPO / "envs" / "tiatoolbox-lock.txt"}
# Packages an isolated env installs in its post-deploy script (from its lock) instead of its yaml.
POST_DEPLOYED = {"tiatoolbox.yaml": {"tiatoolbox"}}


@cache
def workflow_rules() -> tuple[dict, ...]:
    result = subprocess.run([sys.executable, "-c", LIST_RULES, str(REPO / "Snakefile"), str(REPO)],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    return tuple(json.loads(result.stdout.strip().splitlines()[-1]))


def pipeline_rules() -> list[dict]:
    """Rules whose job runs the pipeline: a shell command calling it, or a script."""
    return [rule for rule in workflow_rules()
            if (rule["shell"] and PIPELINE_CALL.search(rule["shell"])) or rule["script"]]


# --- the import graph of the pipeline package ---------------------------------------------------

def module_file(name: str) -> Path | None:
    """The source file of a module of the pipeline package, or None if ``name`` is not one."""
    if name != "pipeline" and not name.startswith("pipeline."):
        return None
    base = REPO.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def is_optional_import(node: ast.Try) -> bool:
    """`try: import x / except ImportError:`: the code runs without x, so an env need not have it."""
    caught = [h.type for h in node.handlers if h.type is not None]
    names = {n.id for t in caught for n in ([t] if isinstance(t, ast.Name) else getattr(t, "elts", []))
             if isinstance(n, ast.Name)}
    return bool(names & {"ImportError", "ModuleNotFoundError"})


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Absolute names of every module imported anywhere in ``tree`` (functions included), except
    under `if TYPE_CHECKING:` and optional `try/except ImportError` imports."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return
        if isinstance(node, ast.Try) and is_optional_import(node):
            for child in node.finalbody + node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            found.add(base)
            # `from pipeline.x import y` may import the submodule pipeline.x.y
            found.update(f"{base}.{alias.name}" for alias in node.names
                         if module_file(f"{base}.{alias.name}") is not None)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def third_party_imports(entry_modules: set[str], code: list[tuple[str, ast.AST]] = (),
                        already_read: frozenset[str] = frozenset()) -> dict[str, str]:
    """Top-level third-party import names reachable from ``entry_modules`` and from ``code`` (pieces
    of a module, by module name) -> a module that imports it. ``already_read`` modules are given as
    pieces in ``code`` and not parsed whole."""
    external: dict[str, str] = {}
    seen: set[str] = set(already_read)
    pending: list[tuple[str, ast.AST | None]] = [(name, None) for name in entry_modules] + list(code)
    while pending:
        name, tree = pending.pop()
        # importing pipeline.a.b runs pipeline/__init__.py and pipeline/a/__init__.py first
        parts = name.split(".")
        pending.extend((".".join(parts[:i]), None) for i in range(1, len(parts)) if ".".join(parts[:i]) not in seen)
        if tree is None:
            path = module_file(name)
            if name in seen or path is None:
                continue
            seen.add(name)
            tree = ast.parse(path.read_text(), filename=str(path))
        path = module_file(name)
        for imported in imported_names(tree, name, path is not None and path.name == "__init__.py"):
            top = imported.split(".")[0]
            if top == "pipeline":
                if imported not in seen:
                    pending.append((imported, None))
            elif top not in sys.stdlib_module_names and top != "__future__":
                external.setdefault(top, name)
    return external


@cache
def subcommand_handlers() -> dict:
    from pipeline.cli import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {name: sub.get_default("func") for name, sub in subparsers.choices.items()}


def module_level(tree: ast.Module) -> ast.Module:
    """A module without its functions and classes: what importing it runs."""
    kept = [n for n in tree.body if not isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return ast.Module(body=kept, type_ignores=[])


def function_closure(tree: ast.Module, name: str) -> list[ast.AST]:
    """Function ``name`` of a module and the module's functions it refers to, transitively."""
    functions = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    found: dict[str, ast.AST] = {}
    pending = [name]
    while pending:
        current = pending.pop()
        if current in found or current not in functions:
            continue
        found[current] = functions[current]
        pending.extend(n.id for n in ast.walk(functions[current]) if isinstance(n, ast.Name))
    return list(found.values())


def imports_of_subcommand(subcommand: str) -> dict[str, str]:
    """Third-party imports of `python -m pipeline <subcommand>`: what importing pipeline.cli runs, the
    handler and the helpers it calls (with their lazy imports), and everything those reach; other
    handlers' lazy imports do not run for this subcommand."""
    handler = subcommand_handlers()[subcommand]
    module = handler.__module__
    tree = ast.parse(module_file(module).read_text())
    code = [(module, module_level(tree))] + [(module, f) for f in function_closure(tree, handler.__name__)]
    if module != "pipeline.cli":
        code.append(("pipeline.cli", module_level(ast.parse(module_file("pipeline.cli").read_text()))))
    return third_party_imports({"pipeline.__main__"}, code, frozenset({"pipeline.cli", module}))


@cache
def import_to_distributions() -> dict[str, set[str]]:
    return {name: {canonicalize_name(d) for d in dists} for name, dists in packages_distributions().items()}


# --- env files and pyproject ----------------------------------------------------------------------

SPEC = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)\s*(.*)$")


def parse_env_entry(entry: str, conda: bool) -> tuple[str, SpecifierSet]:
    """`numpy>=1.26` (pip or conda) or `python=3.11` (conda's fuzzy `=` is `==3.11.*`)."""
    name, spec = SPEC.match(entry).groups()
    spec = spec.replace(" ", "")
    if conda and re.fullmatch(r"=[^=<>!].*", spec):
        spec = f"=={spec[1:]}.*"
    name = canonicalize_name(CONDA_TO_PYPI.get(name, name) if conda else name)
    return name, SpecifierSet(spec)


@cache
def env_packages(env_file: Path) -> dict[str, SpecifierSet]:
    env = yaml.safe_load(env_file.read_text())
    packages: dict[str, SpecifierSet] = {}
    for entry in env["dependencies"]:
        entries = [(e, False) for e in entry["pip"]] if isinstance(entry, dict) else [(entry, True)]
        for text, conda in entries:
            name, spec = parse_env_entry(text, conda)
            assert name not in packages, f"{env_file.name}: {name} is listed twice"
            packages[name] = spec
    return packages


@cache
def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def pyproject_requirements() -> dict[str, SpecifierSet]:
    project = pyproject()["project"]
    texts = list(project["dependencies"]) + [r for group in project["optional-dependencies"].values() for r in group]
    return {canonicalize_name(r.name): r.specifier for r in map(Requirement, texts)}


@cache
def lock_pins(lock_file: Path) -> dict[str, str]:
    """`name==version` lines of a lock file -> {canonical name: version}."""
    pins = {}
    for line in lock_file.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version.strip()
    return pins


def env_file_of(rule: dict) -> Path:
    return (Path(rule["folder"]) / rule["conda"]).resolve()


# --- the tests ----------------------------------------------------------------------------------

def test_the_workflow_is_listed_and_calls_known_subcommands():
    names = {rule["name"] for rule in workflow_rules()}
    assert {"tile_input", "embed_input", "latents_input", "train_dataset", "all"} <= names
    for rule in pipeline_rules():
        for subcommand in PIPELINE_CALL.findall(rule["shell"] or ""):
            assert subcommand in subcommand_handlers(), f"rule {rule['name']} runs `pipeline {subcommand}`, " \
                                                          "which pipeline/cli.py does not define"


def test_the_import_graph_sees_lazy_imports():
    """Guards the checker itself: tile-input reaches openslide and rasterio only through lazy imports."""
    tiling = imports_of_subcommand("tile-input")
    assert {"openslide", "rasterio", "PIL", "yaml", "jsonschema", "numpy"} <= set(tiling)
    assert "torch" not in tiling
    assert "torch" in imports_of_subcommand("train") and "lightning" in imports_of_subcommand("train")
    stain = imports_of_subcommand("stain-input")  # runs in tiatoolbox's env, which has no torch
    assert "tiatoolbox" in stain and "torch" not in stain, stain


@pytest.mark.parametrize("rule", pipeline_rules(), ids=lambda rule: rule["name"])
def test_rule_env_provides_every_import(rule):
    assert isinstance(rule["conda"], str) and rule["conda"], (
        f"rule {rule['name']} ({rule['folder']}) runs the pipeline but names no `conda:` env")
    env_file = env_file_of(rule)
    assert env_file.is_file(), f"rule {rule['name']}: env file {env_file} does not exist"
    isolated = ISOLATED_ENVS.get(env_file.name)
    provided = set(lock_pins(isolated)) if isolated else set(env_packages(env_file))
    imports: dict[str, str] = {}
    for subcommand in PIPELINE_CALL.findall(rule["shell"] or ""):
        imports.update(imports_of_subcommand(subcommand))
    if rule["script"]:
        script = Path(rule["folder"]) / rule["script"]
        imports.update(third_party_imports(set(), [ast.parse(script.read_text())]))
    distributions = import_to_distributions()
    missing = []
    for name, importer in sorted(imports.items()):
        if name in OPTIONAL_IMPORTS:
            continue
        wanted = distributions.get(name)
        if not wanted and isolated and canonicalize_name(name) in provided:
            continue  # the isolated env's own tool (tiatoolbox): never installed here, by design
        assert wanted, (f"rule {rule['name']}: `import {name}` (in {importer}) is not installed here; declare it in "
                        "pyproject.toml, or list it in OPTIONAL_IMPORTS if the code runs without it")
        if not wanted & provided:
            missing.append(f"{name} (imported by {importer}; package {' or '.join(sorted(wanted))})")
    assert not missing, f"rule {rule['name']}: {env_file.relative_to(REPO)} lacks " + ", ".join(missing)


ENV_FILES = sorted((REPO / "envs").glob("*.yaml"))


@pytest.mark.parametrize("env_file", ENV_FILES, ids=lambda path: path.name)
def test_env_pins_agree_with_pyproject(env_file):
    declared = pyproject_requirements()
    if env_file.name in ISOLATED_ENVS:
        check_isolated_env(env_file, declared)
        return
    for name, spec in env_packages(env_file).items():
        if name == "python":
            python = Version(str(next(iter(spec)).version).rstrip(".*"))
            assert python in SpecifierSet(pyproject()["project"]["requires-python"]), (
                f"{env_file.name}: python {spec} is outside requires-python")
            continue
        if name in ENV_TOOLS:
            continue
        assert name in declared, f"{env_file.name}: {name} is not a dependency in pyproject.toml"
        assert spec == declared[name], f"{env_file.name}: {name}{spec} but pyproject.toml says {name}{declared[name]}"


def check_isolated_env(env_file: Path, declared: dict[str, SpecifierSet]) -> None:
    """The yaml and its post-deploy script install exactly the lock; the pipeline's own packages in it
    are within pyproject's ranges (the stage's code runs there too); no torch."""
    pins = lock_pins(ISOLATED_ENVS[env_file.name])
    listed = {name: spec for name, spec in env_packages(env_file).items() if name not in ENV_TOOLS}
    assert set(listed) == set(pins) - POST_DEPLOYED[env_file.name], (
        f"{env_file.name} and its lock differ: only in the yaml {set(listed) - set(pins)}, only in the lock "
        f"{set(pins) - POST_DEPLOYED[env_file.name] - set(listed)}")
    for name, spec in listed.items():
        assert spec == SpecifierSet(f"=={pins[name]}"), f"{env_file.name}: {name}{spec}, the lock says =={pins[name]}"
    script = env_file.with_suffix(".post-deploy.sh").read_text()
    for name in POST_DEPLOYED[env_file.name]:
        assert f"pip install --no-deps {name}=={pins[name]}" in script, f"{env_file.name}'s post-deploy script: {name}"
    for name, version in pins.items():
        if name in declared:
            assert Version(version) in declared[name], (f"{ISOLATED_ENVS[env_file.name].name}: {name}=={version} is "
                                                        f"outside pyproject.toml's {name}{declared[name]}")
    assert "torch" not in pins and "tiatoolbox" not in declared, "tiatoolbox and torch must stay apart"


def test_every_env_file_is_used():
    used = {env_file_of(rule) for rule in pipeline_rules()}
    assert set(ENV_FILES) == used, f"unused env files: {sorted(set(ENV_FILES) - used)}"


@pytest.mark.parametrize("profile", sorted((REPO / "profiles").glob("*/config.yaml")), ids=lambda p: p.parent.name)
def test_no_profile_turns_conda_on(profile):
    """Conda is opt-in (--use-conda): where it is absent, every profile must still run. Snakemake
    also loads profiles/default by itself, so that one above all must not ask for conda."""
    settings = yaml.safe_load(profile.read_text()) or {}
    assert not settings.get("use-conda"), f"{profile} sets use-conda"
    method = settings.get("software-deployment-method", settings.get("sdm", ""))
    assert "conda" not in str(method), f"{profile} sets software-deployment-method {method}"
