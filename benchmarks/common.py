"""Shared by the benchmark scripts: the machine's description, tables, JSON results."""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.utils.benchmark as benchmark

RESULTS = Path(__file__).resolve().parent / "results"


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="CI-sized run (seconds)")
    p.add_argument("--out", type=Path, help="JSON output (default: benchmarks/results/<name>.json)")
    return p


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "torch_threads": torch.get_num_threads(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], Any], device: torch.device, warmup: int, repeat: int) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs after ``warmup`` runs.

    ``torch.utils.benchmark.Timer`` does the timing: it synchronises CUDA around each run
    (whatever ``device`` is; the argument stays for the callers) and fixes the thread count.
    """
    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    if warmup:
        timer.timeit(warmup)
    return float(np.median([timer.timeit(1).median for _ in range(repeat)]))


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """A Markdown table of the given columns (floats to 3 significant digits)."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e5 else f"{v:.3e}"
        return "" if v is None else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def save(name: str, args: argparse.Namespace, rows: list[dict], **extra: Any) -> Path:
    """Write the results with the machine they ran on; returns the path."""
    path = args.out or RESULTS / f"{name}{'-quick' if args.quick else ''}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"benchmark": name, "quick": args.quick, "machine": machine(), "rows": rows, **extra}
    record["date"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")
    print(f"\nwrote {path}")
    return path
