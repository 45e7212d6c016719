"""A study on a real multi-node Ray cluster behaves as on one box, or says why not.

Two clusters, started with `ray start` on 127.0.0.1 with token auth and a short temp dir (never
`ray stop` nor AutoscalingCluster.start(), which end every Ray process on the machine):
- an autoscaling head (Ray's fake_multinode provider, config written here) with no GPU and a GPU
  node type of min 0: no GPU flag -> exit 2 before any trial; --gpus-per-trial 1 -> the
  autoscaler starts a (fake) GPU worker, whose trial fails at once naming CUDA;
- a head and a worker node with their own HOME (node-local caches), the worker in its own mount
  namespace where the driver's weights folder is empty: the trial there uses the same teacher
  (SHA-256), and a trial worker killed with SIGKILL is retried.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from test_infra_cluster import BIN, ROOT, TINY, _nodes, _port_open, free_port, started, wait_until

from fbft.data.synthetic import generate

RAY = str(BIN / "ray")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("clustertrue") / "data"
    generate(root, categories=["gravel"], image_size=80, n_train=4, n_test=6)
    return root


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FBFT_CACHE_DIR", "XDG_CACHE_HOME")}
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": TOKEN, **extra})
    return env


TOKEN = secrets.token_hex(16)
COMMON = ["--node-ip-address=127.0.0.1", "--disable-usage-stats", "--block"]


def _head(port: int, *flags: str) -> list[str]:
    temp = tempfile.mkdtemp(prefix="r", dir="/tmp")  # short: Unix socket paths are limited
    return [RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
            f"--temp-dir={temp}", *COMMON, *flags]  # fmt: skip


def _study(tmp: Path, *flags: str, env: dict, timeout: int = 420) -> subprocess.CompletedProcess:
    argv = [sys.executable, str(ROOT / "studies" / "few_shot.py"), "--experiment", "ct",
            "--storage", str(tmp / "rr"), *TINY, *flags]  # fmt: skip
    return subprocess.run(argv, cwd=tmp, capture_output=True, text=True, timeout=timeout, env=env)


def _runs(tmp: Path):
    client = MlflowClient(f"sqlite:///{tmp / 'mlflow.db'}")
    exp = client.get_experiment_by_name("ct")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    return parents, [r for r in runs if "mlflow.parentRunId" in r.data.tags]


FAKE_AUTOSCALER = {
    "cluster_name": "fbft-fake",
    "max_workers": 1,
    "provider": {"type": "fake_multinode", "use_node_id_as_ip": True,
                 "disable_node_updaters": True, "disable_launch_config_check": True},
    "available_node_types": {
        "ray.head.default": {"resources": {"CPU": 1}, "node_config": {}, "max_workers": 0},
        "gpu_worker": {"resources": {"CPU": 1, "GPU": 1}, "node_config": {},
                       "min_workers": 0, "max_workers": 1},
    },
    "head_node_type": "ray.head.default",
    "upscaling_speed": 1.0,
    "idle_timeout_minutes": 5,
    "auth": {"ssh_user": "ubuntu"},
    **{k: [] for k in ("cluster_synced_files", "initialization_commands", "setup_commands",
                       "head_setup_commands", "worker_setup_commands",
                       "head_start_ray_commands", "worker_start_ray_commands")},
    "file_mounts": {},
    "file_mounts_sync_continuously": False,
}  # fmt: skip


def test_autoscaling_cluster_without_gpu_exits_2_then_scales_up_a_gpu_worker(tmp_path, data):
    config = tmp_path / "autoscaler.yaml"
    port = free_port()
    provider = {**FAKE_AUTOSCALER["provider"], "gcs_address": f"127.0.0.1:{port}"}
    config.write_text(yaml.safe_dump({**FAKE_AUTOSCALER, "provider": provider}))
    env = _env(RAY_FAKE_CLUSTER="1")
    head = _head(port, "--num-cpus=1", "--num-gpus=0", f"--autoscaling-config={config}")
    flags = ["--address", f"127.0.0.1:{port}", "--data", str(data), "--shots", "2",
             "--cache-dir", str(tmp_path / "cache")]  # fmt: skip
    with started(head, tmp_path / "head.log", env):
        wait_until(lambda: _port_open(port), 60, "the Ray head", tmp_path / "head.log")
        refused = _study(tmp_path, *flags, env=env)
        assert refused.returncode == 2, refused.stdout[-2000:] + refused.stderr[-2000:]
        assert "--gpus-per-trial" in refused.stderr and "--preset cpu" in refused.stderr
        assert _runs(tmp_path) == ([], [])  # stopped before any run or trial
        result = _study(tmp_path, *flags, "--gpus-per-trial", "1", env=env, timeout=300)
        nodes = _nodes(port, env)
    out = result.stdout + result.stderr
    assert result.returncode == 1, out[-3000:]
    assert "wait for the autoscaler" in out and "Traceback" not in out
    assert nodes == 2  # the autoscaler brought up the GPU worker
    failure = [ln for ln in out.splitlines() if "CUDA unusable on node" in ln]
    assert failure and "Ray granted GPU ids" in failure[0] and "torch.cuda.is_available()" in out
    (parent,), children = _runs(tmp_path)
    assert parent.info.status == "FAILED" and len(children) == 1
    (child,) = children
    assert child.info.status == "FAILED" and "CUDA unusable" in child.data.tags["error"]
    assert child.data.tags["ray_gpu_ids"] != "none" and child.data.tags["torch_version"]


@contextmanager
def _hidden(folder: Path):
    """A prefix that runs a command in a mount namespace where ``folder`` is empty."""
    for prefix in (["unshare", "-m", "--propagation", "private"], ["unshare", "-rm"]):
        probe = [*prefix, "sh", "-c", f"mount -t tmpfs none '{folder}'"]
        if shutil.which("unshare") and subprocess.run(probe, capture_output=True).returncode == 0:
            yield [*prefix, "sh", "-c", f"mount -t tmpfs none '{folder}' && exec \"$@\"", "sh"]
            return
    pytest.skip("no mount namespace (unshare) to hide the driver's files from a worker node")


def _trial_workers(session: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes()
            if cmd.startswith(b"ray::ImplicitFunc") and os.getsid(int(entry.name)) == session:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def test_node_without_the_drivers_files_runs_the_same_teacher_and_retries_a_killed_trial(
    tmp_path, data
):
    import timm
    import torch
    from tiny import TINY as ARCH

    hidden = tmp_path / "driver_only"
    hidden.mkdir()
    model = timm.create_model("vit_small_patch14_reg4_dinov2", num_classes=0, img_size=56, **ARCH)
    torch.save(model.state_dict(), hidden / "teacher.pth")
    sha = hashlib.sha256((hidden / "teacher.pth").read_bytes()).hexdigest()
    homes = {n: tmp_path / n for n in ("driver_home", "head_home", "worker_home")}
    for home in homes.values():
        home.mkdir()
    port = free_port()
    head = _head(port, "--num-cpus=1", "--num-gpus=0")
    worker = [RAY, "start", f"--address=127.0.0.1:{port}", "--num-cpus=1", *COMMON]
    head_env = _env(HOME=str(homes["head_home"]))
    with _hidden(hidden) as prefix, started(head, tmp_path / "head.log", head_env):
        wait_until(lambda: _port_open(port), 60, "the Ray head", tmp_path / "head.log")
        log = tmp_path / "worker.log"
        with started([*prefix, *worker], log, _env(HOME=str(homes["worker_home"]))) as node:
            wait_until(lambda: _nodes(port, _env()) == 2, 90, "the worker node", log)
            argv = [sys.executable, str(ROOT / "studies" / "few_shot.py"),
                    "--experiment", "ct", "--storage", str(tmp_path / "rr"), *TINY,
                    "--epochs", "400", "--weights", "driver_only/teacher.pth",
                    "--address", f"127.0.0.1:{port}", "--preset", "cpu",
                    "--data", str(data), "--shots", "2", "3"]  # fmt: skip
            out_path = tmp_path / "study.log"
            with open(out_path, "w") as out:
                study = subprocess.Popen(argv, cwd=tmp_path, stdout=out,
                                         stderr=subprocess.STDOUT,
                                         env=_env(HOME=str(homes["driver_home"])))  # fmt: skip
                killed = _kill_one_trial(node.pid, study, out_path)
                rc = study.wait(timeout=420)
    text = out_path.read_text()
    assert rc == 0, text[-3000:]
    assert killed and "1 retried" in text
    _, children = _runs(tmp_path)
    assert len(children) == 2 and all(r.info.status == "FINISHED" for r in children)
    assert len({r.data.tags["fbft.trial_id"] for r in children}) == 2
    assert len({r.data.tags["ray_node_id"] for r in children}) == 2
    assert {r.data.tags["teacher_weights_sha256"] for r in children} == {sha}
    files = {r.data.tags["teacher_weights_file"] for r in children}  # each node's own copy
    assert {Path(f).parents[4] for f in files} == {homes["head_home"], homes["worker_home"]}
    for name in ("head_home", "worker_home"):  # node-local feature caches, one per node
        assert any((homes[name] / ".cache" / "fbft" / "features").rglob("*.npy")), name


def _kill_one_trial(session: int, study: subprocess.Popen, log: Path) -> bool:
    """SIGKILL one running trial worker of the worker node (the node's own processes only)."""
    deadline = time.time() + 300
    while time.time() < deadline and study.poll() is None:
        pids = _trial_workers(session)
        if pids and "start:" in log.read_text():
            time.sleep(3)  # inside the trial
            if pids[0] in _trial_workers(session):
                os.kill(pids[0], signal.SIGKILL)
                return True
        time.sleep(0.5)
    return False


def test_synthetic_benchmark_regenerated_on_a_node_without_it_has_the_drivers_checksum(tmp_path):
    from fbft.study.plan import ensure_synthetic
    from fbft.study.shipped import Shipped, ShippedFileError, data_on_node, tree_sha256

    params = {"image_size": 64, "n_train": 2, "n_test": 3, "seed": 0}
    driver = tmp_path / "driver" / "synthetic" / "v1-seed0"
    ensure_synthetic(driver, ["gravel"], params, progress=False)
    expected = tree_sha256(driver / "gravel")
    shipped = Shipped(cache_root=str(tmp_path / "node"), synthetic_root=str(driver),
                      synthetic={"gravel": expected}, synthetic_params=params)  # fmt: skip
    assert data_on_node(shipped, str(driver), "gravel") == str(driver)  # seen here: in place
    shutil.rmtree(tmp_path / "driver")  # a node that cannot see the driver's folder
    local = Path(data_on_node(shipped, str(driver), "gravel"))
    assert local == tmp_path / "node" / "synthetic" / "v1-seed0"
    assert tree_sha256(local / "gravel") == expected
    image = next((local / "gravel" / "train").rglob("*.png"))
    image.write_bytes(image.read_bytes()[:-1])  # a node whose copy differs
    with pytest.raises(ShippedFileError, match="differs from the driver's"):
        data_on_node(shipped, str(driver), "gravel")


def test_failed_trials_are_told_as_one_line_per_cause():
    from fbft.study.endings import causes

    oom = (
        "ray.exceptions.OutOfMemoryError: Task was killed due to the node running low on "
        "memory.\nMemory on the node (IP: 10.0.0.7, ID: 4a7f) where the task (actor ID: 9c, "
        "name=ImplicitFunc.__init__, pid=811) was running was 29.5GB / 30.9GB (0.95), which "
        "exceeds the memory usage threshold of 0.95."
    )
    cuda = "GpuUnusable: CUDA unusable on node gpu-1 (10.0.0.8): Ray granted GPU ids 0 but ..."
    failures = [("a", oom), ("b", cuda), ("c", oom)]
    lines = causes(failures, 3)
    assert lines == [
        "2 trial(s) killed by Ray's memory monitor on node 10.0.0.7: lower --max-concurrent or "
        "raise the node's memory",
        f"1 trial(s) failed: {cuda}",
    ]
    assert causes(failures, 3, infrastructure=True) == lines[:1]
