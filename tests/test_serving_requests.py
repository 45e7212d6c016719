"""The served model's requests, in process (MLflow's pyfunc on a real SQLite store): image bytes,
maps and components (against slow oracles), path confinement, one-line errors; and `fbft
predict`'s overlays on the model's calibrated colour scale."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from test_metrics import components as flood_fill
from tiny import textures, tiny_config, tracking_store, with_defect

from fbft import FBFT
from fbft.cli import main
from fbft.data.common import read_image
from fbft.data.images import decode_image
from fbft.serve.pyfunc import log_model
from fbft.serve.regions import components, reduce_map
from fbft.serve.thresholds import calibrate


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with tracking_store(tmp_path_factory.mktemp("mlflow"), "requests") as uri:
        yield uri


@pytest.fixture(scope="module")
def served(tmp_path_factory, store):
    """(model file, thresholds calibrated on held-out nominal images, runs:/ URI, images dir)."""
    tmp = tmp_path_factory.mktemp("served")
    model = FBFT(tiny_config(epochs=5)).fit(textures(4, seed=0))
    model_file = model.save(tmp / "fbft.pt")
    maps, scores = model.predict(textures(3, seed=11))
    thresholds = calibrate(scores, maps, target_fpr=0.01)
    images = tmp / "images"
    images.mkdir()
    for i, image in enumerate(textures(3, seed=5, shape=(56, 70))):
        if i > 0:
            image = with_defect(image, (8 + 10 * i, 12, 5, 7))[0]
        Image.fromarray(image).save(images / f"{i}.png")
    with mlflow.start_run():
        uri = log_model(model_file, thresholds=thresholds)
    return model_file, thresholds, uri, images


def _load(uri, monkeypatch, folders: str | None = None):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if folders is None:
        monkeypatch.delenv("FBFT_SERVE_PATHS", raising=False)
    else:
        monkeypatch.setenv("FBFT_SERVE_PATHS", folders)
    return mlflow.pyfunc.load_model(uri)


def _flood_components(values: np.ndarray, threshold: float) -> list[dict]:
    """Oracle: 8-connected components of values > threshold (the metrics tests' flood fill)."""
    found = []
    for pixels in flood_fill(values > threshold):
        rows, cols = zip(*pixels, strict=True)
        found.append(
            {
                "x": min(cols),
                "y": min(rows),
                "width": max(cols) - min(cols) + 1,
                "height": max(rows) - min(rows) + 1,
                "area": len(pixels),
                "peak": float(max(values[p] for p in pixels)),
            }
        )
    return sorted(found, key=lambda c: -c["peak"])


def _block_max(values: np.ndarray, f: int) -> np.ndarray:
    """Oracle: the maximum of every f×f block (partial at the edges), by loops."""
    h, w = values.shape
    out = np.empty((-(-h // f), -(-w // f)), dtype=np.float32)
    for i in range(out.shape[0]):
        for j in range(out.shape[1]):
            out[i, j] = values[i * f : (i + 1) * f, j * f : (j + 1) * f].max()
    return out


@pytest.mark.parametrize("seed", range(4))
def test_components_and_reduced_maps_match_oracles(seed):
    rng = np.random.default_rng(seed)
    values = rng.random((37, 53)).astype(np.float32)
    threshold = float(np.quantile(values, 0.8))
    found, count = components(values, threshold, limit=10_000)
    expected = _flood_components(values, threshold)
    assert count == len(expected) > 5
    assert found == expected
    assert components(values, threshold, limit=3)[0] == expected[:3]
    for size, factor in ((0, 1), (53, 1), (20, 3), (7, 8)):
        reduced, f = reduce_map(values, size)
        assert f == factor
        assert np.array_equal(reduced, _block_max(values, factor))


def test_base64_image_bytes_answer_score_decision_map_and_components(served, monkeypatch):
    model_file, thresholds, uri, images = served
    pyfunc = _load(uri, monkeypatch)
    files = sorted(images.glob("*.png"))
    maps, scores = FBFT.load(model_file).predict([read_image(p) for p in files])
    raw = [p.read_bytes() for p in files]
    text = [base64.b64encode(b).decode() for b in raw]  # what a JSON client sends
    for column in (raw, text):
        out = pyfunc.predict(pd.DataFrame({"image": column}))
        assert list(out.columns) == ["score", "decision"]
        assert out["score"].tolist() == pytest.approx(scores, rel=1e-5)
        assert out["decision"].tolist() == [s > thresholds.image for s in scores]
    out = pyfunc.predict(pd.DataFrame({"image": text}), params={"maps": True, "map_size": 20})
    for row, anomaly_map in zip(out.to_dict("records"), maps, strict=True):
        assert (row["height"], row["width"]) == anomaly_map.shape
        assert row["map_scale"] == 4  # ceil(70 / 20)
        assert np.allclose(row["anomaly_map"], _block_max(anomaly_map, 4), rtol=1e-5)
        expected = _flood_components(anomaly_map, thresholds.pixel)
        assert row["n_components"] == len(expected)
        assert [c["area"] for c in row["components"]] == [c["area"] for c in expected[:100]]
        assert [(c["x"], c["y"]) for c in row["components"]] == [
            (c["x"], c["y"]) for c in expected[:100]
        ]
    assert out["n_components"].iloc[2] > 0  # the image with a defect
    full = pyfunc.predict(pd.DataFrame({"image": raw[:1]}), params={"maps": True, "map_size": 0})
    assert np.allclose(full["anomaly_map"].iloc[0], maps[0], rtol=1e-5)
    assert full["map_scale"].iloc[0] == 1


def test_exif_orientation_and_16_bit_bytes_decode_as_files_do(served, monkeypatch, tmp_path):
    model_file, _, uri, images = served
    pyfunc = _load(uri, monkeypatch)
    image = read_image(images / "1.png")
    turned = Image.fromarray(image)
    exif = turned.getexif()
    exif[0x0112] = 6  # EXIF orientation: shown turned 90 degrees
    turned.save(tmp_path / "turned.jpg", exif=exif)
    Image.fromarray(image[..., 0].astype(np.uint16) * 257).save(tmp_path / "wide.png")
    for name in ("turned.jpg", "wide.png"):
        data = (tmp_path / name).read_bytes()
        expected = read_image(tmp_path / name)
        assert np.array_equal(decode_image(data), expected)
        _, (score,) = FBFT.load(model_file).predict([expected])
        out = pyfunc.predict(pd.DataFrame({"image": [data]}))
        assert out["score"].iloc[0] == pytest.approx(score, rel=1e-5)
    assert read_image(tmp_path / "turned.jpg").shape[:2] == image.shape[1::-1]


def test_path_input_is_off_unless_served_and_never_probes(served, monkeypatch, tmp_path):
    model_file, _, uri, images = served
    pyfunc = _load(uri, monkeypatch)
    answers = []
    for path in ("/etc/passwd", "/no/such/file.png", str(images / "0.png")):
        with pytest.raises(mlflow.exceptions.MlflowException) as err:
            pyfunc.predict(pd.DataFrame({"path": [path]}))
        answers.append(json.loads(err.value.serialize_as_json()))
    assert answers[0] == answers[1] == answers[2]
    assert answers[0]["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "FBFT_SERVE_PATHS" in answers[0]["message"]
    assert "\n" not in answers[0]["message"]

    outside = tmp_path / "outside.png"
    outside.write_bytes((images / "0.png").read_bytes())
    (images / "link.png").symlink_to(outside)
    pyfunc = _load(uri, monkeypatch, folders=str(images))
    _, scores = FBFT.load(model_file).predict([read_image(images / "0.png")] * 2)
    out = pyfunc.predict(pd.DataFrame({"path": [str(images / "0.png"), "0.png"]}))
    assert out["score"].tolist() == pytest.approx(scores, rel=1e-5)
    refused = []
    for path in ("/etc/passwd", "/no/such/file.png", "../outside.png", "link.png", str(outside)):
        with pytest.raises(mlflow.exceptions.MlflowException) as err:
            pyfunc.predict(pd.DataFrame({"path": [path]}))
        refused.append(json.loads(err.value.serialize_as_json())["message"].replace(path, "P"))
    assert len(set(refused)) == 1 and "outside the folders" in refused[0]
    (images / "link.png").unlink()


@pytest.mark.parametrize(
    ("frame", "params", "words"),
    [
        ({"image": [b"\x89PNG not really"]}, None, "cannot read image file sent in row 0"),
        ({"image": ["@@not base64@@"]}, None, "base64"),
        ({"image": [None]}, None, "neither 'image' nor 'path'"),
        ({"image": [b"x"], "path": ["a.png"]}, None, "both 'image' and 'path'"),
        ({"other": [1]}, None, "needs a column 'image'"),
        ({"image": [b"x"]}, {"map_size": -1}, "map_size"),
    ],
)
def test_bad_requests_are_one_line_invalid_parameter_errors(
    served, monkeypatch, frame, params, words
):
    pyfunc = _load(served[2], monkeypatch)
    with pytest.raises(mlflow.exceptions.MlflowException) as err:
        pyfunc.predict(pd.DataFrame(frame), params=params)
    body = json.loads(err.value.serialize_as_json())
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert words in body["message"] and "\n" not in body["message"]
    assert set(body) == {"error_code", "message"}


def test_overlays_share_the_calibrated_colour_scale_across_runs(served, store, tmp_path, capsys):
    model_file, thresholds, uri, images = served
    others = tmp_path / "others"
    others.mkdir()
    for i, image in enumerate(textures(2, seed=21, shape=(60, 48))):
        Image.fromarray(with_defect(image, (30, 20, 9, 9))[0] if i else image).save(
            others / f"{i}.png"
        )
    runs = {}
    for name, inputs in (
        ("a", [images / "0.png", images / "1.png"]),
        ("b", [images / "0.png", others]),
    ):
        out = tmp_path / name
        argv = ["predict", "--model", uri, "--tracking-uri", store, "--out", str(out)]
        assert main([*argv, *map(str, inputs)]) == 0, capsys.readouterr().err
        runs[name] = out
        summary = json.loads((out / "predict.json").read_text())
        assert tuple(summary["colour_range"]) == thresholds.colour_range
        assert summary["colour_range_source"] == "the model's calibration"
    first = []
    for out in runs.values():
        rows = pd.read_csv(out / "scores.csv")
        (name,) = rows.loc[rows["path"] == str(images / "0.png"), "map"]
        first.append(np.asarray(Image.open(out / name.replace(".npy", ".png"))))
    assert np.array_equal(*first)  # the same image looks the same whatever else was scored
    image = read_image(images / "0.png")
    (anomaly_map,), _ = FBFT.load(model_file).predict([image])
    h, w = image.shape[:2]
    assert first[0].shape == (h + 60, max(2 * w, 520), 3)  # image | map, legend strip below
    from matplotlib import colormaps

    vmin, vmax = thresholds.colour_range
    jet = colormaps["jet"](np.clip((anomaly_map - vmin) / (vmax - vmin), 0, 1))[..., :3] * 255
    expected = (0.5 * image + 0.5 * jet).astype(np.uint8)
    outline = anomaly_map > thresholds.pixel
    close = np.abs(first[0][:h, w : 2 * w].astype(int) - expected.astype(int)) <= 1
    assert close[~outline].all()


def test_a_model_without_a_colour_scale_says_so_and_records_it(served, tmp_path, capsys):
    model_file, _, _, images = served
    out = tmp_path / "out"
    assert main(["predict", "--model", str(model_file), "--out", str(out), str(images)]) == 0
    assert "--colour-range" in capsys.readouterr().err
    summary = json.loads((out / "predict.json").read_text())
    assert summary["colour_range_source"].startswith("first batch")
    argv = ["predict", "--model", str(model_file), "--out", str(tmp_path / "fixed")]
    assert main([*argv, "--colour-range", "0.5", "2.5", str(images)]) == 0
    summary = json.loads((tmp_path / "fixed" / "predict.json").read_text())
    assert summary["colour_range"] == [0.5, 2.5]
    assert main([*argv, "--colour-range", "2", "1", str(images)]) == 2
    assert "--colour-range" in capsys.readouterr().err


def test_predict_from_runs_uri_with_no_mlflow_variable_set(served, store, tmp_path):
    """README's command in a clean environment: only --tracking-uri names the store."""
    _, _, uri, images = served
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env |= {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    code = "import sys; from fbft.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = ["predict", "--model", uri, "--tracking-uri", store, "--out", "out", str(images)]
    done = subprocess.run(
        [sys.executable, "-c", code, *argv],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert len(pd.read_csv(tmp_path / "out" / "scores.csv")) == 3
    assert "Downloading artifacts" not in done.stderr  # not a terminal: no progress bar
