"""Where tensors run: device choice, CUDA synchronisation for honest timings, denormal flushing.

Kept apart from the teacher and the detectors so every layer above ``core`` shares one
definition of "auto" and one way to wait for the GPU before reading a clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def resolve_device(device: str) -> torch.device:
    """``"auto"`` -> CUDA when present, else CPU; anything else as given (checked)."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is available; use 'auto' or 'cpu'")
    return dev


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on the CPU): timings read after it are real."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def chunks(items: Iterable[Any], size: int) -> Iterator[list[tuple[int, Any]]]:
    """Consecutive lists of up to ``size`` (index, item) pairs."""
    batch: list[tuple[int, Any]] = []
    for i, item in enumerate(items):
        batch.append((i, item))
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


@contextmanager
def flushed_denormals() -> Iterator[None]:
    """Denormal floats flushed to zero on the CPU within the block.

    Near-zero gradients and the tiny residuals of a random-init teacher (LayerScale 1e-5) produce
    denormal numbers that make CPU arithmetic 10-30x slower; values below 1.2e-38 become 0.
    """
    _FLUSH_DEPTH[0] += 1
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        _FLUSH_DEPTH[0] -= 1
        if _FLUSH_DEPTH[0] == 0:
            torch.set_flush_denormal(False)


_FLUSH_DEPTH = [0]  # nesting depth of flushed_denormals blocks (the flag is process-wide)
