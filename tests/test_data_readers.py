"""Dataset readers: real MVTec AD files, VisA trees built from the real split CSV, errors."""

from __future__ import annotations

import csv
import random
from collections import Counter
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fbft.data import (
    CorruptImageError,
    Dataset,
    DatasetFormatError,
    DatasetNotFoundError,
    MaskSizeError,
    MissingMaskError,
    Sample,
    UnknownCategoryError,
    categories,
    detect_format,
    open_dataset,
)

GRID_TEST = {"good": 3, "bent": 3, "broken": 2, "glue": 2, "metal_contamination": 2, "thread": 2}
VISA_OBJECTS = ("capsules", "pipe_fryum")  # both have 3-digit normal stems shared with anomalies
VISA_SIZE = (20, 24)  # (H, W) of the stand-in images
VISA_IDS = (1, 2, 5)  # multi-class mask values


def _png(path: Path, pixels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def _mask_pixels(size: tuple[int, int], value: int) -> np.ndarray:
    mask = np.zeros(size, np.uint8)
    mask[2:6, 3:9] = value
    return mask


def _folder_tree(root: Path, category: str, masks: str | None) -> None:
    """A small MVTec-like tree: masks "mvtec" (<stem>_mask.png), "visa_1cls" (bad/<stem>.png)
    or None (no defect images at all)."""
    rng = np.random.default_rng(0)
    cat = root / category
    for i in range(3):
        _png(cat / "train" / "good" / f"{i:03d}.png", rng.integers(0, 255, (12, 16, 3), np.uint8))
    _png(cat / "test" / "good" / "000.png", rng.integers(0, 255, (12, 16), np.uint8))
    defects = {"mvtec": ("crack", "hole"), "visa_1cls": ("bad",), None: ()}[masks]
    for defect in defects:
        for i in range(2):
            pixels = rng.integers(0, 255, (12, 16, 3), np.uint8)
            _png(cat / "test" / defect / f"{i:03d}.png", pixels)
            name = f"{i:03d}_mask.png" if masks == "mvtec" else f"{i:03d}.png"
            _png(cat / "ground_truth" / defect / name, _mask_pixels((12, 16), 255))


# ----------------------------------------------------------------------------- real MVTec AD


def test_grid_counts_and_order(mvtec_root: Path) -> None:
    assert categories(mvtec_root) == ["grid"]
    assert detect_format(mvtec_root) == "mvtec"
    train = open_dataset(mvtec_root, "grid", "train")
    test = open_dataset(mvtec_root, "grid", "test")
    assert len(train) == 25
    assert Counter(s.defect_type for s in test) == GRID_TEST
    assert (train.root, train.category, train.split, train.format) == (
        mvtec_root,
        "grid",
        "train",
        "mvtec",
    )
    keys = [(Path(s.path).parent.name, Path(s.path).name) for s in test]
    assert keys == sorted(keys)
    assert [s.path for s in open_dataset(mvtec_root, "grid", "test")] == [s.path for s in test]


def test_grid_pixels_and_masks(mvtec_root: Path) -> None:
    test = open_dataset(mvtec_root, "grid", "test")
    assert test.sizes() == [(1024, 1024)] * len(test)
    for sample in test:
        image, mask = sample.image, sample.mask
        assert image.shape == (1024, 1024, 3) and image.dtype == np.uint8
        assert mask.shape == image.shape[:2] and mask.dtype == bool
        assert mask.any() == bool(sample.label)
        assert (sample.label == 0) == (sample.defect_type == "good") == (sample.mask_path is None)
        assert sample.category == "grid"
    grey = test[0].image  # grid files are single-channel PNGs
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()


def test_samples_are_lazy_and_datasets_slice(mvtec_root: Path) -> None:
    assert {f.name for f in fields(Sample)} == {
        "path",
        "label",
        "defect_type",
        "category",
        "mask_path",
    }
    test = open_dataset(mvtec_root, "grid", "test")
    sample = test[0]
    assert sample.image is not sample.image  # decoded on every access, never kept
    head = test[:4]
    assert isinstance(head, Dataset) and len(head) == 4 and head.category == "grid"
    assert list(head) == list(test.samples[:4])
    assert test[np.int64(2)] == test[2]
    assert test.labels == [s.label for s in test]


def test_bottle_without_masks(bottle_root: Path) -> None:
    assert len(open_dataset(bottle_root, "bottle", "train")) == 10
    with pytest.raises(MissingMaskError, match="masks are missing") as err:
        open_dataset(bottle_root, "bottle", "test")
    assert str(bottle_root / "bottle" / "ground_truth") in str(err.value)


# ----------------------------------------------------------------------------- original VisA


def _visa_tree(root: Path, rows: list[dict[str, str]]) -> None:
    """Write `rows` as a CRLF split file with tiny images and multi-class masks at their paths."""
    rng = np.random.default_rng(0)
    (root / "split_csv").mkdir(parents=True)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as f:
        writer = csv.DictWriter(
            f, ["object", "split", "label", "image", "mask"], lineterminator="\r\n"
        )
        writer.writeheader()
        writer.writerows(rows)
    for i, row in enumerate(rows):
        image = root / row["image"]
        image.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (*VISA_SIZE, 3), np.uint8)).save(image, "JPEG")
        if row["mask"]:
            _png(root / row["mask"], _mask_pixels(VISA_SIZE, VISA_IDS[i % len(VISA_IDS)]))


@pytest.fixture(scope="module")
def visa_rows(visa_split_csv: Path) -> list[dict[str, str]]:
    """All capsules rows and every 8th pipe_fryum row of the real split file, shuffled."""
    with visa_split_csv.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["object"] in VISA_OBJECTS]
    rows = [r for i, r in enumerate(rows) if r["object"] == "capsules" or i % 8 == 0]
    random.Random(0).shuffle(rows)
    return rows


@pytest.fixture(scope="module")
def visa_root(visa_rows: list[dict[str, str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("visa")
    _visa_tree(root, visa_rows)
    return root


def test_visa_counts_match_csv(visa_root: Path, visa_rows: list[dict[str, str]]) -> None:
    assert b"\r\n" in (visa_root / "split_csv" / "1cls.csv").read_bytes()
    assert detect_format(visa_root) == "visa"
    assert categories(visa_root) == list(VISA_OBJECTS)
    for obj in VISA_OBJECTS:
        for split in ("train", "test"):
            data = open_dataset(visa_root, obj, split)
            expected = Counter(
                r["label"] for r in visa_rows if r["object"] == obj and r["split"] == split
            )
            assert data.format == "visa" and len(data) == sum(expected.values())
            named = Counter({"normal": "good", "anomaly": "bad"}[k] for k in expected.elements())
            assert Counter(s.defect_type for s in data) == named
            assert sum(s.label for s in data) == expected["anomaly"]
            assert [s.path for s in data] == sorted(s.path for s in data)


def test_visa_shared_stems_do_not_collide(visa_root: Path) -> None:
    samples = [s for split in ("train", "test") for s in open_dataset(visa_root, "capsules", split)]
    assert len({s.path for s in samples}) == len(samples)
    stems = {label: {Path(s.path).stem for s in samples if s.label == label} for label in (0, 1)}
    shared = stems[0] & stems[1]
    assert "078" in shared
    pair = [s for s in samples if Path(s.path).stem == "078"]
    assert sorted(s.label for s in pair) == [0, 1]
    assert [s.mask_path is None for s in sorted(pair, key=lambda s: s.label)] == [True, False]


def test_visa_masks_binarised(visa_root: Path) -> None:
    test = open_dataset(visa_root, "pipe_fryum", "test")
    anomalous = [s for s in test if s.label == 1]
    values = {int(np.asarray(Image.open(s.mask_path)).max()) for s in anomalous}
    assert values == set(VISA_IDS)
    for sample in test:
        mask = sample.mask
        assert mask.shape == VISA_SIZE and mask.dtype == bool
        assert mask.sum() == (24 if sample.label else 0)
        assert sample.image.shape == (*VISA_SIZE, 3)


def test_visa_missing_mask(tmp_path: Path, visa_rows: list[dict[str, str]]) -> None:
    rows = [r for r in visa_rows if r["object"] == "capsules"][:40]
    _visa_tree(tmp_path, rows)
    anomaly = next(r for r in rows if r["label"] == "anomaly" and r["split"] == "test")
    (tmp_path / anomaly["mask"]).unlink()
    with pytest.raises(MissingMaskError) as err:
        open_dataset(tmp_path, "capsules", "test")
    assert str(tmp_path / anomaly["image"]) in str(err.value)
    assert str(tmp_path / anomaly["mask"]) in str(err.value)
    with pytest.raises(UnknownCategoryError, match="capsules"):
        open_dataset(tmp_path, "candle", "train")


@pytest.mark.parametrize(
    ("column", "escape"),
    [
        ("image", "../outside/{name}"),
        ("mask", "{outside}/{name}"),
        ("image", "capsules/../../outside/{name}"),
    ],
)
def test_visa_paths_confined_to_root(
    tmp_path: Path, visa_rows: list[dict[str, str]], column: str, escape: str
) -> None:
    """A split file must not make the reader open files outside the dataset root."""
    rows = [dict(r) for r in visa_rows if r["object"] == "capsules"][:40]
    root = tmp_path / "visa"
    _visa_tree(root, rows)
    number, row = next(
        (i, r)
        for i, r in enumerate(rows, start=2)
        if r["label"] == "anomaly" and r["split"] == "test"
    )
    outside = tmp_path / "outside"
    target = outside / Path(row[column]).name
    target.parent.mkdir()
    (root / row[column]).rename(target)  # the escaping path exists, so only the check stops it
    row[column] = escape.format(outside=outside, name=target.name)
    with (root / "split_csv" / "1cls.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, list(rows[0]), lineterminator="\r\n")
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DatasetFormatError) as err:
        open_dataset(root, "capsules", "test")
    message = str(err.value)
    assert str(root / "split_csv" / "1cls.csv") in message
    assert f"row {number}:" in message and repr(row[column]) in message and column in message
    assert len(open_dataset(root, "capsules", "train")) > 0  # other rows still read


# ----------------------------------------------------------------------------- converted VisA


def test_visa_1cls(tmp_path: Path) -> None:
    _folder_tree(tmp_path, "candle", "visa_1cls")
    jpg = tmp_path / "candle" / "test" / "bad" / "002.JPG"
    Image.fromarray(np.zeros((12, 16, 3), np.uint8)).save(jpg, "JPEG")
    _png(tmp_path / "candle" / "ground_truth" / "bad" / "002.png", _mask_pixels((12, 16), 255))
    assert detect_format(tmp_path) == "visa_1cls"
    assert categories(tmp_path) == ["candle"]
    test = open_dataset(tmp_path, "candle", "test")
    assert test.format == "visa_1cls"
    assert [(s.defect_type, s.label) for s in test] == [("bad", 1)] * 3 + [("good", 0)]
    assert all(s.mask.sum() == 24 for s in test if s.label)
    assert test[2].path == str(jpg)
    assert len(open_dataset(tmp_path, "candle", "train")) == 3


# ----------------------------------------------------------------------------- detection, errors


def test_auto_detection_without_ground_truth(tmp_path: Path) -> None:
    _folder_tree(tmp_path, "plain", None)
    assert detect_format(tmp_path) == "mvtec"
    assert len(open_dataset(tmp_path, "plain", "test")) == 1


def test_undecidable_and_mixed_layouts(tmp_path: Path) -> None:
    _folder_tree(tmp_path / "a", "x", "mvtec")
    _folder_tree(tmp_path / "a", "y", "visa_1cls")
    with pytest.raises(DatasetFormatError, match="format=") as err:
        open_dataset(tmp_path / "a", "x", "test")
    assert str(tmp_path / "a") in str(err.value) and "visa_1cls" in str(err.value)
    assert len(open_dataset(tmp_path / "a", "x", "test", format="mvtec")) == 5
    bad_only = tmp_path / "b" / "z" / "test" / "bad"
    _png(bad_only / "000.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(DatasetFormatError, match="without any ground truth"):
        detect_format(tmp_path / "b")
    with pytest.raises(DatasetFormatError, match="pass its parent"):
        detect_format(tmp_path / "a" / "x")


def test_argument_errors(tmp_path: Path) -> None:
    _folder_tree(tmp_path, "widget", "mvtec")
    missing = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as err:
        open_dataset(missing, "widget", "train")
    assert isinstance(err.value, FileNotFoundError) and str(missing) in str(err.value)
    with pytest.raises(UnknownCategoryError) as err:
        open_dataset(tmp_path, "gadget", "train")
    assert "widget" in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(ValueError, match="train, test"):
        open_dataset(tmp_path, "widget", "val")
    with pytest.raises(ValueError, match="visa_1cls"):
        open_dataset(tmp_path, "widget", "train", format="coco")
    with pytest.raises(DatasetNotFoundError, match="split_csv"):
        categories(tmp_path, format="visa")


def test_missing_mask_file(tmp_path: Path) -> None:
    _folder_tree(tmp_path, "widget", "mvtec")
    mask = tmp_path / "widget" / "ground_truth" / "hole" / "001_mask.png"
    mask.unlink()
    with pytest.raises(MissingMaskError) as err:
        open_dataset(tmp_path, "widget", "test")
    assert str(tmp_path / "widget" / "test" / "hole" / "001.png") in str(err.value)
    assert str(mask) in str(err.value)


def test_mask_size_mismatch(tmp_path: Path) -> None:
    _folder_tree(tmp_path, "widget", "mvtec")
    mask = tmp_path / "widget" / "ground_truth" / "crack" / "000_mask.png"
    _png(mask, np.full((10, 10), 255, np.uint8))
    sample = open_dataset(tmp_path, "widget", "test")[0]
    with pytest.raises(MaskSizeError) as err:
        _ = sample.mask
    for part in (str(mask), sample.path, "10x10", "16x12"):
        assert part in str(err.value)


def test_corrupt_and_converted_images(tmp_path: Path) -> None:
    _folder_tree(tmp_path, "widget", "mvtec")
    train = tmp_path / "widget" / "train" / "good"
    Image.fromarray(np.full((12, 16, 4), 200, np.uint8), "RGBA").save(train / "000.png")
    Image.fromarray(np.zeros((12, 16), np.uint8)).convert("P").save(train / "001.png")
    (train / "002.png").write_bytes(b"not a png at all")
    data = open_dataset(tmp_path, "widget", "train")
    assert data[0].image.shape == (12, 16, 3) and (data[0].image == 200).all()
    assert data[1].image.shape == (12, 16, 3)
    for access in (lambda: data[2].image, data.sizes):
        with pytest.raises(CorruptImageError) as err:
            access()
        assert str(train / "002.png") in str(err.value)
    good = tmp_path / "widget" / "test" / "good" / "000.png"
    good.write_bytes(good.read_bytes()[:60])  # header intact, pixel data cut
    sample = next(s for s in open_dataset(tmp_path, "widget", "test") if s.path == str(good))
    assert sample.size == (12, 16)
    with pytest.raises(CorruptImageError) as err:
        _ = sample.image
    assert str(good) in str(err.value)
