"""Studies as separate processes: Ctrl-C never reads as success and --resume finishes the study
with every trial once; two studies started together on a fresh store both finish."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from mlflow.tracking import MlflowClient
from tiny import tiny_flags

from fbft.data.synthetic import generate

SCRIPT = Path(__file__).resolve().parents[1] / "studies" / "few_shot.py"


def _argv(*flags: str) -> list[str]:
    return [sys.executable, str(SCRIPT), "--data", "data", "--pictures", "1",
            "--cache-dir", "cache", *flags]  # fmt: skip


def _runs(tmp_path: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children


def test_study_stopped_by_sigterm_leaves_no_running_run_and_resumes_without_duplicates(tmp_path):
    """SIGTERM (Kubernetes, Slurm) takes the SIGINT path: exit 143, runs KILLED, resumable."""
    generate(tmp_path / "data", categories=["gravel", "parts"], image_size=80, n_train=5, n_test=6)
    argv = _argv("--shots", "1", "2", "3", "4", *tiny_flags(epochs=60), "--experiment", "resume")
    log = tmp_path / "first.log"
    with open(log, "w") as out:  # default concurrency: two trials at a time on 2 CPUs
        first = subprocess.Popen(argv, cwd=tmp_path, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.time() + 240
        while "finished (" not in log.read_text() and time.time() < deadline:
            assert first.poll() is None, log.read_text()[-3000:]
            time.sleep(0.2)
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=120) == 143
    text = log.read_text()
    assert "interrupted" in text and "--resume few-shot-" in text and "Traceback" not in text
    parents, children = _runs(tmp_path, "resume")
    assert len(parents) == 1 and parents[0].info.status == "KILLED"
    assert children and not [r for r in children if r.info.status == "RUNNING"]
    done = int(text.split(" finished (")[0].rsplit("[fbft] ", 1)[1].split("/")[0])

    # two drivers resume the study at once: one runs it, the other is refused (one line, exit 2)
    resumes = [
        subprocess.Popen([*argv, "--resume"], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]  # fmt: skip
    outputs = [p.communicate(timeout=400) for p in resumes]
    codes = sorted(p.returncode for p in resumes)
    assert codes == [0, 2], "\n----\n".join(o[0][-2000:] + o[1][-2000:] for o in outputs)
    winner = next(p for p in resumes if p.returncode == 0)
    stdout, _ = outputs[resumes.index(winner)]
    _, refused = outputs[1 - resumes.index(winner)]
    assert refused.strip().count("\n") == 0, refused
    assert f"is already running: its driver is pid {winner.pid} on host {socket.gethostname()}" in (
        refused
    )
    assert "resuming" in stdout and "| shots |" in stdout
    already = int(stdout.split(" trials already done")[0].rsplit("[fbft] ", 1)[1].split("/")[0])
    assert already >= done  # counted from the trials already done, not from 0
    parents, children = _runs(tmp_path, "resume")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.metrics["trials_done"] == 8 and len(children) == 8
    assert max(Counter(r.data.tags["fbft.trial_id"] for r in children).values()) == 1
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = [children[0].info.experiment_id]
    for child in children:  # trained once: one loss series of 60 epochs, one model
        assert len(client.get_metric_history(child.info.run_id, "train_loss")) == 60
        run = child.info.run_id
        assert len(client.search_logged_models(experiment, f"source_run_id = '{run}'")) == 1
    assert {(r.data.tags["category"], r.data.params["shots"]) for r in children} == {
        (c, s) for c in ("gravel", "parts") for s in ("1", "2", "3", "4")
    }
    assert all(r.info.status == "FINISHED" for r in children)


def test_two_studies_started_together_on_a_fresh_store_both_finish(tmp_path):
    generate(tmp_path / "data", categories=["gravel"], image_size=80, n_train=3, n_test=4)
    argv = _argv("--shots", "2", *tiny_flags(), "--experiment", "twins")
    procs = [
        subprocess.Popen(
            argv, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n----\n".join(o[-2000:] for o in outputs)
    folders = [p.parent for p in (tmp_path / "ray_results").glob("few-shot-*/fbft_study.json")]
    assert len(folders) == 2
    parents, children = _runs(tmp_path, "twins")
    assert len(parents) == 2 and len(children) == 2
