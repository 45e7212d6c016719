"""What a served anomaly map says about one image, in a form a client can act on: the map reduced
to a size a JSON answer can carry, and the predicted mask's connected components.

Both work at the image's own H×W: the components are found on the full-resolution map (a 1-px
defect is one component), and the reduced map keeps every block's maximum, so a tiny defect
still shows in it.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage
from skimage.measure import block_reduce

MAX_COMPONENTS = 100  # per image, the highest peaks first; `n_components` counts them all
EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)  # as the metrics (AUPRO) count defects


def reduce_map(anomaly_map: np.ndarray, max_side: int) -> tuple[np.ndarray, int]:
    """(map, f): each cell the maximum of an f×f block of the full map (f = ceil(longest side /
    ``max_side``); blocks at the right and bottom edges may be partial). ``max_side`` 0, or a
    map already that small, gives the full map and f = 1."""
    values = np.asarray(anomaly_map, dtype=np.float32)
    if max_side < 0:
        raise ValueError(f"map_size must be 0 (full resolution) or positive; got {max_side}")
    factor = 1 if max_side == 0 else max(1, math.ceil(max(values.shape) / max_side))
    if factor == 1:
        return values, 1
    return block_reduce(values, (factor, factor), np.max, cval=-np.inf), factor


def components(
    anomaly_map: np.ndarray, threshold: float, limit: int = MAX_COMPONENTS
) -> tuple[list[dict[str, float | int]], int]:
    """(components, count) of the predicted mask ``map > threshold`` (8-connected): per
    component its bounding box (x, y = top-left column and row, width, height, in pixels of the
    image), ``area`` in pixels and ``peak`` (the largest map value in it); the ``limit`` with the
    highest peaks, highest first, and the count of all."""
    values = np.asarray(anomaly_map)
    labels, count = ndimage.label(values > threshold, structure=EIGHT_CONNECTED)
    if count == 0:
        return [], 0
    index = np.arange(1, count + 1)
    peaks = ndimage.maximum(values, labels, index)
    areas = ndimage.sum_labels(np.ones_like(labels), labels, index)
    boxes = ndimage.find_objects(labels)
    order = np.argsort(-np.asarray(peaks), kind="stable")[:limit]
    found = []
    for i in order:
        rows, cols = boxes[i]
        found.append(
            {
                "x": int(cols.start),
                "y": int(rows.start),
                "width": int(cols.stop - cols.start),
                "height": int(rows.stop - rows.start),
                "area": int(areas[i]),
                "peak": float(peaks[i]),
            }
        )
    return found, int(count)
