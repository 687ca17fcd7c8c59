"""tiatoolbox's stain normalisers, imported without tiatoolbox's package-wide imports.

`import tiatoolbox.tools.stainnorm` first runs `tiatoolbox/tools/__init__.py`, which imports every
tool (graph, patchextraction, registration, ...: torch among them), and the same for
`tiatoolbox/utils/__init__.py` (visualisation, metrics, ...). tiatoolbox's environment here holds
only what stainnorm and the modules it imports need (envs/tiatoolbox-lock.txt), so those two
`__init__` files are skipped: bare package modules whose path is the real folder let Python find
the submodules, whose code then runs unchanged. `tiatoolbox/__init__.py` itself (logging set-up and
a YAML registry) does run.
"""

from __future__ import annotations

import importlib
import sys
import types
from pathlib import Path

# The modules the stage imports; tests/test_stain_tiatoolbox.py imports them in the environment.
STAIN_MODULES = ("tiatoolbox.tools.stainnorm", "tiatoolbox.tools.stainextract")
SKIPPED_PACKAGE_INITS = ("tools", "utils")


def import_stain_modules() -> types.ModuleType:
    """`tiatoolbox.tools.stainnorm`, with the modules it imports (and nothing of tools/ or utils/ else)."""
    import tiatoolbox

    root = Path(tiatoolbox.__file__).parent
    for name in SKIPPED_PACKAGE_INITS:
        full = f"tiatoolbox.{name}"
        if full in sys.modules:  # imported whole already (a full tiatoolbox installation)
            continue
        package = types.ModuleType(full, f"tiatoolbox's {name} package, without its __init__")
        package.__path__ = [str(root / name)]
        package.__package__ = full
        sys.modules[full] = package
        setattr(tiatoolbox, name, package)
    for module in STAIN_MODULES:
        importlib.import_module(module)
    return sys.modules["tiatoolbox.tools.stainnorm"]


def tiatoolbox_version() -> str:
    import tiatoolbox

    return tiatoolbox.__version__
