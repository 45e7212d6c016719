"""Statistics of ground-truth masks: connected-component sizes and what downsampling loses."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from PIL import Image
from scipy import ndimage

STRUCTURE = np.ones((3, 3), dtype=bool)  # 8-connectivity, as in the AUPRO metric


def component_sizes(masks: Iterable[np.ndarray]) -> np.ndarray:
    """Pixel counts of the 8-connected components of all `masks` (non-zero is foreground)."""
    sizes = []
    for mask in masks:
        labels, count = ndimage.label(np.asarray(mask) != 0, STRUCTURE)
        sizes.append(np.bincount(labels.ravel(), minlength=count + 1)[1:])
    return np.concatenate(sizes) if sizes else np.zeros(0, dtype=np.int64)


def downsampling_loss(masks: Iterable[np.ndarray], size: int | tuple[int, int] = 224) -> float:
    """Share of ground-truth components that vanish when the masks are resized to `size`.

    Each mask is resized with nearest-neighbour sampling exactly as PIL's
    `Image.resize((W, H), NEAREST)` does (an int `size` means size x size; non-square masks are
    squashed, as a fixed-size network input would be). A component vanishes when none of its
    pixels is sampled. Returns NaN when the masks hold no component.
    """
    height, width = (size, size) if isinstance(size, int) else size
    total = lost = 0
    for mask in masks:
        labels, count = ndimage.label(np.asarray(mask) != 0, STRUCTURE)
        if count == 0:
            continue
        small = Image.fromarray(labels.astype(np.int32)).resize(
            (width, height), Image.Resampling.NEAREST
        )
        kept = np.unique(np.asarray(small))
        total += count
        lost += count - int(np.count_nonzero(kept))
    return lost / total if total else float("nan")
