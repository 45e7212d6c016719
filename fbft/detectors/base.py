"""The detector interface that the study trial uses: FBFT and the baselines implement it.

A detector works on teacher tokens, one ``(f_j, f_k)`` pair of ``(N, D)`` arrays per image
(numpy arrays, memory-mapped cache entries or tensors), so one teacher pass per image serves
every method of a study. Settings that only change how maps are made from a fitted detector
(``INFERENCE_FIELDS``) are *variants*: one fit, many predictions.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

# FBFTConfig fields that need no new fit: a trial evaluates each of them from one detector.
INFERENCE_FIELDS = ("fusion", "distance", "blur")

TokenPair = tuple[Any, Any]  # (f_j, f_k): (N, D) numpy arrays, memmaps or torch tensors
Variant = Mapping[str, Any]  # a subset of INFERENCE_FIELDS -> value; {} = the detector's own


@dataclass
class Prediction:
    """Maps at each image's own H×W (float32), image scores, and seconds spent per stage
    (summed over the images: e.g. ``{"students": 0.8, "maps": 0.1}``)."""

    maps: list[np.ndarray] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def extend(self, other: Prediction) -> None:
        """Append another batch's prediction (maps, scores, stage seconds added up)."""
        self.maps += other.maps
        self.scores += other.scores
        for stage, s in other.seconds.items():
            self.seconds[stage] = self.seconds.get(stage, 0.0) + s


@runtime_checkable
class Detector(Protocol):
    """What a study trial needs from an anomaly detector working on teacher tokens."""

    method: ClassVar[str]  # "fbft", "patchcore", "spade": the child run's `method` tag

    def fit_tokens(self, tokens: Sequence[TokenPair]) -> Detector:
        """Fit on nominal images' tokens; returns self."""
        ...

    def predict_variants(
        self,
        tokens: Sequence[TokenPair],
        sizes: Sequence[tuple[int, int]],
        variants: Sequence[Variant] = ({},),
    ) -> list[Prediction]:
        """One :class:`Prediction` per variant, from one pass over ``tokens``."""
        ...

    def save(self, path: str | os.PathLike[str]) -> Any: ...

    def describe(self) -> dict[str, Any]:
        """JSON-able identity: method, settings, teacher identity."""
        ...


def save_state(state: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a detector's state atomically (a temporary file, then ``os.replace``)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(dict(state), tmp)
    os.replace(tmp, path)
    return path


def load_state(path: str | os.PathLike[str], what: str, version: int) -> dict[str, Any]:
    """Read a detector's state (tensors and plain values only: ``weights_only``), checking
    that the file exists and has the format ``version`` this fbft reads."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved {what} detector at {str(path)!r}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    found = state.get("format_version") if isinstance(state, dict) else None
    if found != version:
        raise ValueError(
            f"{path}: unsupported {what} file format version {found!r} "
            f"(this fbft reads version {version})"
        )
    return state
