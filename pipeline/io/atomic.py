"""Write files and folders so that a killed job never leaves something that looks finished.

Everything is written under a temporary name in the destination's own folder (same file
system, so the final rename is atomic) and renamed only once complete.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path


def temp_sibling(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_file(final: str | Path) -> Iterator[Path]:
    """Yield a temporary path; on success it is renamed to ``final`` (replacing it)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_sibling(final)
    try:
        yield temp
        os.replace(temp, final)
    finally:
        remove_path(temp)


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder; on success it replaces ``final`` as a whole."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_sibling(final)
    temp.mkdir()
    try:
        yield temp
        move_dir_into_place(temp, final)
    finally:
        remove_path(temp)


def move_dir_into_place(folder: str | Path, final: str | Path) -> None:
    """Rename a complete folder (in the same parent) to ``final``, replacing whatever is there."""
    folder, final = Path(folder), Path(final)
    if final.exists():
        # A folder cannot be replaced in one rename: move the old one aside first.
        old = temp_sibling(final)
        os.replace(final, old)
        os.replace(folder, final)
        remove_path(old)
    else:
        os.replace(folder, final)


def write_bytes_atomic(final: str | Path, data: bytes) -> None:
    with atomic_file(final) as temp:
        temp.write_bytes(data)


def write_text_atomic(final: str | Path, text: str) -> None:
    write_bytes_atomic(final, text.encode())
