"""Thresholds: the quantile rule against brute-force oracles, few images, JSON round trip."""

from __future__ import annotations

import math

import numpy as np
import pytest

from fbft.serve.thresholds import Thresholds, calibrate, decision_metrics, nominal_pixels


def _oracle(values: np.ndarray, fpr: float) -> float:
    """The smallest nominal value with at most fpr * n values strictly above it."""
    values = np.asarray(values, dtype=np.float64).ravel()
    allowed = math.floor(fpr * values.size)
    return min(v for v in values if (values > v).sum() <= allowed)


@pytest.mark.parametrize("n, fpr", [(1000, 0.01), (250, 0.05), (37, 0.1), (200, 0.0)])
def test_image_threshold_matches_oracle(n, fpr):
    rng = np.random.default_rng(n)
    scores = rng.normal(size=n)
    maps = [rng.random((8, 9)) for _ in range(n)]
    t = calibrate(scores, maps, target_fpr=fpr)
    assert t.image == pytest.approx(_oracle(scores, fpr))
    assert t.pixel == pytest.approx(_oracle(np.concatenate([m.ravel() for m in maps]), fpr))
    assert (scores > t.image).mean() <= fpr
    assert t.n_images == n and t.target_fpr == fpr


def test_few_images_give_the_max_and_say_so():
    scores = [0.1, 0.5, 0.3]
    t = calibrate(scores, [np.full((4, 4), s) for s in scores], target_fpr=0.01)
    assert t.image == 0.5
    assert "max of 3" in t.source and "1/3" in t.source


def test_json_round_trip(tmp_path):
    t = Thresholds(image=0.25, pixel=0.125, target_fpr=0.01, n_images=12, source="test")
    assert Thresholds.from_json(t.to_json()) == t
    assert Thresholds.load(t.save(tmp_path / "t.json")) == t
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        Thresholds.load(tmp_path / "missing.json")


def test_pixel_cap_subsamples_and_keeps_the_quantile():
    rng = np.random.default_rng(0)
    maps = [rng.random((100, 100)) for _ in range(20)]
    sample = nominal_pixels(maps, cap=50_000)
    assert sample.dtype == np.float32 and abs(sample.size - 50_000) <= 20
    full = calibrate(np.zeros(20), maps, 0.01)
    capped = calibrate(np.zeros(20), maps, 0.01, pixel_cap=50_000)
    assert capped.pixel == pytest.approx(full.pixel, abs=5e-3)


def test_bad_inputs():
    with pytest.raises(ValueError, match="target_fpr"):
        calibrate([1.0], [np.zeros((2, 2))], target_fpr=1.5)
    with pytest.raises(ValueError, match="at least one"):
        calibrate([], [], 0.01)
    with pytest.raises(ValueError, match="NaN"):
        calibrate([float("nan")], [np.zeros((2, 2))])


def test_decision_metrics_against_counts():
    scores = [0.1, 0.2, 0.9, 0.8, 0.3, 0.7]
    labels = [0, 0, 1, 1, 1, 0]
    out = decision_metrics(scores, labels, 0.5)  # predicted: 0 0 1 1 0 1
    assert out == pytest.approx({"f1": 2 * 2 / (2 * 2 + 1 + 1), "fpr": 1 / 3, "tpr": 2 / 3})
    t = Thresholds(image=0.5, pixel=0.0, target_fpr=0.01, n_images=3, source="")
    assert decision_metrics(scores, labels, t) == out
    assert math.isnan(decision_metrics([0.1], [0], 0.5)["tpr"])
