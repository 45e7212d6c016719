"""fbft: Forward–Backward Feature Transfer anomaly detection and the Tiny Anomalies benchmark.

The public API loads on first use, so ``fbft.data`` and the ``fbft`` command start without
importing torch. The layers, bottom to top: ``data`` · ``metrics`` · ``core`` (teacher, students,
maps, token store) · ``cache`` · ``detectors`` · ``plots`` · ``serve`` · ``study``
(docs/architecture.md).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "FBFT": "fbft.detectors.fbft",
    "FBFTConfig": "fbft.core.config",
    "preset": "fbft.core.config",
    "PatchCore": "fbft.detectors.patchcore",
    "PatchCoreConfig": "fbft.detectors.patchcore",
    "SPADE": "fbft.detectors.spade",
    "SPADEConfig": "fbft.detectors.spade",
}
__all__ = ["FBFT", "SPADE", "FBFTConfig", "PatchCore", "PatchCoreConfig", "SPADEConfig", "preset"]

if TYPE_CHECKING:
    from fbft.core.config import FBFTConfig, preset
    from fbft.detectors.fbft import FBFT
    from fbft.detectors.patchcore import PatchCore, PatchCoreConfig
    from fbft.detectors.spade import SPADE, SPADEConfig


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fbft' has no attribute {name!r}")
