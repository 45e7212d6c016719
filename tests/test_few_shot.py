"""Seeded few-shot draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fbft.data import Dataset, Sample, few_shot, open_dataset


def _dataset(n: int = 60) -> Dataset:
    """A dataset of `n` nominal samples whose files are never read."""
    samples = tuple(
        Sample(f"/nowhere/widget/train/good/{i:03d}.png", 0, "good", "widget") for i in range(n)
    )
    return Dataset(Path("/nowhere"), "widget", "train", "mvtec", samples)


def _paths(data: Dataset) -> list[str]:
    return [s.path for s in data]


def test_same_seed_same_images() -> None:
    data = _dataset()
    assert _paths(few_shot(data, 10, seed=3)) == _paths(few_shot(data, 10, seed=3))
    expected = np.random.default_rng(3).permutation(len(data))[:10]
    assert _paths(few_shot(data, 10, seed=3)) == [data[int(i)].path for i in expected]


def test_draws_are_nested_prefixes() -> None:
    data = _dataset()
    five, ten, fifty = (_paths(few_shot(data, k, seed=0)) for k in (5, 10, 50))
    assert set(five) < set(ten) < set(fifty)
    assert ten[:5] == five and fifty[:10] == ten
    assert len(set(fifty)) == 50


def test_seeds_differ() -> None:
    data = _dataset()
    draws = {tuple(_paths(few_shot(data, 5, seed))) for seed in range(5)}
    assert len(draws) == 5


def test_subset_keeps_dataset_metadata() -> None:
    data = _dataset()
    subset = few_shot(data, np.int64(4), seed=1)
    assert isinstance(subset, Dataset) and len(subset) == 4
    assert (subset.root, subset.category, subset.split, subset.format) == (
        data.root,
        "widget",
        "train",
        "mvtec",
    )
    assert len(few_shot(subset, 2, seed=0)) == 2
    assert len(few_shot(data, len(data), seed=0)) == len(data)


def test_shot_count_errors() -> None:
    data = _dataset(12)
    with pytest.raises(ValueError, match="only 12 images") as err:
        few_shot(data, 50, seed=0)
    assert "widget/train" in str(err.value) and "/nowhere" in str(err.value)
    for shots in (0, -3):
        with pytest.raises(ValueError, match="positive"):
            few_shot(data, shots, seed=0)


def test_real_files(mvtec_root: Path) -> None:
    draw = few_shot(open_dataset(mvtec_root, "grid", "train"), 5, seed=0)
    assert draw.sizes() == [(1024, 1024)] * 5
    assert draw[0].image.shape == (1024, 1024, 3)
