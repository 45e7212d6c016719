"""PatchCore and SPADE on the same teacher tokens as FBFT (the paper's Table 6).

Both implement :class:`fbft.detector.Detector`; their exact, memory-bounded kNN and greedy
coreset live in :mod:`fbft.baselines.neighbours`.
"""

from fbft.baselines.common import BankConfig, patch_features
from fbft.baselines.neighbours import greedy_coreset, knn
from fbft.baselines.patchcore import PatchCore, PatchCoreConfig
from fbft.baselines.spade import SPADE, SPADEConfig

__all__ = [
    "SPADE",
    "BankConfig",
    "PatchCore",
    "PatchCoreConfig",
    "SPADEConfig",
    "greedy_coreset",
    "knn",
    "patch_features",
]
