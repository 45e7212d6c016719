"""fbft: Forward–Backward Feature Transfer anomaly detection and the Tiny Anomalies benchmark."""

from fbft.config import FBFTConfig, preset
from fbft.model import FBFT

__all__ = ["FBFT", "FBFTConfig", "preset"]
__version__ = "0.1.0"
