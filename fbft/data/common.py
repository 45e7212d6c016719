"""Sample and dataset types shared by every reader (decoding: `images`; errors: `errors`)."""

from __future__ import annotations

import operator
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import overload

import numpy as np

from fbft.data.errors import (
    CorruptImageError,
    DatasetError,
    DatasetFormatError,
    DatasetNotFoundError,
    MaskSizeError,
    MissingMaskError,
    UnknownCategoryError,
)
from fbft.data.images import image_size, read_image, read_mask

__all__ = [
    "CorruptImageError",
    "DatasetError",
    "DatasetFormatError",
    "DatasetNotFoundError",
    "MaskSizeError",
    "MissingMaskError",
    "UnknownCategoryError",
    "image_size",
    "read_image",
    "read_mask",
]

SPLITS = ("train", "test")
FORMATS = ("mvtec", "visa", "visa_1cls")
IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
NOMINAL = "good"


@dataclass(frozen=True)
class Sample:
    """One image of a dataset. Pixels are decoded on every access of `image` / `mask`, never cached.

    `label` is 0 (nominal) or 1 (anomalous); `defect_type` is "good" for nominal images;
    `mask_path` is None for nominal images (their mask is all False).
    """

    path: str
    label: int
    defect_type: str
    category: str
    mask_path: str | None = None

    @property
    def image(self) -> np.ndarray:
        """HxWx3 uint8 RGB pixels."""
        return read_image(self.path)

    @property
    def size(self) -> tuple[int, int]:
        """(height, width) from the file header."""
        return image_size(self.path)

    @property
    def mask(self) -> np.ndarray:
        """HxW bool ground truth, checked against the image size."""
        if self.mask_path is None:
            return np.zeros(self.size, dtype=bool)
        mask = read_mask(self.mask_path)
        size = self.size
        if mask.shape != size:
            raise MaskSizeError(
                f"mask {self.mask_path} is {mask.shape[1]}x{mask.shape[0]} (WxH) but its image "
                f"{self.path} is {size[1]}x{size[0]}; masks must have the size of their image"
            )
        return mask


@dataclass(frozen=True, eq=False)
class Dataset(Sequence[Sample]):
    """An ordered, immutable list of samples of one category and split.

    Indexing by an int gives a `Sample`; by a slice, a `Dataset` view with the same metadata.
    """

    root: Path
    category: str
    split: str
    format: str
    samples: tuple[Sample, ...]

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self) -> Iterator[Sample]:
        return iter(self.samples)

    @overload
    def __getitem__(self, index: int) -> Sample: ...

    @overload
    def __getitem__(self, index: slice) -> Dataset: ...

    def __getitem__(self, index: int | slice) -> Sample | Dataset:
        if isinstance(index, slice):
            return replace(self, samples=self.samples[index])
        return self.samples[operator.index(index)]

    def __repr__(self) -> str:
        return (
            f"Dataset(root={str(self.root)!r}, category={self.category!r}, split={self.split!r}, "
            f"format={self.format!r}, samples={len(self)})"
        )

    def subset(self, indices: Iterable[int]) -> Dataset:
        """A view holding the samples at `indices`, in that order."""
        return replace(self, samples=tuple(self.samples[operator.index(i)] for i in indices))

    @property
    def labels(self) -> list[int]:
        """Labels of all samples (0 nominal, 1 anomalous), without reading any file."""
        return [s.label for s in self.samples]

    def sizes(self) -> list[tuple[int, int]]:
        """(height, width) of every image, read from the file headers only."""
        return [s.size for s in self.samples]


def check_split(split: str) -> None:
    """Raise `DatasetFormatError` unless `split` is "train" or "test"."""
    if split not in SPLITS:
        raise DatasetFormatError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")


def list_images(folder: Path) -> list[Path]:
    """Image files directly inside `folder` (any case of a known extension), sorted by name."""
    return sorted(
        (
            p
            for p in folder.iterdir()
            if p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".") and p.is_file()
        ),
        key=lambda p: p.name,
    )


def category_folders(root: Path) -> list[str]:
    """Sub-folders of `root` that look like categories (they hold `train/good` or `test`)."""
    return sorted(
        p.name
        for p in root.iterdir()
        if p.is_dir() and ((p / "train" / NOMINAL).is_dir() or (p / "test").is_dir())
    )


def unknown_category(category: str, known: Sequence[str], where: Path) -> UnknownCategoryError:
    """The error for a category that is not in `known`."""
    return UnknownCategoryError(
        f"unknown category {category!r} in {where}; known categories: "
        f"{', '.join(known) if known else '(none)'}"
    )


def read_folder_dataset(
    root: Path, category: str, split: str, format: str, mask_suffix: str
) -> Dataset:
    """Read an MVTec-like folder layout.

    `<root>/<category>/train/good/*`, `<root>/<category>/test/<defect>/*` and masks
    `<root>/<category>/ground_truth/<defect>/<stem><mask_suffix>.<ext>`. Test samples are ordered
    by defect folder name, then by file name. Every defect image must have its mask.
    """
    known = category_folders(root)
    if category not in known:
        raise unknown_category(category, known, root)
    cat_dir = root / category
    if split == "train":
        folder = cat_dir / "train" / NOMINAL
        if not folder.is_dir():
            raise DatasetNotFoundError(
                f"no training images: {folder} does not exist (expected nominal images there)"
            )
        return Dataset(
            root,
            category,
            split,
            format,
            tuple(Sample(str(p), 0, NOMINAL, category) for p in list_images(folder)),
        )
    test_dir = cat_dir / "test"
    if not test_dir.is_dir():
        raise DatasetNotFoundError(f"no test images: {test_dir} does not exist")
    gt_dir = cat_dir / "ground_truth"
    samples: list[Sample] = []
    for defect_dir in sorted((p for p in test_dir.iterdir() if p.is_dir()), key=lambda p: p.name):
        defect = defect_dir.name
        images = list_images(defect_dir)
        if defect == NOMINAL:
            samples += [Sample(str(p), 0, NOMINAL, category) for p in images]
            continue
        if images and not gt_dir.is_dir():
            raise MissingMaskError(
                f"masks are missing for category {category!r}: {defect_dir} holds defect images "
                f"but there is no ground-truth folder {gt_dir}; expected masks such as "
                f"{gt_dir / defect / (images[0].stem + mask_suffix + '.png')}"
            )
        mask_dir = gt_dir / defect
        masks = {p.stem: p for p in list_images(mask_dir)} if mask_dir.is_dir() else {}
        for p in images:
            mask = masks.get(p.stem + mask_suffix)
            if mask is None:
                raise MissingMaskError(
                    f"defect image {p} has no mask; expected "
                    f"{mask_dir / (p.stem + mask_suffix + '.png')}"
                )
            samples.append(Sample(str(p), 1, defect, category, str(mask)))
    return Dataset(root, category, split, format, tuple(samples))
