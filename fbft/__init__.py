"""fbft: Forward–Backward Feature Transfer anomaly detection and the Tiny Anomalies benchmark.

``FBFT``, ``FBFTConfig`` and ``preset`` load on first use, so ``fbft.data`` and the ``fbft``
command start without importing torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["FBFT", "FBFTConfig", "preset"]
__version__ = "0.1.0"

if TYPE_CHECKING:
    from fbft.config import FBFTConfig, preset
    from fbft.model import FBFT


def __getattr__(name: str) -> Any:
    if name == "FBFT":
        from fbft.model import FBFT

        return FBFT
    if name in ("FBFTConfig", "preset"):
        from fbft import config

        return getattr(config, name)
    raise AttributeError(f"module 'fbft' has no attribute {name!r}")
