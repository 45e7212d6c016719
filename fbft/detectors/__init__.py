"""Anomaly detectors on teacher tokens: FBFT and the memory-bank family (PatchCore, SPADE).

Every detector implements :class:`fbft.detectors.base.Detector` and is chosen by method name
through :mod:`fbft.detectors.registry`. The memory-bank family's exact, memory-bounded kNN and
greedy coreset live in :mod:`fbft.detectors.neighbours`. Classes load on first use, so naming
a method imports no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from fbft.detectors.registry import (
    DEFAULT_METHOD,
    build,
    create_detector,
    detector_class,
    load_detector,
    methods,
    register_detector,
)

_LAZY = {
    "FBFT": "fbft.detectors.fbft",
    "load_official": "fbft.detectors.fbft",
    "BankConfig": "fbft.detectors.bank",
    "NotFittedError": "fbft.detectors.base",
    "patch_features": "fbft.detectors.bank",
    "greedy_coreset": "fbft.detectors.neighbours",
    "knn": "fbft.detectors.neighbours",
    "PatchCore": "fbft.detectors.patchcore",
    "PatchCoreConfig": "fbft.detectors.patchcore",
    "SPADE": "fbft.detectors.spade",
    "SPADEConfig": "fbft.detectors.spade",
}

__all__ = [
    *_LAZY, "DEFAULT_METHOD", "build", "create_detector", "detector_class", "load_detector",
    "methods", "register_detector",
]  # fmt: skip


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
