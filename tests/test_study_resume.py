"""A study interrupted after some trials resumes with --resume: every trial once in MLflow."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from mlflow.tracking import MlflowClient

from fbft.data.synthetic import generate

SCRIPT = Path(__file__).resolve().parents[1] / "studies" / "few_shot.py"


def test_interrupted_study_resumes_without_duplicates(tmp_path):
    generate(tmp_path / "data", categories=["gravel", "parts"], image_size=80, n_train=5, n_test=6)
    argv = [
        sys.executable, str(SCRIPT), "--data", "data", "--shots", "1", "2", "3",
        "--backbone", "vit_small_patch14_reg4_dinov2", "--weights", "random",
        "--backbone-kwargs", json.dumps({"depth": 4, "embed_dim": 48, "num_heads": 2}),
        "--image-size", "56", "--layers", "2,4", "--epochs", "40", "--pictures", "1",
        "--max-concurrent", "1", "--cache-dir", "cache", "--experiment", "resume",
    ]  # fmt: skip
    log = tmp_path / "first.log"
    with open(log, "w") as out:
        first = subprocess.Popen(argv, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while "[fbft] 2/6 finished" not in log.read_text() and time.time() < deadline:
            assert first.poll() is None, log.read_text()[-3000:]
            time.sleep(0.5)
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=120) == 130
    text = log.read_text()
    assert "interrupted after" in text and "--resume few-shot-" in text

    second = subprocess.run(
        [*argv, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=400
    )
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resuming" in second.stdout and "| shots |" in second.stdout

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("resume").experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == 6
    assert max(Counter(r.data.tags["fbft.trial_id"] for r in children).values()) == 1
    assert {(r.data.tags["category"], r.data.tags["shots"]) for r in children} == {
        (c, s) for c in ("gravel", "parts") for s in ("1", "2", "3")
    }
    assert all(r.info.status == "FINISHED" for r in children)
