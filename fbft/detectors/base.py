"""The one estimator contract of every detector (FBFT and the baselines), as scikit-learn's
``check_estimator`` holds every estimator to one: ``fit``/``fit_tokens`` return self, one
:class:`NotFittedError` before a fit, ``save``/``load`` of one file format
(:mod:`fbft.detectors.saved`), ``describe()`` with the same keys (:data:`DESCRIBE_KEYS`).

A detector works on teacher tokens, one ``(f_j, f_k)`` pair of ``(N, D)`` arrays per image
(numpy arrays, memory-mapped cache entries or tensors), so one teacher pass per image serves
every method of a study. Settings that only change how maps are made from a fitted detector
(``INFERENCE_FIELDS``) are *variants*: one fit, many predictions.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Self, runtime_checkable

import numpy as np

from fbft.detectors.saved import SavedDetector, read_detector, rebuild_teacher, write_detector

if TYPE_CHECKING:
    from fbft.core.teacher import Teacher

# FBFTConfig fields that need no new fit: a trial evaluates each of them from one detector.
INFERENCE_FIELDS = ("fusion", "distance", "blur")

TokenPair = tuple[Any, Any]  # (f_j, f_k): (N, D) numpy arrays, memmaps or torch tensors
Variant = Mapping[str, Any]  # a subset of INFERENCE_FIELDS -> value; {} = the detector's own
# describe() of every method: the method, its settings, the teacher's identity (None: fitted on
# tokens alone), whether it is fitted, the fitted state's tensor shapes, method-specific facts.
DESCRIBE_KEYS = ("method", "settings", "teacher", "fitted", "state", "extra")


class NotFittedError(RuntimeError):
    """A detector used (predict, save) before ``fit``/``fit_tokens`` or ``load``."""


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
    """What a study trial and serving need from an anomaly detector on teacher tokens."""

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

    def save(self, path: str | os.PathLike[str]) -> Path: ...

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: str | None = None, weights: str | None = None
    ) -> Detector: ...

    def describe(self) -> dict[str, Any]:
        """JSON-able identity with the keys :data:`DESCRIBE_KEYS`."""
        ...


class BaseDetector:
    """What every detector shares: images through its teacher (``fit``, ``predict``,
    ``predict_detailed``), the not-fitted check, save / load / describe. A method fills
    ``fit_tokens`` and ``predict_variants`` (the :class:`Detector` protocol), ``fitted``,
    ``_settings``, ``_state``, ``_extra`` and ``_from_saved``."""

    method: ClassVar[str] = ""
    teacher: Teacher | None
    batch_size: int = 4  # images per teacher pass

    # ------------------------------------------------------------- per method
    @property
    def fitted(self) -> bool:
        raise NotImplementedError

    def _settings(self) -> dict[str, Any]:
        raise NotImplementedError

    def _state(self) -> dict[str, Any]:
        raise NotImplementedError

    def _extra(self) -> dict[str, Any]:
        return {}

    @classmethod
    def _from_saved(
        cls, saved: SavedDetector, where: str, device: str | None, weights: str | None
    ) -> Self:
        raise NotImplementedError

    # ----------------------------------------------------------------- shared
    def check_fitted(self, action: str) -> None:
        """Raise :class:`NotFittedError` (one message shape for every method) before a fit."""
        if not self.fitted:
            raise NotFittedError(
                f"{type(self).__name__} is not fitted: call fit() or fit_tokens() (or "
                f"{type(self).__name__}.load) before {action}"
            )

    def _teacher_or_error(self) -> Teacher:
        if self.teacher is None:
            raise ValueError(
                f"{type(self).__name__} has no teacher to read images with: build it with one "
                "(fbft.detectors.create_detector) or use fit_tokens / predict_variants on tokens"
            )
        return self.teacher

    def fit(self, images: Iterable[np.ndarray]) -> Self:
        """Fit on nominal HxWx3 uint8 images (one teacher pass each); returns self."""
        return self.fit_tokens(self._teacher_or_error().encode(images, self.batch_size))

    def predict(self, images: Iterable[np.ndarray]) -> tuple[list[np.ndarray], list[float]]:
        """Anomaly maps at each image's original H×W (float32) and image scores."""
        pred = self.predict_detailed(images)
        return pred.maps, pred.scores

    def predict_detailed(self, images: Iterable[np.ndarray]) -> Prediction:
        """Like :meth:`predict`, with seconds per stage (the teacher's, then the method's)."""
        self.check_fitted("predict")
        teacher = self._teacher_or_error()
        out = Prediction(seconds={"teacher": 0.0})
        for sizes, f_j, f_k, seconds in teacher.batches(images, self.batch_size):
            (pred,) = self.predict_variants(list(zip(f_j, f_k, strict=True)), sizes)
            pred.seconds["teacher"] = seconds
            out.extend(pred)
        return out

    def describe(self) -> dict[str, Any]:
        """JSON-able identity (:data:`DESCRIBE_KEYS`)."""
        state = self._state() if self.fitted else {}
        return {
            "method": self.method,
            "settings": self._settings(),
            "teacher": None if self.teacher is None else self.teacher.describe(),
            "fitted": self.fitted,
            "state": {k: list(v.shape) for k, v in state.items()},
            "extra": self._extra(),
        }

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the fitted detector (header + state, atomically); returns the path."""
        from fbft.detectors.saved import teacher_record

        self.check_fitted("save")
        saved = SavedDetector(
            self.method, self._settings(), teacher_record(self.teacher), self._state(),
            self._extra(),
        )  # fmt: skip
        return write_detector(saved, path)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], device: str | None = None, weights: str | None = None
    ) -> Self:
        """A saved detector of this method; ``device`` overrides where it runs, ``weights``
        where its teacher's weights come from (the same weights, checked by SHA-256)."""
        saved = read_detector(path)
        if saved.method != cls.method:
            raise ValueError(
                f"{path} holds a {saved.method} detector, not {cls.method}; load it with "
                "fbft.detectors.load_detector"
            )
        return cls._from_saved(saved, str(path), device, weights)

    @staticmethod
    def _rebuild_teacher(
        saved: SavedDetector, where: str, device: str | None, weights: str | None
    ) -> Teacher:
        return rebuild_teacher(saved.teacher, where, weights, device)
