"""The same study on a real two-node Ray cluster and against a real MLflow tracking server.

Everything listens on 127.0.0.1 only, and every process a test starts is stopped at its end.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from fbft.data.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TINY = [
    "--backbone", "vit_small_patch14_reg4_dinov2", "--weights", "random",
    "--backbone-kwargs", json.dumps({"depth": 4, "embed_dim": 48, "num_heads": 2}),
    "--image-size", "56", "--layers", "2,4", "--epochs", "30", "--pictures", "1",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def started(argv: list[str], log: Path, env: dict | None = None) -> Iterator[subprocess.Popen]:
    """A process in its own session, killed with its whole group on exit."""
    with open(log, "w") as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
    try:
        yield proc
    finally:
        for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
            if proc.poll() is None:
                os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=wait)
                except subprocess.TimeoutExpired:
                    continue
        with suppress(ProcessLookupError):  # children that outlived the leader
            os.killpg(proc.pid, signal.SIGKILL)


def wait_until(check, timeout: float, what: str, log: Path) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if check():
            return
        time.sleep(0.5)
    pytest.fail(f"timed out waiting for {what}; log:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cluster") / "data"
    generate(root, categories=["gravel", "parts"], image_size=80, n_train=4, n_test=6)
    return root


def run_study(
    tmp: Path, data: Path, *flags: str, env: dict | None = None
) -> subprocess.CompletedProcess:
    argv = [
        sys.executable, str(ROOT / "studies" / "few_shot.py"), "--data", str(data),
        "--shots", "2", "3", "--cache-dir", str(tmp / "cache"), "--experiment", "cluster",
        *TINY, "--preset", "cpu",  # a remote cluster without GPUs says so (else exit 2)
        *flags,
    ]  # fmt: skip
    return subprocess.run(argv, cwd=tmp, capture_output=True, text=True, timeout=420, env=env)


def test_two_node_ray_cluster_runs_trials_on_both_nodes(tmp_path, data):
    port = free_port()
    # one token for every process of this cluster (Ray's token authentication)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    ray = str(BIN / "ray")
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--disable-usage-stats", "--block"]
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Unix socket paths are limited
    head = [ray, "start", "--head", f"--port={port}", "--include-dashboard=false",
            f"--temp-dir={temp}", *common]  # fmt: skip
    worker = [ray, "start", f"--address=127.0.0.1:{port}", *common]
    with started(head, tmp_path / "head.log", env):
        wait_until(lambda: _port_open(port), 60, "the Ray head", tmp_path / "head.log")
        with started(worker, tmp_path / "worker.log", env):
            wait_until(
                lambda: _nodes(port, env) == 2, 90, "the second Ray node", tmp_path / "worker.log"
            )
            address = f"127.0.0.1:{port}"
            storage = str(tmp_path / "rr")
            result = run_study(tmp_path, data, "--address", address, "--storage", storage, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("cluster").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(children) == 4 and all(r.info.status == "FINISHED" for r in children)
    assert len({r.data.tags["ray_node_id"] for r in children}) == 2


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _nodes(port: int, env: dict) -> int:
    out = subprocess.run(
        [sys.executable, "-c", f"import ray; ray.init(address='127.0.0.1:{port}', "
         "logging_level='ERROR'); print(len([n for n in ray.nodes() if n['Alive']]))"],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    lines = out.stdout.strip().splitlines()
    return int(lines[-1]) if out.returncode == 0 and lines else 0


def test_study_logs_to_a_real_mlflow_server(tmp_path, data):
    port = free_port()
    server = [
        str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
        "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
        "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "mlflow.log"
    with started(server, log):
        wait_until(lambda: _healthy(url), 120, "the MLflow server", log)
        result = run_study(
            tmp_path, data, "--tracking-uri", url, "--storage", str(tmp_path / "rr"),
            "--categories", "gravel",
        )  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert f"MLflow: {url}/#/experiments/" in result.stdout  # the link on the server
        client = MlflowClient(url)
        runs = client.search_runs([client.get_experiment_by_name("cluster").experiment_id])
        children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
        assert len(runs) == 3 and len(children) == 2
        assert all("aupro_5_q1" in r.data.metrics for r in children)
        names = {a.path for a in client.list_artifacts(children[0].info.run_id)}
        assert {"pro_curve.png", "maps"} <= names
        mlflow.set_tracking_uri(url)
        info = mlflow.models.get_model_info(f"runs:/{children[0].info.run_id}/model")
        assert "python_function" in info.flavors
    assert not (tmp_path / "mlflow.db").exists()  # nothing went to a local store
    assert any((tmp_path / "artifacts").rglob("detector.pt"))  # served by the server


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False
