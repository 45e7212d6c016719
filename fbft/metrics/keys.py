"""Metric names (MLflow-valid, no "@"): importable without numpy's heavier friends or torch,
so command-line help can list them instantly."""

from __future__ import annotations

LIMITS = {"30": 0.3, "10": 0.1, "5": 0.05, "1": 0.01}
QUARTILE_LIMITS = ("30", "5")
QUARTILES = ("q1", "q2", "q3", "q4")
OFFICIAL_PREFIX = "official_"


def metric_keys() -> list[str]:
    """Every key :func:`fbft.metrics.evaluate` returns, in a stable order."""
    keys = ["i_auroc", "p_auroc"] + [f"aupro_{lim}" for lim in LIMITS]
    keys += [f"aupro_{lim}_{q}" for lim in QUARTILE_LIMITS for q in QUARTILES]
    return keys + [f"rho_{lim}" for lim in QUARTILE_LIMITS] + ["size_q1", "size_q2", "size_q3"]


def score_keys() -> list[str]:
    """The keys that measure detection quality (higher is better): what a search may maximise."""
    return [k for k in metric_keys() if not k.startswith("size_")]


def official_keys() -> list[str]:
    """Keys of the official 99-threshold protocol: the AUPRO and ρ keys with ``official_``."""
    return [OFFICIAL_PREFIX + k for k in metric_keys() if k.startswith(("aupro_", "rho_"))]
