"""Bounded token memory: the teacher tokens that training reads its batches from.

A category at 1036² holds 2 × 5476 × 768 float32 per image (~34 MB), so thousands of images do
not fit in memory. A :class:`TokenStore` keeps each image's ``(f_j, f_k)`` on the device while
they fit its budget, then in (pinned, on CUDA) host memory, then in files: arrays that already
are ``np.memmap`` (feature-cache entries) are referenced, not copied; in-memory arrays beyond the
budget are spilled to a temporary folder of raw files, deleted on :meth:`TokenStore.close`.
Whatever the tier, :meth:`TokenStore.batch` gives the same float32 values, so training is
bit-identical.
"""

from __future__ import annotations

import ctypes
import functools
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

Tier = Literal["device", "host", "memmap"]
TIER_ORDER: tuple[Tier, ...] = ("device", "host", "memmap")
# Share of the free memory an automatic budget may take (the rest: activations, the OS, others).
AUTO_SHARE = 0.5


def available_host_bytes() -> int:
    """``MemAvailable`` of /proc/meminfo (Linux), else the physical memory's size."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def budgets(max_token_gb: float | None, device: torch.device) -> tuple[int, int]:
    """(device bytes, host bytes) the store may hold in memory.

    ``None``: half of the free device memory (CUDA) and half of the available host memory.
    A number caps device + host together (filled device-first).
    """
    free_device = 0
    if device.type == "cuda":
        free_device = int(torch.cuda.mem_get_info(device)[0] * AUTO_SHARE)
    if max_token_gb is None:
        return free_device, int(available_host_bytes() * AUTO_SHARE)
    cap = int(max_token_gb * 1e9)
    on_device = min(cap, free_device)
    return on_device, cap - on_device


@functools.cache
def _malloc_trim() -> Any:
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None


def release_free_memory() -> None:
    """Hand memory that the C allocator keeps after frees back to the OS (glibc only).

    glibc raises its mmap threshold after large frees, so the next large buffers come from the
    heap and their freed space stays resident: without this, the teacher's and the students'
    transient buffers grow peak RSS with the number of batches even though tokens are on disk.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _nbytes(a: Any) -> int:
    return int(a.nelement() * a.element_size()) if isinstance(a, torch.Tensor) else int(a.nbytes)


class TokenStore:
    """Per-image token pairs on the device, in host memory or in files, within a byte budget.

    ``add(f_j, f_k)`` appends one image's ``(N, D)`` tokens (tensors or arrays, float16 or
    float32); ``batch(indices)`` gives float32 ``(len(indices), N, D)`` tensors on ``device``.
    """

    def __init__(self, device: torch.device, max_token_gb: float | None = None) -> None:
        self.device = torch.device(device)
        self.budget = dict(zip(("device", "host"), budgets(max_token_gb, self.device), strict=True))
        self.used = {"device": 0, "host": 0}
        self._entries: list[tuple[str, Any, Any]] = []  # (kind, f_j, f_k); kind "file": path
        self._spill: Path | None = None
        self.tiers: set[Tier] = set()

    @classmethod
    def of(
        cls, pairs: Sequence[tuple[Any, Any]], device: torch.device, max_token_gb: float | None
    ) -> TokenStore:
        """A store holding ``pairs`` (memmaps referenced, the rest placed by the budget)."""
        store = cls(device, max_token_gb)
        for f_j, f_k in pairs:
            store.add(f_j, f_k)
        return store

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def tier(self) -> Tier:
        """The slowest tier in use: ``"memmap"`` if any image is in a file, etc."""
        return max(self.tiers, key=TIER_ORDER.index) if self.tiers else "device"

    def add(self, f_j: Any, f_k: Any) -> None:
        """Place one image's tokens in the fastest tier with room left."""
        if isinstance(f_j, np.memmap) and isinstance(f_k, np.memmap):
            self._entries.append(("memmap", f_j, f_k))
            self.tiers.add("memmap")
            return
        size = _nbytes(f_j) + _nbytes(f_k)
        for tier in ("device", "host"):
            if self.used[tier] + size <= self.budget[tier]:
                self.used[tier] += size
                self._entries.append((tier, self._place(f_j, tier), self._place(f_k, tier)))
                self.tiers.add(tier)  # on a CPU device the device budget is 0: "host"
                return
        f_j, f_k = _numpy(f_j), _numpy(f_k)
        self._entries.append(("file", self._write(f_j, f_k), (f_j.shape, f_j.dtype)))
        release_free_memory()
        self.tiers.add("memmap")

    def _place(self, a: Any, tier: str) -> torch.Tensor:
        t = torch.as_tensor(a).detach()
        if tier == "device":
            return t.to(self.device, copy=t.device == self.device)
        t = t.to("cpu", copy=t.device.type == "cpu")
        return t.pin_memory() if self.device.type == "cuda" else t

    def _write(self, f_j: np.ndarray, f_k: np.ndarray) -> Path:
        if self._spill is None:
            self._spill = Path(tempfile.mkdtemp(prefix="fbft-tokens-"))
        path = self._spill / f"{len(self._entries)}.bin"
        with open(path, "wb") as f:
            np.ascontiguousarray(f_j).tofile(f)
            np.ascontiguousarray(f_k).tofile(f)
        return path

    def _fill(self, index: int, out_j: torch.Tensor, out_k: torch.Tensor) -> None:
        """Copy image ``index``'s tokens into the float32 slots ``out_j``/``out_k``."""
        kind, f_j, f_k = self._entries[index]
        if kind == "file":  # a plain read into the slots: no mapping that would stay resident
            _read_raw_pair(f_j, f_k[1], out_j, out_k)
            return
        if kind == "memmap":
            f_j, f_k = torch.from_numpy(np.array(f_j)), torch.from_numpy(np.array(f_k))
        out_j.copy_(f_j, non_blocking=True)
        out_k.copy_(f_k, non_blocking=True)

    def batch(self, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens of the given images as float32 ``(B, N, D)`` tensors on the device."""
        kind, first, second = self._entries[int(indices[0])]
        shape = second[0] if kind == "file" else tuple(first.shape)
        staging = (
            "cpu" if any(self._entries[int(i)][0] in ("file", "memmap") for i in indices) else None
        )
        device = staging or self.device
        out_j = torch.empty((len(indices), *shape), dtype=torch.float32, device=device)
        out_k = torch.empty_like(out_j)
        for slot, i in enumerate(indices):
            self._fill(int(i), out_j[slot], out_k[slot])
        if staging:
            release_free_memory()
        return out_j.to(self.device), out_k.to(self.device)

    def close(self) -> None:
        """Delete the spill folder (if any) and drop the references."""
        self._entries.clear()
        if self._spill is not None:
            shutil.rmtree(self._spill, ignore_errors=True)
            self._spill = None

    def __enter__(self) -> TokenStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _read_raw_pair(path: Path, dtype: np.dtype, out_j: torch.Tensor, out_k: torch.Tensor) -> None:
    """Read a file of f_j then f_k (raw, C order) into two float32 CPU slots."""
    with open(path, "rb") as f:
        for out in (out_j, out_k):
            if dtype == np.float32:
                f.readinto(memoryview(out.numpy()).cast("B"))
            else:
                part = np.fromfile(f, dtype=dtype, count=out.numel())
                out.copy_(torch.from_numpy(part).reshape(out.shape))


def _numpy(a: Any) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)
