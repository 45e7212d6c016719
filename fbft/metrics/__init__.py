"""Tiny Anomalies metrics: I-AUROC, P-AUROC, AUPRO (exact and the official 99-threshold protocol),
cumulative-quartile AUPRO and the robustness ρ."""

from fbft.metrics.evaluate import Curves, MetricAccumulator, evaluate, metric_keys

__all__ = ["Curves", "MetricAccumulator", "evaluate", "metric_keys"]
