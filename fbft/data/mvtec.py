"""MVTec AD layout.

`<cat>/train/good`, `<cat>/test/<defect>`, `<cat>/ground_truth/<defect>/<stem>_mask.png`.
"""

from __future__ import annotations

from pathlib import Path

from fbft.data.common import (
    Dataset,
    DatasetNotFoundError,
    category_folders,
    read_folder_dataset,
)

MASK_SUFFIX = "_mask"


def categories(root: Path) -> list[str]:
    """Category folders of a folder layout (MVTec AD or converted VisA), sorted."""
    found = category_folders(root)
    if not found:
        raise DatasetNotFoundError(
            f"no category folders under {root}: expected <root>/<category>/train/good or "
            "<root>/<category>/test (if you pointed at a single category, use its parent folder)"
        )
    return found


def read(root: Path, category: str, split: str) -> Dataset:
    """Samples of one category and split of an MVTec AD tree (masks 0/255, binarised with != 0)."""
    return read_folder_dataset(root, category, split, "mvtec", MASK_SUFFIX)
