"""The Tiny Anomalies metrics of one category: I-AUROC, P-AUROC, AUPRO at four FPR limits, the
cumulative-quartile AUPROs and ρ — at the ground truth's original resolution.

Maps may arrive one image at a time (:class:`MetricAccumulator`); :func:`evaluate` is the one-shot
form. Exact mode (default) has one curve point per distinct score, as MVTec AD's evaluation;
``num_thresholds=99`` is the L2BT code's sampled protocol.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage

from fbft.metrics import pro
from fbft.metrics.keys import LIMITS, QUARTILE_LIMITS, metric_keys
from fbft.metrics.quartiles import QUARTILES, cumulative_subsets, robustness, size_quartiles
from fbft.metrics.score import image_score

EIGHT_CONNECTED = np.ones((3, 3), dtype=int)


@dataclass(frozen=True)
class Curves:
    """PRO curves (x = FPR, one y row per subset Q1..Q4) and the pixel ROC curve."""

    fpr: np.ndarray
    pro: dict[str, np.ndarray]
    roc_fpr: np.ndarray
    roc_tpr: np.ndarray

    def up_to(self, max_fpr: float) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The PRO curves restricted to FPR <= max_fpr (for plotting)."""
        rows = np.stack([self.pro[q] for q in QUARTILES])
        x, y = pro.truncate(self.fpr, rows, max_fpr)
        return x, dict(zip(QUARTILES, y, strict=True))


class MetricAccumulator:
    """Collects maps and masks one image at a time; :meth:`compute` gives every metric.

    Memory: one copy of the nominal scores (sorted in place once) and the component pixels.
    ``pixels``: the total number of pixels to come, when known; the nominal scores then go
    straight into one buffer of that size (no merge copy at the end).
    ``device``: where the scores are sorted: "auto" (a CUDA device when present, else numpy on
    the CPU), "cpu", or a torch device such as "cuda:1".
    """

    def __init__(
        self, num_thresholds: int | None = None, device: str = "auto", pixels: int | None = None
    ) -> None:
        if num_thresholds is not None and int(num_thresholds) < 2:
            raise ValueError(f"num_thresholds must be None (exact) or >= 2, got {num_thresholds}")
        self.num_thresholds = num_thresholds
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        # numpy's in-place sort is the fastest on the CPU; torch sorts on a GPU
        self.device = None if device == "cpu" else torch.device(device)
        self._nominal = _Scores(pixels)
        self._positive: list[np.ndarray] = []
        self._component: list[np.ndarray] = []
        self._sizes: list[np.ndarray] = []
        self._labels: list[int] = []
        self._scores: list[float] = []
        self._sorted: pro.SortedScores | None = None
        self.curves: Curves | None = None

    def __len__(self) -> int:
        return len(self._labels)

    def update(
        self,
        anomaly_map: np.ndarray,
        mask: np.ndarray,
        label: int | None = None,
        score: float | None = None,
    ) -> None:
        """Add one image: its HxW map, its HxW ground-truth mask (bool or 0/1), optionally its
        label (0/1 or bool; default: mask has any positive pixel) and image score (default: mean
        of the top max(1, int(0.001·H·W)) map values).

        numpy arrays or torch tensors of any real dtype and device (detached, copied to the CPU;
        float16/bfloat16 widened to float32). Errors name the argument as ``maps[i]`` etc., with
        ``i`` the image's position in this accumulator.
        """
        index = len(self._labels)
        values = _array(anomaly_map, "maps", index)
        truth = _array(mask, "masks", index)
        if values.ndim != 2 or truth.shape != values.shape:
            raise ValueError(
                f"image {index}: the map (maps[{index}]) has shape {values.shape} but the mask "
                f"(masks[{index}]) has shape {truth.shape}; both must be the same HxW (squeeze "
                "batch/channel axes, upsample maps to the mask's size)"
            )
        if not np.issubdtype(values.dtype, np.floating):
            values = values.astype(np.float64)
        if not np.isfinite(values).all():
            raise ValueError(
                f"image {index}: the anomaly map (maps[{index}]) contains NaN or inf values"
            )
        if truth.dtype.kind == "f" and not np.isfinite(truth).all():
            raise ValueError(f"image {index}: the mask (masks[{index}]) contains NaN or inf")
        label = None if label is None else _label(label, index)
        score = None if score is None else _score(score, index)
        truth = truth != 0
        if truth.any():
            labeled, n = ndimage.label(truth, structure=EIGHT_CONNECTED)
            flat, where = labeled.ravel(), np.flatnonzero(truth)
            self._nominal.append(values.ravel()[flat == 0])
            self._positive.append(values.ravel()[where])
            offset = sum(s.size for s in self._sizes)
            self._component.append(flat[where].astype(np.int64) + (offset - 1))
            self._sizes.append(np.bincount(flat[where], minlength=n + 1)[1:])
        else:
            self._nominal.append(values.ravel().copy())
        self._labels.append(int(truth.any()) if label is None else label)
        self._scores.append(image_score(values) if score is None else score)
        self._sorted = None

    def compute(self, num_thresholds: int | str | None = "default") -> dict[str, float]:
        """Every metric of :func:`metric_keys`; ``num_thresholds`` overrides the accumulator's
        mode for this call (the data is sorted once and shared by both modes)."""
        mode = self.num_thresholds if num_thresholds == "default" else num_thresholds
        if not self._labels:
            raise ValueError("no maps to evaluate: give at least one map and mask")
        if not self._sizes:
            raise ValueError(
                f"none of the {len(self._labels)} masks has an anomalous pixel: AUPRO and P-AUROC "
                "are undefined without ground-truth defects (evaluate a test set with defects)"
            )
        nominal = self._sorted_nominal()
        if nominal.size == 0:
            raise ValueError("every pixel is anomalous: the false-positive rate is undefined")
        scores = np.concatenate(self._positive).astype(nominal.dtype, copy=False)
        component = np.concatenate(self._component)
        sizes = np.concatenate(self._sizes)
        quartiles = size_quartiles(sizes)
        subsets = cumulative_subsets(sizes, quartiles)

        # Row weights of every positive pixel: PRO per subset, then the pixel ROC (1/P each).
        per_component = subsets / (sizes[None] * subsets.sum(axis=1, keepdims=True))
        weights = np.vstack(
            [per_component[:, component], np.full((1, scores.size), 1.0 / scores.size)]
        )
        roc_x, y = pro.exact_curves(nominal, scores, weights)
        roc_y, x = y[4], roc_x
        result = {"p_auroc": float(pro.area(roc_x, y[4:], 1.0)[0])}
        if mode is not None:  # the official PRO curve replaces the exact one
            x, y = pro.official_curves(nominal, scores, component, sizes, subsets, int(mode))
        self.curves = Curves(x, dict(zip(QUARTILES, y[:4], strict=True)), roc_x, roc_y)
        aupro = {lim: pro.area(x, y[:4], limit) / limit for lim, limit in LIMITS.items()}
        result["i_auroc"] = self._image_auroc()
        for lim in LIMITS:
            result[f"aupro_{lim}"] = float(aupro[lim][3])
        for lim in QUARTILE_LIMITS:
            for i, q in enumerate(QUARTILES):
                result[f"aupro_{lim}_{q}"] = float(aupro[lim][i])
            result[f"rho_{lim}"] = robustness(aupro[lim])
        for i, q in enumerate(quartiles, start=1):
            result[f"size_q{i}"] = float(q)
        return {key: result[key] for key in metric_keys()}

    def _sorted_nominal(self) -> pro.SortedScores:
        if self._sorted is None:
            dtype = np.result_type(self._nominal.dtype, *self._positive)
            self._sorted = pro.SortedScores(self._nominal.merged(dtype), self.device)
        return self._sorted

    def _image_auroc(self) -> float:
        labels = np.asarray(self._labels)
        scores = np.asarray(self._scores, dtype=np.float64)
        if labels.min() == labels.max():
            warnings.warn(
                "I-AUROC is undefined when every image has the same label "
                f"({'anomalous' if labels[0] else 'nominal'}); reporting NaN",
                stacklevel=3,
            )
            return float("nan")
        negatives = pro.SortedScores(scores[labels == 0].copy())
        positives = scores[labels == 1]
        x, y = pro.exact_curves(
            negatives, positives, np.full((1, positives.size), 1.0 / positives.size)
        )
        return float(pro.area(x, y, 1.0)[0])


def evaluate(
    maps: Sequence[np.ndarray],
    masks: Sequence[np.ndarray],
    labels: Sequence[int] | None = None,
    scores: Sequence[float] | None = None,
    num_thresholds: int | None = None,
) -> dict[str, float]:
    """Every Tiny Anomalies metric of one category (see :func:`metric_keys`).

    maps: HxW float arrays; masks: HxW bool/0-1 arrays of the same shapes. ``labels`` default to
    ``mask.any()``; ``scores`` default to the mean of the top max(1, int(0.001·H·W)) map values.
    ``num_thresholds=None`` is the exact curve; ``99`` is the official L2BT protocol.
    """
    for name, seq in (("masks", masks), ("labels", labels), ("scores", scores)):
        if seq is not None and len(seq) != len(maps):
            raise ValueError(f"got {len(maps)} maps but {len(seq)} {name}")
    if labels is not None:  # every bad value at once: a {-1, 1} or {0, 2} convention is common
        found = sorted({_label_value(v, i) for i, v in enumerate(labels)}, key=float)
        if not set(found) <= {0, 1}:
            raise ValueError(
                f"labels must be binary (0/1 or bool, 1 = anomalous); found the values {found} "
                "(map another convention such as -1/1 or 0/2 to 0/1 first)"
            )
    acc = MetricAccumulator(num_thresholds, pixels=sum(_numel(m) for m in maps))
    for i, (m, g) in enumerate(zip(maps, masks, strict=True)):
        acc.update(
            m,
            g,
            None if labels is None else labels[i],
            None if scores is None else scores[i],
        )
    return acc.compute()


def _array(value: np.ndarray | torch.Tensor, name: str, index: int) -> np.ndarray:
    """A numpy view of a map or mask; tensors detached and copied to the CPU, half precisions
    widened to float32 (numpy sorts neither bfloat16 nor reliably float16)."""
    if isinstance(value, torch.Tensor):
        if value.is_complex():
            raise ValueError(
                f"{name}[{index}] is a complex tensor ({value.dtype}); give real values"
            )
        value = value.detach().cpu()
        if value.dtype in (torch.float16, torch.bfloat16):
            value = value.float()
        return value.numpy()
    array = np.asarray(value)
    if array.dtype.kind not in "biuf":
        raise ValueError(
            f"{name}[{index}] has dtype {array.dtype}; give a real-valued array (bool, int, float)"
        )
    return array.astype(np.float32) if array.dtype == np.float16 else array


def _numel(value: np.ndarray | torch.Tensor) -> int:
    return value.numel() if isinstance(value, torch.Tensor) else int(np.size(value))


def _scalar(value: object, name: str, index: int) -> float | int | bool:
    """One Python number from a number, a numpy scalar or a one-element tensor on any device."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.is_complex():
            raise ValueError(
                f"{name}[{index}] must be one real number, got a {value.dtype} tensor of shape "
                f"{tuple(value.shape)}"
            )
        return value.detach().cpu().item()
    array = np.asarray(value)
    if array.size != 1 or array.dtype.kind not in "biuf":
        raise ValueError(
            f"{name}[{index}] must be one real number, got {value!r} (dtype {array.dtype})"
        )
    return array.item()


def _label_value(value: object, index: int) -> int | float:
    """The label as an int when it is integral (True → 1, 1.0 → 1), else unchanged for the
    error message."""
    number = _scalar(value, "labels", index)
    return int(number) if float(number).is_integer() else number


def _label(value: object, index: int) -> int:
    label = _label_value(value, index)
    if label not in (0, 1):
        raise ValueError(
            f"labels[{index}] is {label!r}; labels must be binary (0/1 or bool, 1 = anomalous)"
        )
    return int(label)


def _score(value: object, index: int) -> float:
    score = float(_scalar(value, "scores", index))
    if not np.isfinite(score):
        raise ValueError(f"scores[{index}] is {score}; image scores must be finite")
    return score


class _Scores:
    """1-D scores appended image by image: one preallocated buffer when the total is known,
    else chunks merged once (chunk by chunk, releasing each) when first needed."""

    def __init__(self, capacity: int | None) -> None:
        self.capacity = capacity
        self.buffer: np.ndarray | None = None
        self.used = 0
        self.chunks: list[np.ndarray] = []

    @property
    def dtype(self) -> np.dtype:
        arrays = [a for a in (self.buffer, *self.chunks) if a is not None]
        return np.result_type(*arrays) if arrays else np.dtype(np.float64)

    def append(self, values: np.ndarray) -> None:
        if self.capacity is not None and not self.chunks:
            if self.buffer is None:
                self.buffer = np.empty(self.capacity, dtype=values.dtype)
            fits = self.used + values.size <= self.buffer.size
            if fits and np.can_cast(values.dtype, self.buffer.dtype, "safe"):
                self.buffer[self.used : self.used + values.size] = values
                self.used += values.size
                return
            self.chunks.append(self.buffer[: self.used])  # continue in chunks
            self.buffer = None
        self.chunks.append(values)

    def merged(self, dtype: np.dtype) -> np.ndarray:
        """All scores in one array of ``dtype`` (the buffer itself when possible)."""
        if not self.chunks and self.buffer is not None and self.buffer.dtype == dtype:
            return self.buffer[: self.used]
        parts = self.chunks if self.buffer is None else [self.buffer[: self.used], *self.chunks]
        merged = np.empty(sum(p.size for p in parts), dtype=dtype)
        start = 0
        while parts:
            part = parts.pop(0)
            merged[start : start + part.size] = part
            start += part.size
        self.buffer, self.used, self.chunks, self.capacity = merged, merged.size, [], merged.size
        return merged
