"""The image score of the Tiny Anomalies protocol: the mean of a map's top 0.1% pixels.

It lives with the metrics (the protocol defines it: ``evaluate`` scores maps with it when no
scores are given) and the detectors' maps use the same function, so both always agree.
"""

from __future__ import annotations

from typing import Any

import numpy as np

TOP_FRACTION = 0.001


def image_score(anomaly_map: Any) -> float:
    """Mean of the top max(1, int(0.001·H·W)) values of a map (accumulated in float64).

    ``anomaly_map``: a numpy array or a torch tensor (a CUDA one is reduced on its device).
    """
    if type(anomaly_map).__module__.startswith("torch"):
        if anomaly_map.device.type != "cpu":
            import torch

            values = anomaly_map.reshape(-1)
            k = max(1, int(TOP_FRACTION * values.numel()))
            return float(torch.topk(values, k).values.double().mean())
        anomaly_map = anomaly_map.numpy()
    values = np.asarray(anomaly_map).reshape(-1)
    k = max(1, int(TOP_FRACTION * values.size))
    return float(np.partition(values, values.size - k)[values.size - k :].mean(dtype=np.float64))
