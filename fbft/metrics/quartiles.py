"""Cumulative quartiles of defect size (Q1..Q4) and the robustness ρ (Tiny Anomalies protocol)."""

from __future__ import annotations

import numpy as np

from fbft.metrics.keys import QUARTILES

__all__ = ["QUARTILES", "cumulative_subsets", "robustness", "size_quartiles"]


def size_quartiles(sizes: np.ndarray) -> np.ndarray:
    """q1, q2, q3: linear quantiles (numpy's default) of all component sizes of a category."""
    return np.quantile(np.asarray(sizes), [0.25, 0.5, 0.75])


def cumulative_subsets(sizes: np.ndarray, quartiles: np.ndarray) -> np.ndarray:
    """Boolean (4, components): Q_i = components with size <= q_i, and Q4 = all components."""
    sizes = np.asarray(sizes)
    return np.vstack(
        [sizes[None] <= np.asarray(quartiles)[:, None], np.ones((1, sizes.size), bool)]
    )


def robustness(aupro_by_quartile: np.ndarray | list[float]) -> float:
    """ρ = w·(1 − s) with w = mean AUPRO over Q1..Q4 and
    s = |AUPRO(Q4) − AUPRO(Q1)| / max(AUPRO(Q1), AUPRO(Q4)).

    ρ = 0 when AUPRO(Q1) and AUPRO(Q4) are both 0.
    """
    a = np.asarray(aupro_by_quartile, dtype=np.float64)
    top = max(a[0], a[3])
    if top == 0:
        return 0.0
    return float(a.mean() * (1 - abs(a[3] - a[0]) / top))
