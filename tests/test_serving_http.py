"""A logged model served by `mlflow models serve --env-manager local` on 127.0.0.1: a base64
image answered with a score and a map, a client path refused with a one-line 400 (no traceback).

The server is a fresh process, so it imports the fbft code the model carries (its ``code/``
folder), not this checkout: what the model needs to load travels with it."""

from __future__ import annotations

import base64
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image
from tiny import textures, tiny_config, with_defect

from fbft import FBFT
from fbft.data.common import read_image
from fbft.serve.pyfunc import log_model
from fbft.serve.thresholds import calibrate

START_TIMEOUT_S = 240


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(port: int, body: dict) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/invocations",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _tail(log: Path) -> str:
    return log.read_text()[-3000:]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(port, model file, thresholds, image file) of a model served in a subprocess."""
    tmp = tmp_path_factory.mktemp("http")
    uri = f"sqlite:///{tmp}/mlflow.db"
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.create_experiment("http", artifact_location=str(tmp / "artifacts"))  # not ./mlruns
        mlflow.set_experiment("http")
        model = FBFT(tiny_config(epochs=5)).fit(textures(4, seed=0))
        model_file = model.save(tmp / "fbft.pt")
        thresholds = calibrate(*reversed(model.predict(textures(3, seed=11))))
        with mlflow.start_run():
            model_uri = log_model(model_file, thresholds=thresholds)
    finally:
        mlflow.set_tracking_uri(previous)
    image = with_defect(textures(1, seed=5, shape=(56, 70))[0], (20, 30, 6, 6))[0]
    Image.fromarray(image).save(tmp / "x.png")
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "FBFT_"))}
    env |= {
        "MLFLOW_TRACKING_URI": uri,
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # as README says, for logs
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # uvicorn
    }
    env.pop("PYTHONPATH", None)  # the model's own code/ folder, not this checkout
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri]
    command += ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)]
    log = (tmp / "server.log").open("w")
    process = subprocess.Popen(
        command, cwd=tmp, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(f"the server exited: {_tail(tmp / 'server.log')}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"no answer in {START_TIMEOUT_S}s: {_tail(tmp / 'server.log')}")
                time.sleep(1)
        yield port, model_file, thresholds, tmp / "x.png", tmp / "server.log"
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        log.close()


def test_a_base64_image_gets_a_score_a_decision_a_map_and_components(server):
    port, model_file, thresholds, image_file, _ = server
    (anomaly_map,), (score,) = FBFT.load(model_file).predict([read_image(image_file)])
    sent = base64.b64encode(image_file.read_bytes()).decode()
    body = {"dataframe_records": [{"image": sent}], "params": {"maps": True, "map_size": 35}}
    status, answer = _post(port, body)
    assert status == 200, answer
    (row,) = answer["predictions"]
    assert row["score"] == pytest.approx(score, rel=1e-5)
    assert row["decision"] == (score > thresholds.image)
    assert (row["height"], row["width"], row["map_scale"]) == (56, 70, 2)
    reduced = np.asarray(row["anomaly_map"])
    assert reduced.shape == (28, 35)
    assert reduced.max() == pytest.approx(anomaly_map.max(), rel=1e-5)
    assert row["n_components"] == len(row["components"]) > 0
    assert {"x", "y", "width", "height", "area", "peak"} == set(row["components"][0])
    status, answer = _post(port, {"dataframe_records": [{"image": sent}]})
    assert status == 200 and set(answer["predictions"][0]) == {"score", "decision"}


@pytest.mark.parametrize("path", ["/etc/passwd", "/no/such/file.png", "x.png"])
def test_a_client_path_is_a_one_line_400_that_reveals_nothing(server, path):
    status, answer = _post(server[0], {"dataframe_records": [{"path": path}]})
    assert status == 400
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE"
    assert "stack_trace" not in answer and "Traceback" not in json.dumps(answer)
    assert "\n" not in answer["message"] and "FBFT_SERVE_PATHS" in answer["message"]
    assert "passwd" not in answer["message"] and "such file" not in answer["message"]


def test_a_broken_image_is_a_one_line_400(server):
    sent = base64.b64encode(b"\x89PNG\r\n\x1a\n truncated").decode()
    status, answer = _post(server[0], {"dataframe_records": [{"image": sent}]})
    assert status == 400 and "stack_trace" not in answer
    assert answer["message"].startswith("cannot read image file sent in row 0")


def test_the_server_loaded_quietly(server):
    """No per-file download bar in a log, no warning about the predict method's type hints."""
    log = server[4].read_text()
    assert "Application startup complete" in log
    assert "Downloading artifacts" not in log and "type hint" not in log
