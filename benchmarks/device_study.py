"""Step 3 of the device check: the study platform sharing one GPU among four trials.

A tiny few-shot study (one synthetic category, shots 1-4: four trials) with ``--gpus-per-trial
0.25`` on CUDA (``0`` and ``--cpus-per-trial 0.5`` on a CPU, so four still fit two cores) on its
own local Ray cluster. From the MLflow child runs: four trials, all running at once (their
intervals overlap), each tagged with the device it ran on. The study runs in its own process
group with a timeout inside the step's budget, and the group is killed after it (Ray's local
processes included), so nothing outlives the step.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from device_record import TINY, Recorder

from fbft.data.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]
CATEGORY = "gravel"
EXPERIMENT = "device-check"
TINY_FLAGS = ["--backbone", "vit_small_patch14_reg4_dinov2", "--weights", "random",
              "--backbone-kwargs", json.dumps(TINY), "--image-size", "56", "--layers", "2,4",
              "--epochs", "2", "--pictures", "0"]  # fmt: skip


def run(rec: Recorder, ctx: dict[str, Any]) -> None:
    rec.check("few-shot study, 4 trials on one device", lambda: study(rec, ctx), estimate_s=10)


def study(rec: Recorder, ctx: dict[str, Any]) -> dict[str, Any]:
    s, work = ctx["sizes"]["study"], Path(ctx["work"]) / "study"
    data = generate(work / "data", [CATEGORY], image_size=s["data_size"], n_train=s["n_train"],
                    n_test=s["n_test"], seed=0)  # fmt: skip
    uri = f"sqlite:///{work / 'mlflow.db'}"
    argv = [sys.executable, str(ROOT / "studies" / "few_shot.py"), "--data", str(data),
            "--shots", "1", "2", "3", "4", "--seeds", "0", *TINY_FLAGS,
            "--experiment", EXPERIMENT, "--tracking-uri", uri,
            "--cache-dir", str(work / "cache"), "--storage", str(work / "ray_results"),
            "--cpus-per-trial", str(s["cpus"]), "--gpus-per-trial", str(s["gpus"])]  # fmt: skip
    env = dict(os.environ)
    # Ray's socket paths must stay short: a folder of our own under /tmp unless one is given.
    own_tmp = None if env.get("RAY_TMPDIR") else tempfile.mkdtemp(prefix="rdc", dir="/tmp")
    env.setdefault("RAY_TMPDIR", own_tmp or "")
    env.pop("RAY_ADDRESS", None)  # its own local cluster, never someone else's
    proc = subprocess.Popen(
        argv, cwd=work, env=env, text=True, start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=max(1.0, rec.left() - 5))
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"the study was stopped at the step's deadline: {argv}") from None
    finally:
        with contextlib.suppress(ProcessLookupError):  # the study and the Ray processes it started
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        if own_tmp:
            shutil.rmtree(own_tmp, ignore_errors=True)
    if proc.returncode != 0:
        raise RuntimeError(f"study exited {proc.returncode}:\n{output[-2000:]}")
    return trials(uri, ctx["device"])


def trials(uri: str, device: str) -> dict[str, Any]:
    """Four child runs, running at once, on the device asked for."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    spans = sorted((r.info.start_time, r.info.end_time or r.info.start_time) for r in children)
    events = sorted([(a, 1) for a, _ in spans] + [(b, -1) for _, b in spans])
    running, most = 0, 0
    for _, change in events:  # ends sort before starts at the same instant
        running += change
        most = max(most, running)
    devices = sorted({r.data.tags.get("device", "?") for r in children})
    return {
        "trials": len(children),
        "max_running_at_once": most,
        "all_at_once": len(spans) == 4 and max(a for a, _ in spans) < min(b for _, b in spans),
        "devices": devices,
        "device_ok": all(d.split(":")[0] == device.split(":")[0] for d in devices),
        "teacher_passes": sum(r.data.metrics.get("cache/teacher_passes", 0) for r in children),
    }
