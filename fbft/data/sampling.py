"""Seeded few-shot subsets of a dataset."""

from __future__ import annotations

import operator

import numpy as np

from fbft.data.common import Dataset


def few_shot(dataset: Dataset, shots: int, seed: int) -> Dataset:
    """The first `shots` samples of the permutation `numpy.random.default_rng(seed).permutation(n)`.

    Samples come in that draw order, so for one seed a smaller draw is a prefix of a larger
    one (the 5 images are the first 5 of the 10, which are the first 10 of the 50).
    Returns a `Dataset` view that keeps the category, split and format of `dataset`.
    """
    shots = operator.index(shots)
    where = f"{dataset.category}/{dataset.split} of {dataset.root}"
    if shots <= 0:
        raise ValueError(f"shots must be a positive number of images, got {shots} (for {where})")
    if shots > len(dataset):
        raise ValueError(f"cannot draw {shots} shots: {where} has only {len(dataset)} images")
    order = np.random.default_rng(seed).permutation(len(dataset))[:shots]
    return dataset.subset(order.tolist())
