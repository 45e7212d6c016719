"""Decision thresholds calibrated on nominal images, so a map or a score becomes a yes/no answer.

Rule (both levels): with ``n`` nominal values, at most ``k = floor(target_fpr * n)`` of them may
lie strictly above the threshold, so the threshold is the ``(k + 1)``-th largest nominal value and
a value is anomalous when it is ``> threshold``. With ``n < 1 / target_fpr`` no nominal value may
exceed it (``k = 0``): the threshold is the largest nominal value, the smallest FPR those images
can show is ``1 / n`` and ``source`` says so. Calibrate on nominal images the students did not
train on (their scores are lower than unseen nominal images' and give too low a threshold).

Pixels: every nominal pixel counts, up to :data:`PIXEL_CAP`; above that each map contributes a
uniform random subsample (fixed seed) of its share of the cap, which bounds the memory to
``4 * PIXEL_CAP`` bytes while the quantile moves by well under 1e-3 in rank.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

PIXEL_CAP = 50_000_000


@dataclass(frozen=True)
class Thresholds:
    """Image and pixel thresholds (anomalous when ``> threshold``) and how they were obtained."""

    image: float
    pixel: float
    target_fpr: float
    n_images: int
    source: str
    # The overlays' fixed colour scale (vmin, vmax): see :func:`colour_range`. None in records
    # written before it existed.
    colour_range: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.colour_range is not None:  # JSON gives a list
            object.__setattr__(self, "colour_range", tuple(map(float, self.colour_range)))

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> Thresholds:
        return cls(**json.loads(text))

    def save(self, path: str | os.PathLike[str]) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Thresholds:
        path = Path(path)
        try:
            return cls.from_json(path.read_text())
        except FileNotFoundError as err:
            raise FileNotFoundError(f"no thresholds file at {str(path)!r}") from err
        except (json.JSONDecodeError, TypeError) as err:
            raise ValueError(f"{path}: not a thresholds JSON file ({err})") from err


def upper_quantile(values: np.ndarray, target_fpr: float) -> tuple[float, str]:
    """The ``(floor(target_fpr * n) + 1)``-th largest value and a note on how it was chosen."""
    _check_fpr(target_fpr)
    values = np.asarray(values, dtype=np.float64).ravel()
    n = values.size
    if n == 0:
        raise ValueError("calibration needs at least one nominal value; got none")
    if not np.isfinite(values).all():
        raise ValueError("calibration values contain NaN or inf; check the maps/scores")
    k = int(np.floor(target_fpr * n))
    value = float(np.partition(values, n - 1 - k)[n - 1 - k])
    if k == 0:
        why = f"1/target_fpr = {1 / target_fpr:g}" if target_fpr else "target_fpr = 0"
        return value, (
            f"max of {n} nominal values (fewer than {why}: the smallest FPR they can show "
            f"is 1/{n} = {1 / n:.3g})"
        )
    return value, f"{k + 1}-th largest of {n} nominal values (at most {k} above)"


def nominal_pixels(maps: Iterable[np.ndarray], cap: int = PIXEL_CAP, seed: int = 0) -> np.ndarray:
    """All pixels of the maps as float32, or a uniform random subsample of ``cap`` of them."""
    maps = maps if isinstance(maps, Sequence) else list(maps)
    total = sum(int(np.size(m)) for m in maps)
    if total <= cap:
        out = np.empty(total, dtype=np.float32)
        start = 0
        for m in maps:
            out[start : start + np.size(m)] = np.asarray(m, dtype=np.float32).ravel()
            start += np.size(m)
        return out
    rng = np.random.default_rng(seed)
    parts = [
        rng.choice(np.asarray(m, dtype=np.float32).ravel(), round(np.size(m) * cap / total))
        for m in maps
    ]
    return np.concatenate(parts)


def calibrate(
    scores: Sequence[float],
    maps: Iterable[np.ndarray],
    target_fpr: float = 0.01,
    pixel_cap: int = PIXEL_CAP,
) -> Thresholds:
    """Thresholds from nominal images' scores and maps (images the students did not train on)."""
    image, image_note = upper_quantile(np.asarray(scores), target_fpr)
    pixels = nominal_pixels(maps, pixel_cap)
    pixel, pixel_note = upper_quantile(pixels, target_fpr)
    return Thresholds(
        image=image,
        pixel=pixel,
        target_fpr=float(target_fpr),
        n_images=len(scores),
        source=f"image: {image_note}; pixel: {pixel_note}",
        colour_range=colour_range(pixels, pixel),
    )


def colour_range(nominal: np.ndarray, pixel: float, low: float = 0.01) -> tuple[float, float]:
    """The overlays' colour scale, fixed when the model is calibrated so that every image, in
    every run, is painted on the same one: from the ``low`` quantile of the nominal pixels to as
    far above the pixel threshold, which sits mid-scale (green in jet: red is anomalous)."""
    vmin = float(np.quantile(nominal, low))
    return vmin, (2 * pixel - vmin) if pixel > vmin else vmin + 1e-6


def decision_metrics(
    scores: Sequence[float], labels: Sequence[int], thresholds: Thresholds | float
) -> dict[str, float]:
    """F1, FPR and TPR of ``score > threshold`` against 0/1 labels (NaN where undefined)."""
    limit = thresholds.image if isinstance(thresholds, Thresholds) else float(thresholds)
    scores_, labels_ = np.asarray(scores, dtype=np.float64), np.asarray(labels).astype(bool)
    if scores_.shape != labels_.shape:
        raise ValueError(f"got {scores_.size} scores but {labels_.size} labels")
    predicted = scores_ > limit
    tp = int((predicted & labels_).sum())
    fp = int((predicted & ~labels_).sum())
    fn = int((~predicted & labels_).sum())
    negatives, positives = int((~labels_).sum()), int(labels_.sum())
    return {
        "f1": 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else float("nan"),
        "fpr": fp / negatives if negatives else float("nan"),
        "tpr": tp / positives if positives else float("nan"),
    }


def _check_fpr(target_fpr: float) -> None:
    if not 0 <= target_fpr < 1:
        raise ValueError(f"target_fpr must be in [0, 1); got {target_fpr!r}")
