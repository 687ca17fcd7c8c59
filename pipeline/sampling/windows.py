"""Where the sampling and decoding windows sit on a latent canvas."""

from __future__ import annotations

from dataclasses import dataclass

import torch


def window_offsets(size: int, window: int, stride: int) -> list[int]:
    """Origins along one axis: every `stride` from 0, plus a last one flush with the edge if needed.

    The seed used range(0, size - window + 1, stride) only; the extra origin changes nothing when
    the stride divides size - window (as in the seed) and otherwise keeps the edge covered.
    """
    if size < window:
        raise ValueError(f"canvas side {size} is smaller than the window {window}")
    offsets = list(range(0, size - window + 1, stride))
    if offsets[-1] != size - window:
        offsets.append(size - window)
    return offsets


@dataclass(frozen=True)
class WindowLayout:
    """Square windows over an (height, width) canvas, listed row-major (row offset outer)."""

    height: int
    width: int
    window: int
    stride: int

    @property
    def row_offsets(self) -> list[int]:
        return window_offsets(self.height, self.window, self.stride)

    @property
    def column_offsets(self) -> list[int]:
        return window_offsets(self.width, self.window, self.stride)

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
