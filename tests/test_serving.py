"""The detector as an MLflow pyfunc model on a real SQLite store: runs:/ and models:/ URIs."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import timm
import torch
from PIL import Image
from tiny import TINY, textures, tiny_config, tracking_store, with_defect

from fbft import FBFT
from fbft.cli import main
from fbft.data.common import read_image
from fbft.detectors import PatchCore, PatchCoreConfig, create_detector, methods
from fbft.detectors import load_detector as load_saved
from fbft.serve import package
from fbft.serve.pyfunc import ModelReferenceError, load, load_detector, log_model
from fbft.serve.thresholds import Thresholds


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with tracking_store(tmp_path_factory.mktemp("mlflow"), "serving") as uri:
        yield uri


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, store):
    """(model file, image paths, reference scores, logged runs:/ URI, thresholds)."""
    tmp = tmp_path_factory.mktemp("bundle")
    model_file = FBFT(tiny_config(epochs=5)).fit(textures(4, seed=0)).save(tmp / "fbft.pt")
    paths = []
    for i, image in enumerate(textures(3, seed=5, shape=(56, 70))):
        if i == 2:
            image = with_defect(image, (10, 10, 8, 8))[0]
        paths.append(tmp / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    _, scores = FBFT.load(model_file).predict([read_image(p) for p in paths])
    thresholds = Thresholds(sorted(scores)[1], 0.5, 0.01, 3, "test")
    with mlflow.start_run():
        uri = log_model(model_file, thresholds=thresholds)
    return model_file, paths, scores, uri, thresholds


def test_pyfunc_predict_equals_fbft_offline(bundle, monkeypatch):
    _, paths, scores, uri, thresholds = bundle
    assert uri.startswith("runs:/") and uri.endswith("/model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FBFT_SERVE_PATHS", str(paths[0].parent))
    pyfunc = mlflow.pyfunc.load_model(uri)
    out = pyfunc.predict(pd.DataFrame({"path": [str(p) for p in paths]}))
    assert list(out.columns) == ["path", "score", "decision"]
    assert out["score"].tolist() == pytest.approx(scores, rel=1e-5)
    assert out["decision"].tolist() == [s > thresholds.image for s in scores]
    signature = pyfunc.metadata.signature
    assert signature.inputs.input_names() == ["image", "path"]
    assert pyfunc.metadata.metadata["thresholds"]["image"] == thresholds.image
    assert pyfunc.metadata.metadata["teacher"]["identity"]["weights"].startswith("random:")


def test_registered_model_and_cli(bundle, store, tmp_path, capsys):
    _, paths, scores, uri, thresholds = bundle
    version = mlflow.register_model(uri, "fbft-tiny")
    detector, loaded = load(f"models:/fbft-tiny/{version.version}")
    assert loaded == thresholds
    _, again = detector.predict([read_image(p) for p in paths])
    assert again == pytest.approx(scores, rel=1e-5)
    out = tmp_path / "out"
    argv = ["predict", "--model", uri, "--tracking-uri", store, "--out", str(out), "--no-overlays"]
    assert main([*argv, *map(str, paths)]) == 0, capsys.readouterr().err
    csv = pd.read_csv(out / "scores.csv")
    assert csv["score"].tolist() == pytest.approx(scores, rel=1e-5)
    assert csv["decision"].tolist() == [int(s > thresholds.image) for s in scores]


def test_local_file_and_bad_references(bundle, tmp_path):
    model_file = bundle[0]
    assert isinstance(load_detector(model_file), FBFT)
    assert load(model_file)[1] is None
    with pytest.raises(ModelReferenceError, match=r"nope\.pt"):
        load_detector(tmp_path / "nope.pt")
    with pytest.raises(ModelReferenceError, match="runs:/0123/model"):
        load_detector("runs:/0123/model")
    with pytest.raises(ModelReferenceError, match="log_teacher"):
        log_model(model_file, log_teacher=True)


def test_log_teacher_copies_a_file_teacher(store, tmp_path, monkeypatch):
    teacher = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, img_size=56, **TINY)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    config = tiny_config(epochs=2, weights=str(tmp_path / "teacher.pth"))
    model_file = FBFT(config).fit(textures(3, seed=0)).save(tmp_path / "fbft.pt")
    Image.fromarray(textures(1, seed=9)[0]).save(tmp_path / "x.png")
    _, expected = FBFT.load(model_file).predict([read_image(tmp_path / "x.png")])
    uri = log_model(model_file, log_teacher=True)
    (tmp_path / "teacher.pth").rename(tmp_path / "moved.pth")  # the logged copy is used
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FBFT_SERVE_PATHS", str(tmp_path))
    out = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"path": [str(tmp_path / "x.png")]}))
    assert out["score"].tolist() == pytest.approx(expected, rel=1e-5)
    assert "decision" not in out


def test_importing_the_cli_and_serving_skips_mlflow_and_torch():
    code = (
        "import sys, fbft.cli, fbft.serve.pyfunc; "
        "print('mlflow' in sys.modules, 'torch' in sys.modules)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("method", methods())
def test_every_method_is_saved_loaded_served_and_predicted(method, store, tmp_path, monkeypatch):
    """save -> load_detector -> MLflow pyfunc -> `fbft predict`, the same scores for each."""
    detector = create_detector(method, tiny_config(epochs=2), preset="paper")
    model_file = detector.fit(textures(4, seed=0)).save(tmp_path / f"{method}.pt")
    paths = []
    for i, image in enumerate(textures(2, seed=7, shape=(56, 70))):
        paths.append(tmp_path / f"{i}.png")
        Image.fromarray(image).save(paths[-1])
    _, scores = detector.predict([read_image(p) for p in paths])
    loaded = load_saved(model_file)
    assert (
        type(loaded) is type(detector)
        and loaded.predict([read_image(p) for p in paths])[1] == scores
    )
    uri = log_model(model_file)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("FBFT_SERVE_PATHS", str(tmp_path))
    pyfunc = mlflow.pyfunc.load_model(uri)
    out = pyfunc.predict(pd.DataFrame({"path": [str(p) for p in paths]}))
    assert out["score"].tolist() == pytest.approx(scores, rel=1e-5)
    assert pyfunc.metadata.metadata["method"] == method
    for model in (str(model_file), uri):
        folder = tmp_path / f"out-{len(model)}"
        argv = ["predict", "--model", model, "--tracking-uri", store, "--out", str(folder)]
        assert main([*argv, "--no-overlays", *map(str, paths)]) == 0
        assert pd.read_csv(folder / "scores.csv")["score"].tolist() == pytest.approx(
            scores, rel=1e-5
        )


def test_a_baseline_rebuilds_its_file_teacher_checked_by_sha256(tmp_path):
    teacher = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, img_size=56, **TINY)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    config = tiny_config(weights=str(tmp_path / "teacher.pth"))
    detector = create_detector("patchcore", config, preset="paper").fit(textures(3, seed=0))
    model_file = detector.save(tmp_path / "patchcore.pt")
    loaded = load_saved(model_file)
    assert loaded.teacher.weights_source == "file"
    assert loaded.teacher.weights_id == detector.teacher.weights_id
    image = textures(1, seed=9)[0]
    assert loaded.predict([image])[1] == detector.predict([image])[1]
    torch.save({k: v + 1 for k, v in teacher.state_dict().items()}, tmp_path / "teacher.pth")
    with pytest.raises(ValueError, match="teacher weights sha256:"):
        load_saved(model_file)
    tokens_only = PatchCore(PatchCoreConfig(device="cpu")).fit_tokens(
        detector.teacher.encode([image])
    )
    with pytest.raises(ModelReferenceError, match="records no teacher"):
        log_model(tokens_only.save(tmp_path / "tokens_only.pt"))


def test_the_model_carries_the_modules_it_imports_and_loads_from_them_alone(store, tmp_path):
    """The logged code/ folder is the import closure of model_code.py (no study, CLI, figures);
    a fresh process, without this checkout on its path, loads and scores with it alone."""
    detector = create_detector("patchcore", tiny_config(), preset="paper").fit(textures(3, seed=0))
    uri = log_model(detector.save(tmp_path / "patchcore.pt"))
    folder = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "model")))
    carried = sorted(p.relative_to(folder / "code") for p in (folder / "code").rglob("*.py"))
    assert carried == sorted(package.needed_files())
    names = {p.as_posix() for p in carried}
    assert "fbft/detectors/patchcore.py" in names and "fbft/serve/frame.py" in names
    assert not any(n.startswith(("fbft/study/", "fbft/cli.py", "fbft/plots.py")) for n in names)
    Image.fromarray(textures(1, seed=9)[0]).save(tmp_path / "x.png")
    _, expected = detector.predict([read_image(tmp_path / "x.png")])
    code = (
        "import sys, mlflow, pandas as pd; m = mlflow.pyfunc.load_model(sys.argv[1]); "
        "import fbft; print(fbft.__file__); "
        "print(m.predict(pd.DataFrame({'image': [open(sys.argv[2], 'rb').read()]}))['score'][0])"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(folder), str(tmp_path / "x.png")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    where, score = done.stdout.split()[-2:]
    assert Path(where).is_relative_to(folder / "code")
    assert float(score) == pytest.approx(expected[0], rel=1e-5)
