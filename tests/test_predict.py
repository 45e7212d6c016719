"""`fbft predict`: scores equal FBFT.predict, maps at each image's size, unique names, exit 2."""

from __future__ import annotations

import csv
from pathlib import Path
from urllib.parse import unquote

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
    for row, path, amap in zip(rows, paths, maps, strict=True):
        name = f"{path.parent.name}%2F{path.name}"
        assert row["map"] == f"maps/{name}.npy"
        saved = np.load(out / row["map"])
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
    tiff = np.asarray(Image.open(out / "maps" / "001.png.tiff"))
    assert tiff.dtype == np.float32 and tiff.shape == (60, 84)
    assert sorted(p.name for p in (out / "maps").iterdir()) == ["001.png.tiff"]  # no overlay


def test_output_names_are_unique_and_reversible(tmp_path):
    relative = ["a/000.png", "b/000.png", "b/000.jpg", "x.PNG", "x.png", "a__b/c.png",
                "a/b__c.png", "p%2Fq.png", "t~2.png", ".hidden.png", "d/e/f.bmp"]  # fmt: skip
    names = output_names([tmp_path / r for r in relative])
    assert len({n.casefold() for n in names}) == len(names)  # unique even ignoring case
    assert all("/" not in n and not n.startswith(".") for n in names)
    base = [n.split("~")[0] if n.endswith("~2") else n for n in names]
    assert [unquote(n) for n in base] == relative
    assert names[3:5] == ["x.PNG", "x.png~2"]
    assert output_names([tmp_path / "x" / "1.png"]) == ["1.png"]


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


def _predict(model_file, out, *inputs, extra=()) -> int:
    return main(
        ["predict", "--model", str(model_file), "--out", str(out), *extra, *map(str, inputs)]
    )


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    line = err.splitlines()[-1]  # after the progress bar, if any
    assert line.startswith("fbft predict: error: ") and "Traceback" not in err
    return line


def test_colliding_names_are_all_written_and_mapped_in_the_csv(model_file, tmp_path):
    folder = tmp_path / "in"
    texture = textures(1, 3, (56, 56))[0]
    for relative in ("x.PNG", "x.png", "a__b/c.png", "a/b__c.png"):
        (folder / relative).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(texture).save(folder / relative, format="PNG")
    out = tmp_path / "out"
    assert _predict(model_file, out, folder) == 0
    rows = _rows(out / "scores.csv")
    assert len(rows) == 4 and len({r["map"] for r in rows}) == 4
    for row in rows:
        name = Path(row["map"]).name.removesuffix(".npy").split("~")[0]
        assert unquote(name) == Path(row["path"]).relative_to(folder).as_posix()
        assert (out / row["map"]).is_file()
    assert len(list((out / "maps").glob("*.npy"))) == 4


def test_out_inside_the_input_folder_is_never_read_and_overwrite_replaces_it(
    model_file, images, tmp_path, capsys
):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("000.png", "001.png"):
        (folder / name).write_bytes((images / "a" / name).read_bytes())
    out = folder / "results"
    assert _predict(model_file, out, folder) == 0
    assert _predict(model_file, out, folder) == 2  # not empty
    assert "--overwrite" in _one_line_error(capsys)
    (out / "maps" / "stale.npy").write_bytes(b"old")
    assert _predict(model_file, out, folder, extra=["--overwrite"]) == 0
    assert [Path(r["path"]).name for r in _rows(out / "scores.csv")] == ["000.png", "001.png"]
    assert not (out / "maps" / "stale.npy").exists()
    assert sorted(p.name for p in folder.iterdir()) == ["000.png", "001.png", "results"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    assert _predict(model_file, mine, folder, extra=["--overwrite"]) == 2
    assert "not an fbft predict output" in _one_line_error(capsys)
    assert (mine / "thesis.tex").read_text() == "precious"


def test_symlinked_folders_are_followed_once_without_loops(model_file, images, tmp_path):
    folder = tmp_path / "in"
    (folder / "real").mkdir(parents=True)
    (folder / "real" / "x.png").write_bytes((images / "a" / "000.png").read_bytes())
    (folder / "linked").symlink_to(images / "b", target_is_directory=True)
    (folder / "real" / "loop").symlink_to(folder, target_is_directory=True)
    out = tmp_path / "out"
    assert _predict(model_file, out, folder) == 0
    names = sorted(
        Path(r["path"]).relative_to(folder).as_posix() for r in _rows(out / "scores.csv")
    )
    assert names == ["linked/000.png", "linked/001.png", "real/x.png"]


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_threshold_must_be_finite(model_file, images, tmp_path, capsys, value):
    assert _predict(model_file, tmp_path / "o", images / "a", extra=[f"--threshold={value}"]) == 2
    assert "--threshold must be a finite number" in _one_line_error(capsys)
    assert not (tmp_path / "o").exists()


def test_out_naming_a_file_is_one_line(model_file, images, tmp_path, capsys):
    target = tmp_path / "taken.txt"
    target.write_text("x")
    assert _predict(model_file, target, images / "a") == 2
    assert f"--out {target} is a file" in _one_line_error(capsys)


class _Payload:
    """An object that needs code to unpickle: weights-only loading refuses it."""


def test_a_model_file_that_carries_code_is_refused_in_one_line(images, tmp_path, capsys):
    import torch

    model = tmp_path / "evil.pt"
    torch.save({"detector": _Payload()}, model)
    assert _predict(model, tmp_path / "o", images / "a") == 2
    line = _one_line_error(capsys)
    assert str(model) in line and "is not a saved fbft detector (UnpicklingError)" in line


def test_a_runs_lookup_in_a_missing_sqlite_store_creates_no_database(images, tmp_path, capsys):
    db = tmp_path / "nowhere" / "mlflow.db"
    args = ["--tracking-uri", f"sqlite:///{db}"]
    rc = main(["predict", "--model", "runs:/0123/model", "--out", str(tmp_path / "o"), *args,
               str(images / "a")])  # fmt: skip
    assert rc == 2 and f"no MLflow database at {db}" in _one_line_error(capsys)
    assert not db.exists() and not db.parent.exists()


def test_a_run_that_fails_midway_leaves_no_output(model_file, images, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "000.png").write_bytes((images / "a" / "000.png").read_bytes())
    whole = (images / "a" / "001.png").read_bytes()
    (folder / "001.png").write_bytes(whole[: len(whole) // 2])  # header fine, pixels cut
    out = tmp_path / "out"
    assert _predict(model_file, out, folder, extra=["--batch-size", "1"]) == 2
    assert "001.png" in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # no out, no temporary folder


def test_a_decompression_bomb_is_one_line_in_predict(model_file, tmp_path, capsys, monkeypatch):
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "bomb.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    assert _predict(model_file, tmp_path / "o", tmp_path / "bomb.png") == 2
    assert "bomb.png has too many pixels" in _one_line_error(capsys)
