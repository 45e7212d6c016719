"""Tiny Anomalies metrics: I-AUROC, P-AUROC, AUPRO (exact and the official 99-threshold protocol),
cumulative-quartile AUPRO and the robustness ρ.

``metric_keys`` loads without torch; the rest on first use.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from fbft.metrics.keys import metric_keys, official_keys, score_keys

__all__ = ["Curves", "MetricAccumulator", "evaluate", "metric_keys", "official_keys", "score_keys"]

if TYPE_CHECKING:
    from fbft.metrics.accumulate import Curves, MetricAccumulator, evaluate


def __getattr__(name: str) -> Any:
    if name in ("Curves", "MetricAccumulator", "evaluate"):
        return getattr(importlib.import_module("fbft.metrics.accumulate"), name)
    raise AttributeError(f"module 'fbft.metrics' has no attribute {name!r}")
