"""`fbft predict`: scores equal FBFT.predict, maps at each image's size, unique names, exit 2."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import textures, tiny_config, with_defect

from fbft import FBFT
from fbft.cli import main
from fbft.data.common import read_image
from fbft.serve.batch import output_names


@pytest.fixture(scope="module")
def model_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "fbft.pt"
    FBFT(tiny_config(epochs=5)).fit(textures(4, seed=0)).save(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """Two folders that both hold 000.png, of different sizes, one image with a defect."""
    root = tmp_path_factory.mktemp("images")
    for folder, shape, seed in (("a", (56, 56), 1), ("b", (60, 84), 2)):
        (root / folder).mkdir()
        nominal, defect = textures(2, seed, shape)
        Image.fromarray(nominal).save(root / folder / "000.png")
        Image.fromarray(with_defect(defect, (20, 20, 6, 6))[0]).save(root / folder / "001.png")
    (root / "a" / "notes.txt").write_text("not an image")
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def test_scores_and_maps_match_the_model(model_file, images, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["predict", "--model", str(model_file), "--out", str(out), "--batch-size", "3"]
    rc = main([*args, str(images / "a"), str(images / "b")])
    assert rc == 0, capsys.readouterr().err
    rows = _rows(out / "scores.csv")
    paths = [Path(r["path"]) for r in rows]
    assert [p.relative_to(images).as_posix() for p in paths] == [
        "a/000.png",
        "a/001.png",
        "b/000.png",
        "b/001.png",
    ]
    maps, scores = FBFT.load(model_file).predict([read_image(p) for p in paths])
    assert [float(r["score"]) for r in rows] == pytest.approx(scores, rel=1e-5)
    assert "decision" not in rows[0]
    for path, amap in zip(paths, maps, strict=True):
        name = f"{path.parent.name}__{path.stem}"
        saved = np.load(out / "maps" / f"{name}.npy")
        assert saved.dtype == np.float32 and saved.shape == read_image(path).shape[:2]
        np.testing.assert_allclose(saved, amap, rtol=1e-4, atol=1e-6)
        assert (out / "maps" / f"{name}.png").stat().st_size > 0


def test_threshold_tiff_and_single_file(model_file, images, tmp_path):
    out = tmp_path / "out"
    image = images / "b" / "001.png"
    args = ["predict", "--model", str(model_file), "--out", str(out), "--threshold", "0"]
    assert main([*args, "--format", "tiff", "--no-overlays", str(image)]) == 0
    (row,) = _rows(out / "scores.csv")
    assert row["decision"] == "1"
    tiff = np.asarray(Image.open(out / "maps" / "001.tiff"))
    assert tiff.dtype == np.float32 and tiff.shape == (60, 84)
    assert not (out / "maps" / "001.png").exists()


def test_output_names_are_unique(tmp_path):
    paths = [tmp_path / "a" / "000.png", tmp_path / "b" / "000.png", tmp_path / "b" / "000.jpg"]
    assert output_names(paths) == ["a__000", "b__000_png", "b__000_jpg"]
    assert output_names([tmp_path / "x" / "1.png"]) == ["1"]


@pytest.mark.parametrize("case", ["missing", "empty", "corrupt", "model"])
def test_bad_paths_exit_2_naming_them(case, model_file, tmp_path, capsys):
    model, target = str(model_file), tmp_path / "input"
    if case == "empty":
        target.mkdir()
    elif case == "corrupt":
        target = tmp_path / "broken.png"
        target.write_bytes(b"not a png")
    elif case == "model":
        model, target = str(tmp_path / "nope.pt"), model_file.parent
        Image.fromarray(textures(1, 0)[0]).save(target / "x.png")
    rc = main(["predict", "--model", model, "--out", str(tmp_path / "out"), str(target)])
    err = capsys.readouterr().err
    assert rc == 2
    assert (model if case == "model" else str(target)) in err
