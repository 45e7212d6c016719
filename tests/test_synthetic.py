"""The synthetic tiny-defect benchmark and the mask statistics."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fbft.cli import main
from fbft.data import categories, detect_format, open_dataset
from fbft.data import synthetic as synth
from fbft.data.stats import component_sizes, downsampling_loss

SIZE = 128
PARAMS = {"image_size": SIZE, "n_train": 3, "n_test": 12, "seed": 0}


def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synth.generate(tmp_path_factory.mktemp("synth") / "set", **PARAMS)


@pytest.fixture(scope="module")
def manifest(synth_root: Path) -> dict:
    return json.loads((synth_root / "manifest.json").read_text())


def test_layout_is_readable(synth_root: Path) -> None:
    assert detect_format(synth_root) == "mvtec"
    assert categories(synth_root) == sorted(synth.CATEGORIES)
    for cat in synth.CATEGORIES:
        train = open_dataset(synth_root, cat, "train")
        test = open_dataset(synth_root, cat, "test")
        assert len(train) == 3 and len(test) == 12
        assert sum(s.label == 0 for s in test) == 4
        assert {s.defect_type for s in test} == {"good", *synth.KINDS}
        for sample in test:
            image, mask = sample.image, sample.mask
            assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
            assert mask.any() == bool(sample.label)
        assert Path(test[0].mask_path).name == "000_mask.png"


def test_manifest(synth_root: Path, manifest: dict) -> None:
    assert manifest["generator"] == synth.GENERATOR and manifest["version"] == synth.VERSION
    assert manifest["parameters"] == {"categories": sorted(synth.CATEGORIES), **PARAMS}
    assert manifest["categories"] == sorted(synth.CATEGORIES)
    assert set(manifest["sources"]) == {"brick", "grass", "gravel"}
    assert all(
        "CC0" in s["licence"] and s["source"].startswith("skimage.data.")
        for s in manifest["sources"].values()
    )
    by_image = defaultdict(list)
    for defect in manifest["defects"]:
        assert defect["kind"] in synth.KINDS and f"/test/{defect['kind']}/" in defect["image"]
        by_image[defect["mask"]].append(defect)
    tests = [open_dataset(synth_root, c, "test") for c in synth.CATEGORIES]
    assert len(by_image) == sum(sum(t.labels) for t in tests)
    for mask_path, defects in by_image.items():
        mask = np.asarray(Image.open(synth_root / mask_path)) != 0
        assert set(np.unique(np.asarray(Image.open(synth_root / mask_path)))) <= {0, 255}
        assert mask.sum() == sum(d["area"] for d in defects)
        assert len(component_sizes([mask])) == len(defects)
        for d in defects:
            x0, y0, x1, y1 = d["bbox"]
            assert mask[y0:y1, x0:x1].sum() >= d["area"] > 0


def test_size_spread(synth_root: Path) -> None:
    for cat in synth.CATEGORIES:
        sizes = component_sizes(s.mask for s in open_dataset(synth_root, cat, "test") if s.label)
        assert sizes.min() <= 4 and sizes.max() >= 0.01 * SIZE * SIZE
        assert sizes.max() <= 0.05 * SIZE * SIZE  # "a few %" (the target is 3%)


def test_nominal_test_images_are_new(synth_root: Path) -> None:
    for cat in synth.CATEGORIES:
        train = [s.image for s in open_dataset(synth_root, cat, "train")]
        for sample in open_dataset(synth_root, cat, "test"):
            assert not any(np.array_equal(sample.image, t) for t in train)


@pytest.mark.parametrize("category", synth.CATEGORIES)
def test_mask_is_exactly_the_changed_pixels(category: str) -> None:
    for kind in synth.KINDS:
        for areas in ((1,), (3, 40, 400)):
            key = [5, synth.KINDS.index(kind), len(areas)]
            nominal, empty, _ = synth.render(category, SIZE, np.random.default_rng(key))
            image, mask, records = synth.render(
                category, SIZE, np.random.default_rng(key), tuple((kind, a) for a in areas)
            )
            assert not empty.any()
            changed = image != nominal
            assert (changed.any(axis=-1) == mask).all()
            change = np.abs(image.astype(int) - nominal).max(axis=-1)
            assert change[mask].min() >= synth.MIN_CHANGE[kind]
            assert len(records) == len(areas)
            if areas == (1,):
                assert mask.sum() == 1


def test_deterministic(synth_root: Path, tmp_path: Path) -> None:
    again = synth.generate(tmp_path / "again", **PARAMS)
    assert _files(again) == _files(synth_root)
    other = _files(synth.generate(tmp_path / "other", **{**PARAMS, "seed": 1}))
    reference = _files(synth_root)
    differing = [k for k in reference if k.endswith(".png") and other.get(k) != reference[k]]
    assert len(differing) > len(reference) // 2


def test_reuse_and_refusal(synth_root: Path, tmp_path: Path) -> None:
    stamp = (synth_root / "manifest.json").stat().st_mtime_ns
    assert synth.generate(synth_root, **PARAMS) == synth_root
    assert (synth_root / "manifest.json").stat().st_mtime_ns == stamp
    with pytest.raises(synth.SyntheticRootError, match="other settings") as err:
        synth.generate(synth_root, **{**PARAMS, "n_train": 4})
    assert str(synth_root) in str(err.value)
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    with pytest.raises(synth.SyntheticRootError, match=r"no manifest\.json"):
        synth.generate(user, image_size=64, n_train=1, n_test=2)
    assert (user / "notes.txt").read_text() == "mine"
    empty = tmp_path / "empty"
    empty.mkdir()
    synth.generate(empty, categories=["gravel"], image_size=64, n_train=1, n_test=2)
    assert categories(empty) == ["gravel"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "user"]


def test_failed_run_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    original = synth._write

    def failing(task: synth._Task, folder: Path, size: int) -> list[dict]:
        if "/test/" in task.relpath:
            raise RuntimeError("killed")
        return original(task, folder, size)

    monkeypatch.setattr(synth, "_write", failing)
    with pytest.raises(RuntimeError, match="killed"):
        synth.generate(tmp_path / "set", categories=["parts"], image_size=64, n_train=2, n_test=2)
    assert list(tmp_path.iterdir()) == []


def test_argument_checks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown synthetic categories"):
        synth.generate(tmp_path / "a", categories=["wood"])
    with pytest.raises(ValueError, match="image_size >= 64"):
        synth.generate(tmp_path / "b", image_size=32)
    assert list(tmp_path.iterdir()) == []


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "synth",
        str(tmp_path / "cli"),
        "--categories",
        "grass",
        "--image-size",
        "64",
        "--n-train",
        "2",
        "--n-test",
        "3",
        "--seed",
        "7",
    ]
    assert main(argv) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "cli")
    assert len(open_dataset(tmp_path / "cli", "grass", "test")) == 3
    assert main([*argv[:-1], "8"]) == 2


def test_downsampling_loss_on_hand_made_masks() -> None:
    first = np.zeros((1024, 1024), bool)
    first[0, 0] = True  # PIL's nearest-neighbour 1024 -> 224 never samples row/column 0
    first[100:140, 100:140] = True
    second = np.zeros((1024, 1024), np.uint8)
    second[2, 2] = 255  # row and column 2 are sampled
    second[602, 602] = second[603, 603] = 255  # one component (8-connectivity), not sampled
    assert sorted(component_sizes([first, second])) == [1, 1, 2, 1600]
    assert downsampling_loss([first, second]) == pytest.approx(2 / 4)
    assert downsampling_loss([first], size=1024) == 0.0
    assert np.isnan(downsampling_loss([np.zeros((8, 8), bool)]))
    rows = np.asarray(
        Image.fromarray(np.arange(1024, dtype=np.int32)[:, None].repeat(4, 1)).resize(
            (4, 224), Image.Resampling.NEAREST
        )
    )[:, 0]
    assert 0 not in rows and 2 in rows and 602 not in rows and 603 not in rows
