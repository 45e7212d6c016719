"""GPU intent on the driver: the preset and the GPUs per trial follow what the user asked, or
the GPUs the Ray cluster has or its autoscaler can add, never a silent CPU downgrade.

An autoscaling cluster usually starts with no GPU worker (``min_workers: 0``): reading only
``ray.cluster_resources()`` would turn a GPU sweep into the small CPU preset. So on a remote
cluster with no GPU now, a study with neither ``--gpus-per-trial`` nor ``--preset`` stops
before any trial and names both ways out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fbft.study.checks import CheckError
from fbft.study.options import Options

# `ray up` writes the launcher config here on the head node (where a submitted driver runs).
BOOTSTRAP_CONFIG = Path("~/ray_bootstrap_config.yaml")


@dataclass(frozen=True)
class Capacity:
    """GPUs in the cluster now and, when an autoscaler says so, the most it can scale to."""

    gpus: float
    scalable: float | None = None  # None: no autoscaler, or its node types are unknown
    autoscaler: bool = False
    source: str = ""

    def describe(self) -> str:
        text = f"{self.gpus:g} GPU(s) now"
        if self.scalable is not None:
            return f"{text}, up to {self.scalable:g} with the autoscaler ({self.source})"
        if self.autoscaler:
            return f"{text}, an autoscaler runs (its GPU node types are not visible from here)"
        return f"{text}, no autoscaler"


def capacity(resources: dict[str, float]) -> Capacity:
    """The cluster's GPUs now and what its autoscaler can add (Ray's state API: the cluster
    config the autoscaler reports to the GCS, else `ray up`'s config on the head node)."""
    gpus = float(resources.get("GPU", 0.0))
    scalable, source = _reported_max_gpus()
    if scalable is None:
        scalable, source = _bootstrap_max_gpus(BOOTSTRAP_CONFIG.expanduser())
    return Capacity(gpus, scalable, scalable is not None or _autoscaler_runs(), source)


def _reported_max_gpus() -> tuple[float | None, str]:
    try:
        from ray._private.state import state

        found = state.get_max_resources_from_cluster_config()
    except Exception:  # an older GCS without the autoscaler state service
        return None, ""
    if not found:
        return None, ""
    return float(found.get("GPU", 0)), "node types reported by the autoscaler"


def _bootstrap_max_gpus(path: Path) -> tuple[float | None, str]:
    if not path.is_file():
        return None, ""
    import yaml

    try:
        config = yaml.safe_load(path.read_text()) or {}
        types = config.get("available_node_types", {})
        total = sum(
            float((t.get("resources") or {}).get("GPU", 0)) * int(t.get("max_workers", 0))
            for t in types.values()
        )
    except (OSError, ValueError, TypeError, AttributeError, yaml.YAMLError):
        return None, ""
    return total, f"node types in {path}"


def _autoscaler_runs() -> bool:
    """Whether an autoscaler reports its status to this cluster's GCS."""
    try:
        from ray.experimental.internal_kv import _internal_kv_get

        status = _internal_kv_get("__autoscaling_status")
        return bool(status and json.loads(status).get("autoscaler_report") is not None)
    except Exception:
        return False


@dataclass(frozen=True)
class Intent:
    """What the study runs with: the preset (and why) and the GPUs each trial asks Ray for."""

    preset: str
    reason: str
    gpus_per_trial: float

    def saved(self) -> dict[str, Any]:
        return {"preset": self.preset, "reason": self.reason, "gpus_per_trial": self.gpus_per_trial}


def decide(
    options: Options, cap: Capacity, remote: bool, saved: dict[str, Any] | None = None
) -> Intent:
    """The preset and GPUs per trial (a resumed study keeps the ones it started with)."""
    if saved:
        intent = Intent(saved["preset"], f"{saved['reason']}, kept from the study's start",
                        float(saved["gpus_per_trial"]))  # fmt: skip
        _check_gpus(intent.gpus_per_trial, cap, remote)
        return intent
    asked = options.gpus_per_trial
    if options.preset != "auto":
        preset, reason = options.preset, f"--preset {options.preset}"
    elif asked is not None:
        preset, reason = ("paper" if asked > 0 else "cpu"), f"--gpus-per-trial {asked:g}"
    elif cap.gpus > 0:
        preset, reason = "paper", f"{cap.gpus:g} GPU(s) in the Ray cluster"
    elif remote:
        raise CheckError(no_gpu_message(cap))
    else:
        preset, reason = "cpu", "no GPU on this machine"
    per_trial = asked if asked is not None else min(1.0, cap.gpus)
    if remote and per_trial == 0 and preset != "cpu":
        print(
            f"warning: --preset {preset} with no GPU per trial ({cap.describe()}): trials train "
            "on CPUs; add --gpus-per-trial 1 to wait for GPU workers instead",
            flush=True,
        )
    _check_gpus(per_trial, cap, remote)
    return Intent(preset, reason, float(per_trial))


def no_gpu_message(cap: Capacity) -> str:
    return (
        f"the Ray cluster has no GPU now ({cap.describe()}), and neither --gpus-per-trial nor "
        "--preset says what to run: pass --gpus-per-trial N to wait for GPU workers (an "
        "autoscaler starts them), or --preset cpu to train the smaller CPU preset on CPUs"
    )


def _check_gpus(per_trial: float, cap: Capacity, remote: bool) -> None:
    """A GPU share the cluster cannot reach would leave every trial pending forever."""
    if per_trial <= cap.gpus:
        return
    text = f"--gpus-per-trial {per_trial:g}: the Ray cluster has {cap.gpus:g} GPU(s)"
    if not remote:
        raise CheckError(f"{text}, so no trial could start; ask for at most {cap.gpus:g}")
    if cap.scalable is not None and per_trial > max(cap.gpus, cap.scalable):
        raise CheckError(
            f"{text} and its autoscaler can add at most {cap.scalable:g} ({cap.source}), so no "
            "trial could start; lower --gpus-per-trial or add a larger GPU node type"
        )
    where = (
        f"it can scale to {cap.scalable:g}" if cap.scalable is not None else "if it can scale up"
    )
    print(
        f"{text} now: trials wait for the autoscaler to start GPU workers ({where}); "
        "Ctrl-C stops the study",
        flush=True,
    )
