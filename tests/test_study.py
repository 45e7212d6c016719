"""Studies on a real local Ray cluster and a real MLflow SQLite store, with a tiny teacher."""

from __future__ import annotations

import importlib.util
import json
import shutil
import socket
from pathlib import Path

import pytest
import ray
from mlflow.tracking import MlflowClient

from fbft.data.synthetic import generate
from fbft.metrics import metric_keys

STUDIES = Path(__file__).resolve().parents[1] / "studies"
TINY = [
    "--backbone", "vit_small_patch14_reg4_dinov2",
    "--backbone-kwargs", json.dumps({"depth": 4, "embed_dim": 48, "num_heads": 2}),
    "--image-size", "56", "--layers", "2,4", "--epochs", "2", "--weights", "random",
    "--pictures", "2",
]  # fmt: skip


def load_study(name: str):
    spec = importlib.util.spec_from_file_location(f"study_{name}", STUDIES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.STUDY


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("study")
    generate(root / "data", categories=["gravel", "parts"], image_size=80, n_train=5, n_test=6)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield root
    ray.shutdown()


def run(workdir: Path, study: str, *flags: str, data: str = "data", experiment: str) -> int:
    from fbft.study import main

    argv = [
        "--data", str(workdir / data),
        "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--storage", str(workdir / "ray_results"),
        "--cache-dir", str(workdir / "cache"),
        "--experiment", experiment,
        *TINY, *flags,
    ]  # fmt: skip
    return main(load_study(study), argv)


def runs_of(workdir: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


def test_few_shot_study_logs_one_parent_and_a_child_per_trial(workdir, capsys):
    assert run(workdir, "few_shot", "--shots", "2", "3", experiment="few") == 0
    out = capsys.readouterr().out
    assert "| shots | I-AUROC | AUPRO@30% | AUPRO@5% | Q1 AUPRO@5% | ρ@5% | trials |" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out and "preset      cpu" in out
    client, parents, children = runs_of(workdir, "few")
    assert len(parents) == 1 and len(children) == 4  # 2 categories × 2 shot counts
    parent = parents[0]
    assert parent.info.status == "FINISHED" and "--shots" in parent.data.params["command"]
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "summary.md",
        "trials.csv",
        "summary.png",
    }
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        assert set(metric_keys()) <= set(child.data.metrics)
        assert {"fit_seconds", "teacher_ms", "students_ms", "maps_ms", "teacher_passes"} <= set(
            child.data.metrics
        )
        tags = child.data.tags
        assert tags["teacher_weights"] == "random" and tags["preset"] == "cpu"
        assert tags["category"] in ("gravel", "parts") and tags["shots"] in ("2", "3")
        assert tags["device"] == "cpu"
        assert child.data.params["config.layers"] == "[2, 4]"
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"pro_curve.png", "quartiles.png", "students.pt"} <= names
        assert any(n.startswith("map_") for n in names)
    summaries = list((workdir / "ray_results").glob("few-shot-*/summary/summary.md"))
    assert len(summaries) == 1 and "| shots |" in summaries[0].read_text()
    # one teacher pass per distinct image in the whole study: 3 train (2 ⊂ 3) + 6 test per category
    assert sum(c.data.metrics["teacher_passes"] for c in children) == 2 * (3 + 6)


def test_a_second_identical_study_runs_no_teacher_pass(workdir):
    assert run(workdir, "few_shot", "--shots", "2", "3", experiment="few") == 0
    _, parents, children = runs_of(workdir, "few")
    assert len(parents) == 2
    newest = max(parents, key=lambda r: r.info.start_time).info.run_id
    mine = [c for c in children if c.data.tags["mlflow.parentRunId"] == newest]
    assert len(mine) == 4
    assert all(c.data.metrics["teacher_passes"] == 0 for c in mine)
    assert all(c.data.metrics["teacher_reused"] > 0 for c in mine)


def test_a_failing_trial_is_reported_not_fatal(workdir, capsys):
    shutil.copytree(workdir / "data", workdir / "broken")
    victim = sorted((workdir / "broken" / "parts" / "test" / "good").glob("*.png"))[0]
    victim.write_bytes(b"not an image")
    assert run(workdir, "few_shot", "--shots", "2", data="broken", experiment="broken") == 1
    out = capsys.readouterr().out
    assert "1 trial(s) failed" in out and "CorruptImageError" in out and str(victim) in out
    _, parents, children = runs_of(workdir, "broken")
    assert parents[0].info.status == "FINISHED"
    by_category = {c.data.tags["category"]: c for c in children}
    assert len(children) == 2  # the failed trial was retried in the same child run
    assert by_category["parts"].info.status == "FAILED"
    assert "CorruptImageError" in by_category["parts"].data.tags["error"]
    assert by_category["gravel"].info.status == "FINISHED"


@pytest.mark.parametrize(
    ("study", "flags", "trials"),
    [
        ("layers", ["--pairs", "1,4", "2,4", "--maps", "product", "k"], 4),
        ("resolution", ["--sizes", "28", "56"], 2),
        ("losses", ["--losses", "l2", "--distances", "l2", "cosine"], 2),
        ("fusion", ["--fusions", "sum", "j"], 2),
        ("search", ["--num-samples", "2", "--asha"], 2),
    ],
)
def test_every_study_runs_on_tiny_settings(workdir, study, flags, trials, capsys):
    categories = ["--categories", "gravel"] if study != "search" else []
    assert run(workdir, study, *categories, *flags, experiment=study) == 0
    assert "| " in capsys.readouterr().out
    _, parents, children = runs_of(workdir, study)
    assert len(parents) == 1 and len(children) == trials
    if study == "search":  # both categories per trial (unless ASHA stopped it after the first)
        assert all("gravel/aupro_5" in c.data.metrics for c in children)
        assert all({"config.lr", "config.layers"} <= set(c.data.params) for c in children)
        for child in children:
            stopped = "stopped_early" in child.data.tags
            assert child.info.status == ("KILLED" if stopped else "FINISHED")
            assert stopped or "parts/aupro_5" in child.data.metrics
    else:
        assert all(c.info.status == "FINISHED" for c in children)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--categories", "leather"], "unknown categories ['leather']"),
        (["--shots", "50"], "has only 5 training images"),
        (["--layers", "3,9"], "between 1 and 4"),
        (["--image-size", "50"], "42 or 56"),
        (["--weights", "/no/such.pth"], "/no/such.pth"),
    ],
)
def test_bad_inputs_stop_before_any_trial(workdir, flags, message, capsys):
    assert run(workdir, "few_shot", *flags, experiment="bad") == 2
    assert message in capsys.readouterr().err


def test_unreachable_tracking_server_and_unreadable_data_are_clear_errors(workdir, capsys):
    from fbft.study import main

    study = load_study("few_shot")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert (
        main(study, ["--data", str(workdir / "data"), "--tracking-uri", f"http://127.0.0.1:{port}"])
        == 2
    )
    assert "does not answer" in capsys.readouterr().err
    (workdir / "empty").mkdir()
    assert main(study, ["--data", str(workdir / "empty")]) == 2
    assert "cannot recognise the dataset layout" in capsys.readouterr().err
