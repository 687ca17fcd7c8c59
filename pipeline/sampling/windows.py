"""Where the sampling and decoding windows sit on a latent canvas."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def window_offsets(size: int, window: int, stride: int, shift: int = 0) -> list[int]:
    """Origins along one axis: 0, then every `stride` from `stride + shift`, plus one flush with the edge.

    With shift 0 this is LID's range(0, size - window + 1, stride), plus the flush origin when
    the stride does not divide size - window (it keeps the edge covered). A shift moves every
    interior window edge while the windows at 0 and at the flush origin keep the borders covered;
    it must leave no gap after the first window (stride + shift <= window).
    """
    if size < window:
        raise ValueError(f"canvas side {size} is smaller than the window {window}")
    if shift and not (0 < shift < stride and stride + shift <= window):
        raise ValueError(f"shift {shift} must be in [0, stride {stride}) with stride + shift <= window {window}")
    offsets = [0] + list(range(stride + shift, size - window + 1, stride))
    if offsets[-1] != size - window:
        offsets.append(size - window)
    return offsets


def max_shift(window: int, stride: int) -> int:
    """The largest shift window_offsets accepts for this window and stride."""
    return max(0, min(stride - 1, window - stride))


@dataclass(frozen=True)
class WindowLayout:
    """Square windows over an (height, width) canvas, listed row-major (row offset outer)."""

    height: int
    width: int
    window: int
    stride: int
    row_shift: int = 0
    column_shift: int = 0

    @property
    def row_offsets(self) -> list[int]:
        return window_offsets(self.height, self.window, self.stride, self.row_shift)

    @property
    def column_offsets(self) -> list[int]:
        return window_offsets(self.width, self.window, self.stride, self.column_shift)

    @property
    def origins(self) -> list[tuple[int, int]]:
        return [(row, column) for row in self.row_offsets for column in self.column_offsets]

    def __len__(self) -> int:
        return len(self.row_offsets) * len(self.column_offsets)

    def coverage(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        """(height, width): how many windows cover each canvas pixel."""
        rows = torch.zeros(self.height, dtype=dtype, device=device)
        columns = torch.zeros(self.width, dtype=dtype, device=device)
        for offset in self.row_offsets:
            rows[offset : offset + self.window] += 1
        for offset in self.column_offsets:
            columns[offset : offset + self.window] += 1
        return rows[:, None] * columns[None, :]


def cells_under(origin: int, window: int, cell: int) -> range:
    """Indices of the cells of side `cell` that a window [origin, origin + window) overlaps."""
    return range(origin // cell, (origin + window - 1) // cell + 1)


@dataclass(frozen=True, eq=False)
class WindowSubset:
    """The windows of a layout that `keep(row, column)` accepts (e.g. those over tissue), with the
    layout's interface; pixels no kept window covers have coverage 0."""

    layout: WindowLayout
    keep: Callable[[int, int], bool]

    def __post_init__(self) -> None:
        object.__setattr__(self, "origins", [o for o in self.layout.origins if self.keep(*o)])

    height = property(lambda self: self.layout.height)
    width = property(lambda self: self.layout.width)
    window = property(lambda self: self.layout.window)
    stride = property(lambda self: self.layout.stride)

    def __len__(self) -> int:
        return len(self.origins)

    def coverage(self, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
        total = torch.zeros(self.height, self.width, dtype=dtype, device=device)
        for row, column in self.origins:
            total[row : row + self.window, column : column + self.window] += 1
        return total
