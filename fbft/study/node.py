"""The node a trial runs on: a GPU that Ray granted must be usable by torch (else the trial
fails at once, in one line, instead of a silent CPU fallback 100× slower), and what the
trial ran on is recorded (device name, torch and CUDA versions, the GPU ids Ray gave it)."""

from __future__ import annotations

import platform
import socket
from typing import Any


class GpuUnusable(Exception):
    """Ray granted this trial a GPU that torch cannot use (a deterministic failure)."""


def granted_gpus() -> list[str]:
    """The GPU ids Ray gave this worker (empty when the trial asked for none)."""
    import ray

    return [str(i) for i in ray.get_gpu_ids()]


def check_gpu(gpu_ids: list[str]) -> None:
    """Fail at once when Ray granted GPUs and torch sees no CUDA device."""
    import torch

    if not gpu_ids:
        return
    available = torch.cuda.is_available()
    count = torch.cuda.device_count() if available else 0
    if available and count > 0:
        return
    import ray

    node = f"{socket.gethostname()} ({ray.util.get_node_ip_address()})"
    raise GpuUnusable(
        f"CUDA unusable on node {node}: Ray granted GPU ids {','.join(gpu_ids)} but torch "
        f"reports torch.cuda.is_available()={available}, device count {count}, torch "
        f"{torch.__version__} built for CUDA {torch.version.cuda or 'none (a CPU build)'}; fix "
        "that node's NVIDIA driver or torch build, or run with --gpus-per-trial 0 --preset cpu"
    )


def device_config(
    base: dict[str, Any], gpu_ids: list[str], share: float = 1.0, gpu_bytes: int | None = None
) -> dict[str, Any]:
    """``device`` stays ``auto`` only where no GPU was granted; with one it is ``cuda``. A trial
    granted a fraction of a GPU (``share`` < 1, e.g. ``--gpus-per-trial 0.25``) keeps its
    tokens within that fraction of the GPU's ``gpu_bytes`` (half of it, as the automatic
    budget does): without this the first trial on a shared GPU takes half of it, the next a
    quarter, ... and the last is left too little for its students and maps."""
    if not gpu_ids:
        return base
    out = {**base, "device": "cuda"} if base.get("device", "auto") == "auto" else dict(base)
    if 0 < share < 1 and out.get("max_token_gb") is None and gpu_bytes:
        out["max_token_gb"] = round(gpu_bytes * share * 0.5 / 1e9, 3)
    return out


def gpu_share() -> tuple[float, int | None]:
    """(the GPU fraction Ray assigned this trial, the bytes of its first GPU when CUDA works)."""
    import ray
    import torch

    share = float(ray.get_runtime_context().get_assigned_resources().get("GPU", 0.0))
    total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    return share, total


def device_tags(gpu_ids: list[str]) -> dict[str, str]:
    """What the trial ran on, for its MLflow runs."""
    import torch

    if gpu_ids and torch.cuda.is_available():
        name = torch.cuda.get_device_name(0)
    else:
        name = f"cpu ({platform.processor() or platform.machine()})"
    return {
        "device_name": name,
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "none",
        "ray_gpu_ids": ",".join(gpu_ids) or "none",
    }
