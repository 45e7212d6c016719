"""What the device check's steps share: sizes per mode, the recorder of checks, comparisons.

A :class:`Recorder` runs one step's checks in order inside the step's process: each check is
timed, its peak memory recorded (``torch.cuda.max_memory_allocated`` on CUDA, the process's
peak RSS on the CPU), a failure recorded with its traceback instead of ending the step, a check
that no longer fits the step's deadline named as skipped, and the rows written to a JSON file
after every check so that a step killed for time still leaves what it measured.
"""

from __future__ import annotations

import json
import os
import resource
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

# The tiny random-init teacher of tests/tiny.py: DINOv2-shaped, 4 blocks of width 48.
TINY = {"depth": 4, "embed_dim": 48, "num_heads": 2}
VISA_CATEGORY = 905  # training images of a large VisA category (as benchmarks/scale.py)
PAPER_EPOCHS = 50

SIZES: dict[str, dict[str, Any]] = {
    "quick": {  # every step on tiny sizes: the same code, seconds on a CPU
        "model": {"backbone": "vit_small_patch14_reg4_dinov2", "backbone_kwargs": TINY,
                  "image_size": 56, "layers": (2, 4), "epochs": 3, "lr": 1e-3},
        "data_size": 64, "n_train": 6, "n_test": 6,
        "knn": (4000, 200, 64), "coreset": 300,  # (bank rows, queries, width), iterations
        "paper": {"backbone": "vit_base_patch14_reg4_dinov2", "backbone_kwargs": TINY,
                  "image_size": 56, "layers": (3, 4)},
        "batches": (1, 2), "map_side": 1500, "maps": 2, "train_images": 4, "train_side": 64,
        "cached_epochs": 2, "per_epoch_epochs": 1, "timing": (1, 2),
        "bank": (20_000, 96, 32, 256),  # rows, width, projection width, queries
        "study": {"data_size": 64, "n_train": 8, "n_test": 4, "cpus": 0.5, "gpus": 0.0},
    },
    "full": {  # the paper's setting on one GPU (CPU references stay small)
        "model": {"backbone": "vit_small_patch14_reg4_dinov2", "backbone_kwargs": {},
                  "image_size": 224, "layers": (8, 12), "epochs": 10, "lr": 1e-4},
        "data_size": 256, "n_train": 16, "n_test": 12,
        "knn": (50_000, 2000, 384), "coreset": 256,
        "paper": {"backbone": "vit_base_patch14_reg4_dinov2", "backbone_kwargs": {},
                  "image_size": 1036, "layers": (8, 12)},
        "batches": (1, 8), "map_side": 1500, "maps": 8, "train_images": 16, "train_side": 1500,
        "cached_epochs": 3, "per_epoch_epochs": 1, "timing": (3, 10),
        "bank": (1_000_000, 1536, 128, 5476),  # one 1036² image's tokens as queries
        "study": {"data_size": 64, "n_train": 8, "n_test": 4, "cpus": 1.0, "gpus": 0.25},
    },
}  # fmt: skip


class Recorder:
    """The checks of one step, written to ``path`` after each one."""

    def __init__(self, step: str, path: Path, deadline: float, device: str) -> None:
        self.step, self.path, self.deadline = step, Path(path), deadline
        self.device = torch.device(device)
        self.rows: list[dict[str, Any]] = []
        self.state: dict[str, Any] = {}  # what later checks of the step reuse

    def left(self) -> float:
        return self.deadline - time.time()

    def skip(self, name: str, reason: str) -> None:
        self._add({"check": name, "status": f"skipped: {reason}"})

    def check(
        self,
        name: str,
        fn: Callable[[], dict[str, Any] | None],
        estimate_s: float = 0.0,
        needs: Sequence[str] = (),
    ) -> dict[str, Any] | None:
        """Run one check unless its estimate exceeds the time left or what it needs is missing."""
        missing = [n for n in needs if n not in self.state]
        if missing:
            self.skip(name, f"needs {', '.join(missing)} (an earlier check failed)")
            return None
        if self.left() < estimate_s:
            self.skip(name, f"out of time ({self.left():.0f} s left, needs ~{estimate_s:.0f} s)")
            return None
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        try:
            values, status = fn() or {}, "done"
        except TimeoutError as err:  # ran out of its time: named as skipped, as if not started
            values, status = {}, f"skipped: out of time ({err})"
        except Exception as err:  # recorded; the next check still runs
            values = {"traceback": traceback.format_exc()[-2000:]}
            status = f"error: {type(err).__name__}: {str(err)[:300]}"
        row = {"check": name, "status": status, "seconds": time.perf_counter() - start}
        row.update(peak_memory(self.device))
        row.update(values)
        self._add(row)
        return row if status == "done" else None

    def _add(self, row: dict[str, Any]) -> None:
        print(f"  [{self.step}] {row['check']}: {row['status']}", flush=True)
        self.rows.append(row)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.rows, default=str))
        os.replace(tmp, self.path)


def peak_memory(device: torch.device) -> dict[str, float]:
    """Peak device memory of the check (CUDA), or the process's peak RSS so far (CPU)."""
    if device.type == "cuda":
        return {"peak_cuda_gb": torch.cuda.max_memory_allocated(device) / 1e9}
    return {"peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9}


def clock(fn: Callable[[], Any], device: torch.device) -> tuple[Any, float]:
    """(result, seconds) of one call, the device synchronised before and after."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_syncs(fn: Callable[[], Any], device: torch.device) -> tuple[Any, int | None]:
    """(result, CUDA synchronisations ``fn`` made), counted by torch's sync debug mode (None on
    the CPU, where there is nothing to wait for)."""
    if device.type != "cuda":
        return fn(), None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, sum("synchroniz" in str(w.message).lower() for w in caught)


def rel_diff(a: Sequence[Any], b: Sequence[Any]) -> float:
    """max |a - b| / max |a| over paired arrays (0 when equal)."""
    pairs = zip(a, b, strict=True)
    num = max(float(np.abs(np.asarray(x, np.float64) - np.asarray(y)).max()) for x, y in pairs)
    den = max(float(np.abs(np.asarray(x, np.float64)).max()) for x in a)
    return num / den if den else num


def students_rel_diff(a: Any, b: Any) -> float:
    """‖θ_a − θ_b‖ / ‖θ_a‖ over both students' parameters (0 when bit-identical)."""
    sa, sb = a.students.state_dict(), b.students.state_dict()
    diff = sum(float((sa[k].double().cpu() - sb[k].double().cpu()).pow(2).sum()) for k in sa)
    norm = sum(float(sa[k].double().cpu().pow(2).sum()) for k in sa)
    return (diff / norm) ** 0.5


def verdict(values: dict[str, Any], keys: Sequence[str], tolerance: float) -> dict[str, Any]:
    """``values`` with the stated tolerance and ``ok`` = every key within it."""
    return {**values, "tolerance": tolerance, "ok": all(values[k] <= tolerance for k in keys)}
