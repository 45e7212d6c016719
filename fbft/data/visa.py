"""VisA: the original release (`split_csv/1cls.csv`) and spot-diff's converted `1cls` layout."""

from __future__ import annotations

import csv
import os
from pathlib import Path, PurePosixPath

from fbft.data.common import (
    NOMINAL,
    Dataset,
    DatasetFormatError,
    DatasetNotFoundError,
    MissingMaskError,
    Sample,
    read_folder_dataset,
    unknown_category,
)

SPLIT_CSV = Path("split_csv") / "1cls.csv"
COLUMNS = ("object", "split", "label", "image", "mask")
LABELS = {"normal": 0, "anomaly": 1}
ANOMALY = "bad"


def _rows(root: Path) -> list[dict[str, str]]:
    """Rows of `<root>/split_csv/1cls.csv` (CRLF line endings handled by the csv module)."""
    path = root / SPLIT_CSV
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            missing = [c for c in COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise DatasetFormatError(
                    f"{path} lacks the column(s) {', '.join(missing)}; a VisA split file has the "
                    f"header {','.join(COLUMNS)}"
                )
            return list(reader)
    except FileNotFoundError as err:
        raise DatasetNotFoundError(
            f"VisA split file {path} not found; the original VisA release has split_csv/1cls.csv "
            "at its root (for spot-diff's converted folders use format='visa_1cls')"
        ) from err


def _inside(root: Path, row_number: int, column: str, value: str) -> Path:
    """`root / value`, refusing a split-file path that is absolute or climbs out of the root.

    The check is lexical (normalised `..`, not `resolve()`): the CSV text is what is untrusted,
    while symlinked image folders inside a root (common on shared storage) stay readable.
    """
    base = Path(os.path.normpath(root.absolute()))
    path = Path(os.path.normpath(base / value))  # an absolute `value` replaces `base` here
    if not path.is_relative_to(base):
        raise DatasetFormatError(
            f"{root / SPLIT_CSV}, row {row_number}: {column} path {value!r} points outside the "
            f"dataset root {root}; split-file paths must be relative to the root without '..'"
        )
    return root / value


def categories(root: Path) -> list[str]:
    """Objects listed in the split file of an original VisA release, sorted."""
    return sorted({row["object"] for row in _rows(root)})


def read(root: Path, category: str, split: str) -> Dataset:
    """Samples of one object and split of the original VisA release, sorted by image path.

    Normal rows give label 0 / defect type "good"; anomaly rows label 1 / "bad" with their
    multi-class mask (binarised with != 0). Images and masks are checked to exist.
    """
    rows = _rows(root)
    known = sorted({row["object"] for row in rows})
    if category not in known:
        raise unknown_category(category, known, root / SPLIT_CSV)
    # Row numbers as in the file: the header is row 1.
    selected = sorted(
        (
            (number, row)
            for number, row in enumerate(rows, start=2)
            if row["object"] == category and row["split"] == split
        ),
        key=lambda item: item[1]["image"],
    )
    samples = []
    for number, row in selected:
        label = LABELS.get(row["label"])
        if label is None:
            raise DatasetFormatError(
                f"{root / SPLIT_CSV}: row for {row['image']} has label {row['label']!r}; "
                f"expected one of {', '.join(LABELS)}"
            )
        image = _inside(root, number, "image", row["image"])
        if not image.is_file():
            raise DatasetNotFoundError(f"image {image} listed in {root / SPLIT_CSV} does not exist")
        if label == 0:
            samples.append(Sample(str(image), 0, NOMINAL, category))
            continue
        stem = PurePosixPath(row["image"]).stem
        expected = (
            _inside(root, number, "mask", row["mask"])
            if row["mask"]
            else root / category / "Data" / "Masks" / "Anomaly" / f"{stem}.png"
        )
        if not expected.is_file():
            raise MissingMaskError(
                f"defect image {image} has no mask; expected {expected} (from {root / SPLIT_CSV})"
            )
        samples.append(Sample(str(image), 1, ANOMALY, category, str(expected)))
    return Dataset(root, category, split, "visa", tuple(samples))


def read_1cls(root: Path, category: str, split: str) -> Dataset:
    """Samples of spot-diff's converted layout: `test/{good,bad}`, `ground_truth/bad/<stem>.png`."""
    return read_folder_dataset(root, category, split, "visa_1cls", "")
