"""The numeric precision a stage computes in: float32 (the CPU default and the fidelity
reference) or bfloat16 autocast (the GPU default)."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "float32", "bfloat16")


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype for `precision` on `device`, or None for plain float32.

    "auto" is bfloat16 on CUDA and float32 elsewhere; "bfloat16" also works on the CPU (slower
    there, but it is how the bf16 path is tested without a GPU).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    device = torch.device(device)
    if precision == "bfloat16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def autocast(precision: str, device: torch.device | str):
    """A context computing matmuls and convolutions in `precision` (nothing changes for float32)."""
    dtype = autocast_dtype(precision, device)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=dtype)


def lightning_precision(precision: str, accelerator: str = "auto") -> str:
    """The Lightning trainer's precision for a stage's `precision` setting: "auto" is bf16 mixed
    precision where the run will use CUDA, full float32 elsewhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {PRECISIONS}")
    on_gpu = accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    if precision == "bfloat16" or (precision == "auto" and on_gpu):
        return "bf16-mixed"
    return "32-true"
