"""Datasets: MVTec AD, VisA (original and converted `1cls` layouts) and the synthetic benchmark.

`open_dataset(root, category, split)` gives a `Dataset` of lazily loaded `Sample`s;
`few_shot(dataset, shots, seed)` a seeded subset of it.
"""

from __future__ import annotations

import os
from pathlib import Path

from fbft.data import mvtec, visa
from fbft.data.common import (
    FORMATS,
    NOMINAL,
    CorruptImageError,
    Dataset,
    DatasetError,
    DatasetFormatError,
    DatasetNotFoundError,
    MaskSizeError,
    MissingMaskError,
    Sample,
    UnknownCategoryError,
    category_folders,
    check_split,
    list_images,
)
from fbft.data.sampling import few_shot

__all__ = [
    "FORMATS",
    "CorruptImageError",
    "Dataset",
    "DatasetError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "MaskSizeError",
    "MissingMaskError",
    "Sample",
    "UnknownCategoryError",
    "categories",
    "detect_format",
    "few_shot",
    "open_dataset",
]

_READERS = {"mvtec": mvtec.read, "visa": visa.read, "visa_1cls": visa.read_1cls}
_HOW_TO = (
    "fbft reads: 'mvtec' (<root>/<category>/train/good, test/<defect>, "
    "ground_truth/<defect>/<stem>_mask.png), 'visa' (the original VisA release, with "
    "split_csv/1cls.csv at its root) and 'visa_1cls' (<root>/<category>/test/{good,bad}, "
    "ground_truth/bad/<stem>.png); force one with format='mvtec' | 'visa' | 'visa_1cls'"
)


def _check_root(root: str | os.PathLike[str]) -> Path:
    path = Path(root)
    if not path.is_dir():
        raise DatasetNotFoundError(
            f"dataset root {path} does not exist or is not a folder; pass the folder that holds "
            "the category folders (MVTec AD, converted VisA) or split_csv/ (original VisA)"
        )
    return path


def _guess(cat_dir: Path) -> tuple[str | None, str]:
    """The folder format one category suggests ("either" when it has no defect images)."""
    gt_dir = cat_dir / "ground_truth"
    masks = (
        [p for d in sorted(gt_dir.iterdir()) if d.is_dir() for p in list_images(d)]
        if gt_dir.is_dir()
        else []
    )
    if any(p.stem.endswith(mvtec.MASK_SUFFIX) for p in masks):
        return "mvtec", "masks named <stem>_mask in ground_truth/<defect>/"
    if masks and all(p.parent.name == visa.ANOMALY for p in masks):
        return "visa_1cls", "masks named like their images in ground_truth/bad/"
    if masks:
        return None, f"masks without the _mask suffix outside ground_truth/bad/ (e.g. {masks[0]})"
    test_dir = cat_dir / "test"
    defects = (
        sorted(d.name for d in test_dir.iterdir() if d.is_dir() and d.name != NOMINAL)
        if test_dir.is_dir()
        else []
    )
    if not defects:
        return "either", "no defect images"
    if defects == [visa.ANOMALY]:
        return None, "test/bad images without any ground truth"
    return "mvtec", f"defect folders {', '.join(defects)} without ground truth"


def detect_format(root: str | os.PathLike[str]) -> str:
    """Recognise the layout of a dataset root: "visa", "mvtec" or "visa_1cls".

    `split_csv/1cls.csv` means the original VisA release; otherwise the ground-truth file names
    of the category folders decide (`<stem>_mask.png`: MVTec AD; `ground_truth/bad/<stem>.png`:
    converted VisA). Categories without any defect image read the same either way (as MVTec AD).
    """
    path = _check_root(root)
    if (path / visa.SPLIT_CSV).is_file():
        return "visa"
    cats = category_folders(path)
    if not cats:
        hint = (
            f" It looks like one category folder; pass its parent {path.parent} instead."
            if (path / "train" / NOMINAL).is_dir() or (path / "test").is_dir()
            else ""
        )
        raise DatasetFormatError(
            f"cannot recognise the dataset layout of {path}: found neither split_csv/1cls.csv nor "
            f"category folders holding train/good or test.{hint} {_HOW_TO}"
        )
    guesses = {cat: _guess(path / cat) for cat in cats}
    definite = {fmt for fmt, _ in guesses.values() if fmt in FORMATS}
    if len(definite) == 1:
        return definite.pop()
    if all(fmt == "either" for fmt, _ in guesses.values()):
        return "mvtec"
    found = "; ".join(f"{cat}: {what}" for cat, (_, what) in guesses.items())
    raise DatasetFormatError(f"cannot tell the dataset format of {path}; found {found}. {_HOW_TO}")


def _resolve(root: str | os.PathLike[str], format: str) -> tuple[Path, str]:
    if format != "auto" and format not in FORMATS:
        raise DatasetFormatError(
            f"unknown dataset format {format!r}; use 'auto' or one of {', '.join(FORMATS)}"
        )
    path = _check_root(root)
    return path, detect_format(path) if format == "auto" else format


def categories(root: str | os.PathLike[str], format: str = "auto") -> list[str]:
    """Sorted category names of the dataset at `root`."""
    path, fmt = _resolve(root, format)
    return visa.categories(path) if fmt == "visa" else mvtec.categories(path)


def open_dataset(
    root: str | os.PathLike[str], category: str, split: str, format: str = "auto"
) -> Dataset:
    """The samples of one category and split ("train" | "test"); pixels load on access.

    format: "mvtec", "visa" (original release with split_csv/1cls.csv), "visa_1cls"
    (spot-diff's converted layout) or "auto". Missing masks are reported here, from the
    directory listing; mask sizes are checked when a mask is read.
    """
    check_split(split)
    path, fmt = _resolve(root, format)
    return _READERS[fmt](path, category, split)
