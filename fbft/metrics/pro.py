"""PRO and ROC curves from sorted nominal scores, in one pass shared by every limit and subset.

Notation: nominal pixels are the pixels outside every ground-truth component (of all images,
nominal images included); positive pixels are the component pixels. Every positive pixel carries
one weight per *row* (a component subset Q1..Q4 for PRO, or 1/P for the pixel ROC), so that the
PRO/TPR at a threshold t is the summed weight of the positive pixels counted at t.

Exact curve (MVTec AD's evaluation, a pixel counts when its score >= t): for the distinct
positive values u_1 > u_2 > ... with row weights W_k and cumulative C_k, the curve is the polyline
(0,0), (#nom>u_k / N, C_{k-1}), (#nom>=u_k / N, C_k) for k = 1..m, (1,1). Between the positive
values the curve is horizontal, so these vertices give exactly the area of the curve with one
point per distinct score, and the segment of a tie between nominal and positive pixels is the
same diagonal.

Official curve (the L2BT code, ``num_thresholds``): thresholds are the sorted nominal scores at
positions ``linspace(0, N-1, K)`` cast to int, FPR = 1 - (pos+1)/N, a component pixel counts when
its score is strictly greater than the threshold, and the point (1, 1) is added.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch


class SortedScores:
    """Ascending nominal scores, sorted once: in place with numpy (``device=None``), or with
    torch on ``device`` (a CUDA device; falls back to numpy, with a warning, when it is out of
    memory — the result is the same)."""

    def __init__(self, values: np.ndarray, device: torch.device | None = None) -> None:
        self.size = int(values.size)
        self.dtype = values.dtype
        self._tensor: torch.Tensor | None = None
        self._array: np.ndarray | None = None
        if device is not None:
            try:
                self._tensor = torch.sort(torch.from_numpy(values).to(device)).values
                return
            except torch.OutOfMemoryError:
                warnings.warn(
                    f"sorting {self.size} scores does not fit on {device}; sorting on the CPU",
                    stacklevel=2,
                )
        values.sort()
        self._array = values

    def count_below(self, values: np.ndarray, inclusive: bool) -> np.ndarray:
        """For each value v: #scores < v (or <= v when ``inclusive``)."""
        side = "right" if inclusive else "left"
        if self._array is not None:
            return np.searchsorted(self._array, values.astype(self.dtype), side=side)
        needles = torch.from_numpy(np.ascontiguousarray(values.astype(self.dtype))).to(
            self._tensor.device
        )
        return torch.searchsorted(self._tensor, needles, side=side).cpu().numpy()

    def take(self, positions: np.ndarray) -> np.ndarray:
        """Scores at ascending-order positions."""
        if self._array is not None:
            return self._array[positions]
        index = torch.from_numpy(positions).to(self._tensor.device)
        return self._tensor[index].cpu().numpy()


def exact_curves(
    nominal: SortedScores, scores: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Exact curve vertices: x of shape (2m+2,), y of shape (rows, 2m+2).

    ``scores``: positive pixel scores (P,); ``weights``: (rows, P) per-pixel weights, each row
    summing to 1.
    """
    order = np.argsort(scores)[::-1]
    desc = scores[order]
    starts = np.flatnonzero(np.r_[True, desc[1:] != desc[:-1]])
    values = desc[starts]
    group_weight = np.add.reduceat(weights[:, order], starts, axis=1)
    cum = np.cumsum(group_weight, axis=1)
    n = nominal.size
    above = n - nominal.count_below(values, inclusive=True)  # nominal > u_k
    at_or_above = n - nominal.count_below(values, inclusive=False)  # nominal >= u_k
    m = values.size
    x = np.empty(2 * m + 2)
    x[0], x[-1] = 0.0, 1.0
    x[1:-1:2] = above / n
    x[2:-1:2] = at_or_above / n
    y = np.empty((weights.shape[0], 2 * m + 2))
    y[:, 0], y[:, -1] = 0.0, 1.0
    y[:, 1] = 0.0
    y[:, 3:-1:2] = cum[:, :-1]
    y[:, 2:-1:2] = cum
    # Guard against float drift in the cumulative sums: the curve ends at PRO = 1.
    np.clip(y, None, 1.0, out=y)
    return x, y


def official_curves(
    nominal: SortedScores,
    scores: np.ndarray,
    component: np.ndarray,
    sizes: np.ndarray,
    subsets: np.ndarray,
    num_thresholds: int,
) -> tuple[np.ndarray, np.ndarray]:
    """The L2BT protocol's curve: x (K+1,), y (subsets, K+1), in increasing FPR order.

    ``component``: component index of each positive pixel; ``sizes``: pixels per component;
    ``subsets``: boolean (rows, components) membership.
    """
    n = nominal.size
    positions = np.linspace(0, n - 1, num=num_thresholds, dtype=int)
    thresholds = nominal.take(positions)
    fpr = 1.0 - (positions + 1) / n
    # bins[p] = number of thresholds strictly below the pixel's score = thresholds it exceeds.
    bins = np.searchsorted(thresholds, scores.astype(thresholds.dtype), side="left")
    hist = np.bincount(
        component * (num_thresholds + 1) + bins, minlength=sizes.size * (num_thresholds + 1)
    ).reshape(sizes.size, num_thresholds + 1)
    # exceeding[c, i] = pixels of c above threshold i = pixels with bins > i.
    exceeding = np.cumsum(hist[:, ::-1], axis=1)[:, ::-1][:, 1:]
    overlap = exceeding / sizes[:, None]
    pro = (subsets.astype(np.float64) @ overlap) / subsets.sum(axis=1, keepdims=True)
    x = np.r_[1.0, fpr][::-1]
    y = np.concatenate([np.ones((subsets.shape[0], 1)), pro], axis=1)[:, ::-1]
    return x, y


def area(x: np.ndarray, y: np.ndarray, limit: float) -> np.ndarray:
    """Trapezoid area of each row of ``y`` over ``x`` (ascending) up to ``limit``.

    When ``limit`` is not one of the x values, y is interpolated linearly at ``limit`` between
    its neighbours (the rule of the MVTec AD and L2BT evaluation code).
    """
    end = int(np.searchsorted(x, limit, side="right"))
    xs, ys = x[:end], y[:, :end]
    total = (0.5 * (ys[:, 1:] + ys[:, :-1]) * np.diff(xs)).sum(axis=1)
    if not np.any(xs == limit):
        if not 0 < end < x.size:
            raise ValueError(
                f"integration limit {limit} outside the curve's range [{x[0]}, {x[-1]}]"
            )
        x0, x1 = x[end - 1], x[end]
        y0, y1 = y[:, end - 1], y[:, end]
        y_at = y0 + (y1 - y0) * (limit - x0) / (x1 - x0)
        total = total + 0.5 * (y_at + y0) * (limit - x0)
    return total


def truncate(x: np.ndarray, y: np.ndarray, limit: float) -> tuple[np.ndarray, np.ndarray]:
    """The curve restricted to x <= limit, ending at the interpolated point at ``limit``."""
    end = int(np.searchsorted(x, limit, side="right"))
    if end >= x.size or x[end - 1] == limit:
        return x[:end], y[..., :end]
    x0, x1 = x[end - 1], x[end]
    y_at = y[..., end - 1] + (y[..., end] - y[..., end - 1]) * (limit - x0) / (x1 - x0)
    return np.r_[x[:end], limit], np.concatenate([y[..., :end], y_at[..., None]], axis=-1)
