"""A slide's whole embedding grid, for `synthesize-slide`: from this pipeline's embedding stage or
imported from TRIDENT/CLAM feature files (``.h5``: datasets ``coords`` (N, 2) level-0 x, y and
``features`` (N, D); the patch's level-0 side in ``coords``' attributes). See
docs/data_contract.md, "Synthetic slides".

The grid is written to ``.npy`` files (an np.memmap for the embeddings), so a slide of any size
is read a band of rows at a time: ``grid.npy`` (rows, cols, D) float32, zeros off tissue, and
``tissue.npy`` (rows, cols) bool.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.embedding.outputs import iter_embeddings, read_embedding_index
from pipeline.errors import PipelineError

GRID_FILE = "grid.npy"
TISSUE_FILE = "tissue.npy"


class SlideGridError(PipelineError):
    """An embedding grid that cannot be a slide's: the message names the file and why."""


@dataclass(frozen=True, eq=False)
class SlideGrid:
    embeddings: np.ndarray  # (rows, cols, D) float32 (a memmap), zeros where there is no tissue
    tissue: np.ndarray  # (rows, cols) bool
    source: str  # the file or folder it came from

    @property
    def shape(self) -> tuple[int, int]:
        return self.tissue.shape


def grid_cells(x: np.ndarray, y: np.ndarray, step: int, source: str) -> tuple[np.ndarray, np.ndarray]:
    """Columns and rows of patches at level-0 (x, y) on a grid of `step` px (anchored at the
    smallest coordinate's phase); a coordinate off that grid or a repeated cell is an error."""
    x, y = np.asarray(x, dtype=np.int64), np.asarray(y, dtype=np.int64)
    if step < 1:
        raise SlideGridError(f"{source}: patch size {step} px")
    if len(x) == 0:
        raise SlideGridError(f"{source}: no patches")
    if (x < 0).any() or (y < 0).any():
        raise SlideGridError(f"{source}: negative patch coordinates")
    for name, values in (("x", x), ("y", y)):
        off = (values - values.min()) % step != 0
        if off.any():
            raise SlideGridError(f"{source}: coordinate {name}={int(values[off][0])} is off the {step}-px patch grid "
                                 f"(anchored at {int(values.min() % step)})")
    cols, rows = x // step, y // step
    cells = rows * (int(cols.max()) + 1) + cols
    unique, counts = np.unique(cells, return_counts=True)
    if (counts > 1).any():
        twice = int(unique[counts > 1][0])
        raise SlideGridError(f"{source}: {int(counts.max())} patches at one grid cell (col "
                             f"{twice % (int(cols.max()) + 1)}, row {twice // (int(cols.max()) + 1)}): duplicate coords")
    return cols, rows


def open_grid(folder: Path, rows: np.ndarray, cols: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
    """An empty ``folder/grid.npy`` memmap (rows, cols, width) float32 and its tissue mask."""
    folder.mkdir(parents=True, exist_ok=True)
    shape = (int(rows.max()) + 1, int(cols.max()) + 1)
    grid = np.lib.format.open_memmap(folder / GRID_FILE, mode="w+", dtype=np.float32, shape=(*shape, width))
    return grid, np.zeros(shape, dtype=bool)


def close_grid(folder: Path, grid: np.ndarray, tissue: np.ndarray, source: str) -> SlideGrid:
    grid.flush()
    np.save(folder / TISSUE_FILE, tissue)
    return SlideGrid(grid, tissue, source)


def write_grid(folder: Path, cols: np.ndarray, rows: np.ndarray, features, source: str) -> SlideGrid:
    """Scatter `features` (N, D), read in chunks, into ``folder/grid.npy`` and ``tissue.npy``."""
    grid, tissue = open_grid(folder, rows, cols, int(features.shape[1]))
    chunk = 4096
    for start in range(0, len(cols), chunk):
        stop = min(start + chunk, len(cols))
        values = np.asarray(features[start:stop], dtype=np.float32)
        if not np.isfinite(values).all():
            raise SlideGridError(f"{source}: non-finite features among patches {start}..{stop - 1}")
        grid[rows[start:stop], cols[start:stop]] = values
        tissue[rows[start:stop], cols[start:stop]] = True
    return close_grid(folder, grid, tissue, source)


def check_width(width: int, expected: int | None, source: str) -> None:
    if expected is not None and width != expected:
        raise SlideGridError(f"{source}: features of width {width}, but the model is conditioned on {expected}-wide "
                             "embeddings (features of another encoder?)")


def grid_from_embeddings(embeddings_dir: str | Path, input_id: str, embedding_key: str, folder: Path,
                         expected_dim: int | None = None) -> SlideGrid:
    """One input's patches of this pipeline's embedding stage (index col, row) as a grid, read
    through the stage's reader one sample at a time."""
    index = read_embedding_index(embeddings_dir)
    rows = index.rows[index.rows.input_id.astype(str) == str(input_id)]
    source = f"{Path(embeddings_dir) / 'index.parquet'} (input {input_id})"
    if rows.empty:
        raise SlideGridError(f"{source}: no patches of input {input_id!r}")
    cols, grid_rows = grid_cells(rows.col.to_numpy(np.int64), rows.row.to_numpy(np.int64), 1, source)  # duplicates
    cell = {key: (int(r), int(c)) for key, r, c in zip(rows.key, grid_rows, cols)}
    grid = tissue = None
    for key, embedding in iter_embeddings(index, rows, embedding_key):
        if grid is None:
            check_width(len(embedding), expected_dim, source)
            grid, tissue = open_grid(folder, grid_rows, cols, len(embedding))
        if len(embedding) != grid.shape[2] or not np.isfinite(embedding).all():
            raise SlideGridError(f"{source}: patch {key!r} has a {len(embedding)}-wide or non-finite embedding")
        grid[cell[key]] = embedding
        tissue[cell[key]] = True
    return close_grid(folder, grid, tissue, source)


def h5_patch_step(attrs, source: str) -> int:
    """A patch's level-0 side from ``coords``' attributes: TRIDENT's ``patch_size_level0``, or
    CLAM's ``patch_size`` times ``downsample`` (or at ``patch_level`` 0)."""
    if "patch_size_level0" in attrs:
        return int(attrs["patch_size_level0"])
    if "patch_size" not in attrs:
        raise SlideGridError(f"{source}: `coords` has no patch_size or patch_size_level0 attribute")
    size = int(attrs["patch_size"])
    if "downsample" in attrs:
        factor = np.asarray(attrs["downsample"], dtype=np.float64).reshape(-1)[0]
        return int(round(size * factor))
    if int(attrs.get("patch_level", -1)) == 0:
        return size
    raise SlideGridError(f"{source}: patch_level {attrs.get('patch_level')} without a downsample attribute: "
                         "the level-0 patch side is unknown")


def grid_from_h5(path: str | Path, folder: Path, expected_dim: int | None = None) -> SlideGrid:
    """A TRIDENT/CLAM feature file as a grid."""
    import h5py

    path = Path(path)
    source = str(path)
    try:
        handle = h5py.File(path, "r")
    except OSError as exc:
        raise SlideGridError(f"{source}: not a readable HDF5 file ({exc})") from exc
    with handle:
        missing = [name for name in ("coords", "features") if not isinstance(handle.get(name), h5py.Dataset)]
        if missing:
            raise SlideGridError(f"{source}: no dataset {' or '.join(missing)} (expected TRIDENT/CLAM `coords` and "
                                 f"`features`; found {sorted(handle.keys())})")
        coords, features = handle["coords"], handle["features"]
        if features.ndim == 3 and features.shape[0] == 1:  # CLAM's extract_features_fp writes (N, D); some (1, N, D)
            features = features[0]
        if coords.ndim != 2 or coords.shape[1] != 2 or features.ndim != 2 or len(features) != len(coords):
            raise SlideGridError(f"{source}: coords {coords.shape} and features {features.shape}: expected (N, 2) "
                                 "and (N, D)")
        check_width(int(features.shape[1]), expected_dim, source)
        attrs = dict(coords.attrs) | {k: v for k, v in handle.attrs.items() if k not in coords.attrs}
        step = h5_patch_step(attrs, source)
        xy = np.asarray(coords[:], dtype=np.int64)
        cols, rows = grid_cells(xy[:, 0], xy[:, 1], step, source)
        return write_grid(folder, cols, rows, features, source)


def load_grid(folder: Path, source: str) -> SlideGrid:
    """A grid written by write_grid (the embeddings memory-mapped)."""
    return SlideGrid(np.load(folder / GRID_FILE, mmap_mode="r"), np.load(folder / TISSUE_FILE), source)


def crop_origins(tissue: np.ndarray, crop: int, min_tissue: float) -> np.ndarray:
    """(N, 2) (row, col) origins of the k x k crops with at least `min_tissue` of tissue positions."""
    rows, cols = tissue.shape
    if rows < crop or cols < crop:
        return np.zeros((0, 2), dtype=np.int64)
    counts = np.lib.stride_tricks.sliding_window_view(tissue.astype(np.int32), (crop, crop)).sum(axis=(2, 3))
    needed = max(1, int(np.ceil(min_tissue * crop * crop)))
    return np.argwhere(counts >= needed).astype(np.int64)
