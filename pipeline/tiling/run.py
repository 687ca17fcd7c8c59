"""Entry points of the tiling stage: one input, and the dataset summary.

Each input is tiled in a forked child process whose address space may grow by at most the
input's memory limit (RLIMIT_AS). A file whose claims slip past the readers' bounds then fails an
allocation inside the child (``out_of_memory``) instead of taking the machine or the job with it,
and a child that dies anyway (a library's abort, a segfault, a kill) is recorded by the parent as
that input's failure (``reader_crashed``): the input still gets its folder and the dataset its
summary.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sys
from pathlib import Path
from typing import Any

from pipeline.config import DatasetSpec
from pipeline.io.atomic import remove_path, write_text_atomic
from pipeline.tiling.failures import Reason
from pipeline.tiling.outputs import (STATUS_FILE, describe_summary, failed_status, status_json, summarize_dataset,
                                     tile_input, write_failed_folder)

# The tile_input rule's mem_mb; the rule passes its own value through this variable.
MEMORY_ENV = "PIPELINE_TILE_MEMORY_MB"
DEFAULT_MEMORY_MB = 4000
CHILD_FAILED = 70  # exit status of a child that raised past tile_input (a bug: tile_input never raises)


def _opener(kind: str):
    # Imported lazily: a slide-only run need not load rasterio, and vice versa.
    if kind == "wsi":
        from pipeline.tiling.slide import open_slide_source
        return open_slide_source
    if kind == "aerial":
        from pipeline.tiling.aerial import open_aerial_source
        return open_aerial_source
    raise ValueError(f"unknown dataset kind {kind!r}")


def memory_limit_mb() -> int:
    return int(os.environ.get(MEMORY_ENV) or DEFAULT_MEMORY_MB)


def _own_memory_bytes(field: str) -> int | None:
    """A size of this process from /proc/self/status (Linux): ``VmSize`` its mapped address space and
    ``RssAnon`` its resident anonymous memory, both of which a forked child starts with (file-backed
    pages count for the child only once it touches them)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def tile_one(spec: DatasetSpec, input_id: str, out_dir: str | Path, memory_mb: int | None = None) -> dict[str, Any]:
    """Tile the input ``input_id`` of ``spec`` into ``out_dir`` and return its status.

    ``memory_mb``: how far the child's address space may grow (default: PIPELINE_TILE_MEMORY_MB
    or 4000); 0 tiles in this process, unguarded."""
    path, out_dir = spec.inputs[input_id], Path(out_dir)
    memory_mb = memory_limit_mb() if memory_mb is None else memory_mb
    opener = _opener(spec.kind)
    if not memory_mb or not hasattr(os, "fork"):
        return tile_input(spec, input_id, path, out_dir, opener)
    start, shared = _own_memory_bytes("VmSize"), _own_memory_bytes("RssAnon") or 0
    sys.stdout.flush(), sys.stderr.flush()  # nothing buffered is written twice
    pid = os.fork()
    if pid == 0:  # the child: tile, then leave without running the parent's exit handlers
        code = CHILD_FAILED
        try:
            if start is not None:
                limit = start + memory_mb * 2**20
                resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
            tile_input(spec, input_id, path, out_dir, opener)
            code = 0
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
    _, wait_status, usage = os.wait4(pid, 0)
    if os.WIFEXITED(wait_status) and os.WEXITSTATUS(wait_status) == 0 and (out_dir / STATUS_FILE).is_file():
        status = json.loads((out_dir / STATUS_FILE).read_text())
    else:
        status = _record_death(spec, input_id, path, out_dir, pid, wait_status, memory_mb)
    # What tiling this input took: the child's peak resident set (Linux reports KiB) less the pages
    # it shared with this process at the fork, which a large parent (a test session) would dominate.
    status["tiling_memory_mb"] = round(max(usage.ru_maxrss * 1024 - shared, 0) / 2**20, 1)
    write_text_atomic(out_dir / STATUS_FILE, status_json(status))
    return status


def _record_death(spec: DatasetSpec, input_id: str, path: str, out_dir: Path, pid: int, wait_status: int,
                  memory_mb: int) -> dict[str, Any]:
    """Write the folder of an input whose child died, removing what the child left half-written."""
    for leftover in out_dir.parent.glob(f".{out_dir.name}.tmp-{pid}-*"):
        remove_path(leftover)
    if os.WIFSIGNALED(wait_status):
        number = os.WTERMSIG(wait_status)
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        cause = {"SIGKILL": "killed from outside (the kernel's out-of-memory killer, a scheduler)",
                 "SIGABRT": f"a library aborted, most often when an allocation failed under the {memory_mb} MB "
                            "limit"}.get(name, "the reader crashed")
        detail = f"the process tiling it died of {name}: {cause}"
    else:
        detail = f"the process tiling it exited with status {os.WEXITSTATUS(wait_status)} without a status"
    status = failed_status(input_id, path, Reason.READER_CRASHED, detail, dataset=spec.name, kind=spec.kind)
    write_failed_folder(out_dir, status)
    return status


def tile_dataset(spec: DatasetSpec, out_root: str | Path, memory_mb: int | None = None) -> str:
    """Tile every input of a dataset (no Snakemake; each input in its own guarded child) and write the summary."""
    out_root = Path(out_root)
    folders = []
    for input_id in spec.inputs:
        folder = out_root / "inputs" / input_id
        tile_one(spec, input_id, folder, memory_mb)
        folders.append(folder)
    table = summarize_dataset(folders, out_root / "status.tsv", out_root / "manifest.parquet")
    return describe_summary(table)
