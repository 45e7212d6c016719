"""Studies on a real local Ray cluster and a real MLflow SQLite store, with a tiny teacher."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import pytest
import ray
from mlflow.tracking import MlflowClient
from tiny import tiny_flags

from fbft.data.synthetic import generate
from fbft.metrics import metric_keys, official_keys

STUDIES = Path(__file__).resolve().parents[1] / "studies"
TINY = [*tiny_flags(), "--pictures", "2"]


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
    """Run a study in its own experiment, storage folder and cache (tests share nothing else)."""
    from fbft.study import main

    argv = [
        "--data", str(workdir / data),
        "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}",
        "--storage", str(workdir / f"ray_results-{experiment}"),
        "--cache-dir", str(workdir / f"cache-{experiment}"),
        "--experiment", experiment,
        *TINY, *flags,
    ]  # fmt: skip
    return main(load_study(study), argv)


def uri_of(workdir: Path) -> str:
    return f"sqlite:///{workdir / 'mlflow.db'}"


def _kept(detector) -> dict:
    """The settings a study sets beside the preset (device, seed)."""
    names = ("device", "seed")
    return {n: getattr(detector.config, n) for n in names if hasattr(detector.config, n)}


def runs_of(workdir: Path, experiment: str):
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return client, parents, children


@pytest.fixture(scope="module")
def few(workdir):
    """A finished few-shot study (experiment "few"): its printed output. Tests read it and
    work on copies; none changes what it left."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = run(workdir, "few_shot", "--shots", "2", "3", "--register", "few-models",
                   experiment="few")  # fmt: skip
    assert code == 0
    return out.getvalue()


def test_register_keeps_the_best_model_of_each_category_with_its_provenance(workdir, few):
    client, _, children = runs_of(workdir, "few")
    versions = client.search_model_versions("name = 'few-models'")
    by_category = {v.tags["category"]: v for v in versions}
    assert sorted(by_category) == ["gravel", "parts"]  # one per category, not one per study
    for category, version in by_category.items():
        mine = [c for c in children if c.data.tags["category"] == category]
        best = max(mine, key=lambda c: c.data.metrics["official_aupro_5"])
        assert version.tags["run"] == best.info.run_id
        assert (
            version.tags["metric"] == "official_aupro_5" and version.tags["protocol"] == "official"
        )
        assert float(version.tags["value"]) == pytest.approx(best.data.metrics["official_aupro_5"])
        assert version.tags["teacher_weights"] == "random" and "RANDOM-INIT" in version.description
        key = next((workdir / "ray_results-few").glob("few-shot-*")).name  # the resume key
        assert version.tags["study"] == key  # the parent's run name is for display only
        assert f"models:/few-models/{version.version}" in few


def test_few_shot_study_logs_one_parent_and_a_child_per_trial(workdir, few):
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    out = few
    assert "| shots | I-AUROC | AUPRO@30% | AUPRO@5% | Q1 AUPRO@5% | ρ@5% | trials |" in out
    assert "official AUPRO protocol (99 thresholds)" in out
    assert "mlflow ui --backend-store-uri sqlite:///" in out and "preset      cpu" in out
    assert "Traceback" not in out
    client, parents, children = runs_of(workdir, "few")
    assert len(parents) == 1 and len(children) == 4  # 2 categories × 2 shot counts
    parent = parents[0]
    assert parent.info.status == "FINISHED" and "--shots" in parent.data.params["command"]
    assert "| shots |" in parent.data.tags["mlflow.note.content"]
    assert parent.data.metrics["trials_done"] == 4 and parent.data.metrics["student_fits"] == 4
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {
        "summary.md",
        "trials.csv",
        "summary.png",
    }
    experiment = client.get_experiment_by_name("few")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    # the UI: a parent named after the study and the data, the direct link, a wide Run Name
    key = next((workdir / "ray_results-few").glob("few-shot-*")).name
    _, day, hms, tail = key.rsplit("-", 3)
    shown = f"few-shot · data · {day[4:6]}-{day[6:]} {hms[:2]}:{hms[2:4]} · {tail}"
    assert parent.info.run_name == shown
    assert f"run '{shown}' (--resume {key})" in out
    link = (f"http://127.0.0.1:5000/#/experiments/{experiment.experiment_id}/runs"
            "?workflowType=machine_learning&viewStateShareKey=fbft")  # fmt: skip
    assert f"        then open {link}\n" in out
    view = json.loads(experiment.tags["mlflow.sharedViewState.fbft"])
    assert view["columnWidths"]["attributes.`Run Name`"] >= 360
    assert experiment.artifact_location.startswith((workdir / "mlartifacts").as_uri())
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert child.info.status == "FINISHED"
        assert set(metric_keys()) | set(official_keys()) <= set(child.data.metrics)
        assert {"time/fit_seconds", "time/teacher_ms", "cache/teacher_passes"} <= set(
            child.data.metrics
        )
        assert child.data.metrics["student_fits"] == 1
        for key in ("i_auroc", "official_aupro_5", "official_rho_5"):  # the charts' first section
            assert child.data.metrics[f"Key metrics/{key}"] == child.data.metrics[key]
        tags, params = child.data.tags, child.data.params
        assert tags["teacher_weights"] == "random" and tags["preset"] == "cpu"
        assert tags["category"] in ("gravel", "parts") and tags["method"] == "fbft"
        assert child.info.run_name == f"shots={child.data.params['shots']} · {tags['category']}"
        assert params["shots"] in ("2", "3") and params["config.layers"] == "2,4"
        names = {a.path for a in client.list_artifacts(child.info.run_id)}
        assert {"pro_curve.png", "quartiles.png", "maps"} <= names
        assert any(a.path.startswith("maps/gravel_") or a.path.startswith("maps/parts_")
                   for a in client.list_artifacts(child.info.run_id, "maps"))  # fmt: skip
        info = mlflow.models.get_model_info(f"runs:/{child.info.run_id}/model")
        assert info.flavors["python_function"]
        history = client.get_metric_history(child.info.run_id, "train_loss")
        assert [m.step for m in history] == [1, 2]
    summaries = list((workdir / "ray_results-few").glob("few-shot-*/summary/summary.md"))
    assert len(summaries) == 1 and "| shots |" in summaries[0].read_text()
    import pandas as pd

    trials = pd.read_csv(summaries[0].with_name("trials.csv"))
    assert sorted(trials["run_id"]) == sorted(c.info.run_id for c in children)
    assert not {"pid", "hostname", "node_ip", "trial_id", "config"} & set(trials.columns)
    # one teacher pass per distinct image: 5 train (training or calibration) + 6 test per category
    assert parent.data.metrics["teacher_passes"] == 2 * (5 + 6)


def test_fbft_predict_on_a_trials_model_gives_the_saved_detectors_scores(workdir, few, tmp_path):
    import pandas as pd

    from fbft import FBFT
    from fbft.cli import main as fbft_cli

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    _, _, children = runs_of(workdir, "few")
    child = next(c for c in children if c.data.tags["category"] == "gravel")
    images = workdir / "data" / "gravel" / "test" / "good"
    out = tmp_path / "out"
    assert fbft_cli(["predict", "--model", f"runs:/{child.info.run_id}/model",
                     "--tracking-uri", uri, "--out", str(out), str(images)]) == 0  # fmt: skip
    scores = pd.read_csv(out / "scores.csv")
    mlflow.set_tracking_uri(uri)
    folder = Path(mlflow.artifacts.download_artifacts(f"runs:/{child.info.run_id}/model"))
    saved = FBFT.load(next(folder.rglob("detector.pt")))
    paths = sorted(images.glob("*.png"))
    from fbft.data.common import read_image

    _, expected = saved.predict([read_image(p) for p in paths])
    assert len(scores) == len(paths) and "decision" in scores
    assert scores["score"].tolist() == pytest.approx(expected, rel=1e-5)
    assert all((out / "maps").glob("*.npy"))


def test_a_study_command_starts_its_own_ray_without_the_token_auth_notice(workdir):
    """As a user runs it: the script in its own process, its own local Ray cluster (a fresh,
    short RAY_TMPDIR), Ray's token authentication left at its default."""
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    ray_tmp = tempfile.mkdtemp(prefix="rt", dir="/tmp")
    env.update(
        RAY_TMPDIR=ray_tmp, PYTHONPATH=os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    )
    argv = [sys.executable, str(STUDIES / "few_shot.py"), "--data", str(workdir / "data"),
            "--categories", "gravel", "--shots", "2", "--experiment", "command",
            "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}",
            "--storage", str(workdir / "ray_results-command"),
            "--cache-dir", str(workdir / "cache-command"), *tiny_flags(epochs=1)]  # fmt: skip
    try:
        done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    assert "| shots |" in done.stdout and "Token authentication" not in out
    assert "then open http://127.0.0.1:5000/#/experiments/" in done.stdout


def test_a_second_identical_study_runs_no_teacher_pass_but_heals_a_corrupt_entry(workdir, few):
    shutil.copytree(workdir / "cache-few", workdir / "cache-again")  # the first study's cache
    entry = sorted((workdir / "cache-again" / "features").rglob("*.npy"))[0]
    entry.write_bytes(entry.read_bytes()[:100])  # truncated
    assert run(workdir, "few_shot", "--shots", "2", "3", experiment="again") == 0
    _, parents, mine = runs_of(workdir, "again")
    assert len(parents) == 1
    assert len(mine) == 4 and parents[0].data.metrics["teacher_passes"] == 1  # the corrupt one
    assert all(c.data.metrics["cache/teacher_reused"] > 0 for c in mine)


def test_a_failing_trial_is_reported_once_not_fatal(workdir, capsys):
    shutil.copytree(workdir / "data", workdir / "broken")
    victim = sorted((workdir / "broken" / "parts" / "test" / "good").glob("*.png"))[0]
    victim.write_bytes(b"not an image")
    assert run(workdir, "few_shot", "--shots", "2", data="broken", experiment="broken") == 1
    out = capsys.readouterr().out
    assert "1 trial(s) failed" in out and "CorruptImageError" in out and str(victim) in out
    assert "Traceback" not in out
    client, parents, children = runs_of(workdir, "broken")
    assert parents[0].info.status == "FINISHED"
    by_category = {c.data.tags["category"]: c for c in children}
    assert len(children) == 2
    failed = by_category["parts"]
    assert failed.info.status == "FAILED" and "CorruptImageError" in failed.data.tags["error"]
    assert "error.txt" in {a.path for a in client.list_artifacts(failed.info.run_id)}
    assert by_category["gravel"].info.status == "FINISHED"


def test_fusion_variants_come_from_one_fit_and_equal_a_single_fusion_study(workdir, capsys):
    flags = ["--categories", "gravel"]
    assert (
        run(workdir, "fusion", *flags, "--fusions", "product", "sum", "j", "k", experiment="f4")
        == 0
    )
    out = capsys.readouterr().out
    _, parents, children = runs_of(workdir, "f4")
    assert parents[0].data.metrics["student_fits"] == 1 and len(children) == 4
    rows = [line for line in out.splitlines() if line.startswith("| ") and "fusion" not in line]
    assert len(rows) == 4
    assert run(workdir, "fusion", *flags, "--fusions", "sum", experiment="f1") == 0
    _, _, alone = runs_of(workdir, "f1")
    together = next(c for c in children if c.data.params["fusion"] == "sum")
    for key in ("aupro_5", "official_aupro_30", "i_auroc", "p_auroc"):
        assert together.data.metrics[key] == alone[0].data.metrics[key]


def test_several_datasets_group_the_table(workdir, capsys):
    generate(workdir / "data2", categories=["grass"], image_size=80, n_train=3, n_test=4)
    flags = ["--shots", "2", "--categories", "gravel", "grass"]
    code = run(workdir, "few_shot", *flags, "--data", str(workdir / "data"),
               str(workdir / "data2"), experiment="two")  # fmt: skip
    assert code == 0
    assert "| dataset | shots | I-AUROC |" in capsys.readouterr().out
    _, _, children = runs_of(workdir, "two")
    assert {c.data.tags["category"] for c in children} == {"gravel", "grass"}


@pytest.mark.parametrize(
    ("study", "flags", "runs"),
    [
        ("layers", ["--pairs", "1,4", "2,4", "--maps", "product", "k"], 4),
        ("resolution", ["--sizes", "28", "56"], 2),
        ("losses", ["--losses", "l2", "--distances", "l2", "cosine"], 2),
        (
            "benchmark",
            [
                "--methods",
                "fbft",
                "patchcore",
                "spade",
                "--sizes",
                "56",
            ],
            3,
        ),
        ("search", ["--num-samples", "2", "--asha"], 2),
    ],
)
def test_every_study_runs_on_tiny_settings(workdir, study, flags, runs, capsys):
    categories = ["--categories", "gravel"] if study != "search" else []
    flags = [f.format(workdir=workdir) for f in flags]
    assert run(workdir, study, *categories, *flags, experiment=study) == 0
    printed = capsys.readouterr().out
    assert "| " in printed
    _, parents, children = runs_of(workdir, study)
    assert len(parents) == 1 and len(children) == runs
    if study == "search":  # both categories per trial (unless ASHA stopped it after the first)
        assert all("gravel/aupro_5" in c.data.metrics for c in children)
        assert all({"config.lr", "config.layers"} <= set(c.data.params) for c in children)
        for child in children:
            stopped = "stopped_early" in child.data.tags
            assert child.info.status == ("KILLED" if stopped else "FINISHED")
            assert stopped or "parts/aupro_5" in child.data.metrics
    else:
        assert all(c.info.status == "FINISHED" for c in children)
    if study == "benchmark":  # one teacher pass per distinct image serves every method
        assert {c.data.tags["method"] for c in children} == {"fbft", "patchcore", "spade"}
        assert parents[0].data.metrics["teacher_passes"] == 5 + 6
        assert parents[0].data.metrics["student_fits"] == 1  # PatchCore and SPADE train none
        # the baselines ran the published settings (the default preset), named under the table
        assert "baselines: paper preset" in printed
        assert parents[0].data.params["baseline_preset"] == "paper"
        from fbft.serve.pyfunc import load

        for child in children:  # every method's model is logged and loads as that method
            detector, _ = load(f"runs:/{child.info.run_id}/model", tracking_uri=uri_of(workdir))
            assert detector.method == child.data.tags["method"]
            if detector.method != "fbft":
                assert child.data.tags["baseline_preset"] == "paper"
                assert detector.config == type(detector.config).preset("paper", **_kept(detector))


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--categories", "leather"], "unknown categories ['leather']"),
        (["--shots", "50"], "has only 5 training images"),
        (["--layers", "3,9"], "between 1 and 4"),
        (["--image-size", "50"], "42 or 56"),
        (["--weights", "/no/such.pth"], "/no/such.pth"),
        (["--cpus-per-trial", "3"], "--cpus-per-trial 3"),
        (["--backbone", "resnet18"], "resnet18"),
    ],
)
def test_bad_inputs_stop_before_any_trial(workdir, flags, message, capsys):
    assert run(workdir, "few_shot", *flags, experiment="bad") == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("shots", ["0", "-3", "many"])
def test_shots_must_be_positive_or_full(workdir, shots, capsys):
    with pytest.raises(SystemExit) as exit_:
        run(workdir, "few_shot", "--shots", shots, experiment="bad")
    assert exit_.value.code == 2 and "positive number of images" in capsys.readouterr().err


def test_full_training_sets_and_seeds_give_a_spread(workdir, capsys):
    flags = ["--shots", "2", "full", "--seeds", "0", "1", "--categories", "gravel"]
    assert run(workdir, "few_shot", *flags, experiment="spread") == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith(("| 2 |", "| full |"))]
    assert len(rows) == 2 and all(" ± " in row for row in rows)
    assert "± = std over 2 seeds" in out
    _, _, children = runs_of(workdir, "spread")
    n_train = {c.data.params["shots"]: c.data.params["n_train"] for c in children}
    assert n_train == {"2": "2", "full": "5"}


def test_a_typo_in_an_axis_name_fails_at_declaration():
    from fbft.study import Axis

    with pytest.raises(ValueError, match="fusoin"):
        Axis("fusoin", "--fusions", ("sum",), "typo")


def test_resume_refuses_changed_options(workdir, capsys):
    assert run(workdir, "few_shot", "--shots", "2", "--categories", "gravel", experiment="re") == 0
    name = next((workdir / "ray_results-re").glob("few-shot-*/fbft_study.json")).parent.name
    code = run(workdir, "few_shot", "--shots", "3", "--categories", "gravel",
               "--resume", name, experiment="re")  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "differ" in err and "shots" in err


def test_without_data_the_synthetic_benchmark_is_made_for_the_asked_categories(workdir, capsys):
    from fbft.study import main

    cache = workdir / "fresh-cache"
    argv = ["--categories", "parts", "--shots", "2", "--cache-dir", str(cache),
            "--tracking-uri", f"sqlite:///{workdir / 'mlflow.db'}", "--experiment", "synthetic",
            "--storage", str(workdir / "ray_results-synthetic"), *TINY]  # fmt: skip
    assert main(load_study("few_shot"), argv) == 0
    assert "| shots |" in capsys.readouterr().out
    made = [p.name for p in (cache / "synthetic").glob("*/[!.]*") if p.is_dir()]
    assert made == ["parts"]  # only the category asked for


def test_unreachable_tracking_server_and_unreadable_data_are_clear_errors(workdir, capsys):
    from fbft.study import main

    study = load_study("few_shot")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = ["--data", str(workdir / "data"), "--tracking-uri", f"http://u:secret@127.0.0.1:{port}"]
    assert main(study, argv) == 2
    err = capsys.readouterr().err
    assert "does not answer" in err and "secret" not in err
    (workdir / "empty").mkdir()
    assert main(study, ["--data", str(workdir / "empty")]) == 2
    assert "cannot recognise the dataset layout" in capsys.readouterr().err
    (workdir / "not-a-store.db").write_text("hello")
    argv = [
        "--data",
        str(workdir / "data"),
        "--tracking-uri",
        f"sqlite:///{workdir}/not-a-store.db",
    ]
    assert main(study, argv) == 2
    assert "not a usable MLflow store" in capsys.readouterr().err


def test_resume_finds_the_state_in_mlflow_when_the_storage_folder_is_lost(workdir, capsys):
    flags = ["--shots", "2", "--categories", "gravel"]
    assert run(workdir, "few_shot", *flags, experiment="lost") == 0
    folder = next((workdir / "ray_results-lost").glob("few-shot-*/fbft_study.json")).parent
    _, parents, _ = runs_of(workdir, "lost")
    assert json.loads(parents[0].data.tags["fbft.state"])["name"] == folder.name
    for resume in (["--resume", folder.name], ["--resume"]):  # by name, and the latest
        shutil.rmtree(folder)  # the state file and Tune's experiment with it
        capsys.readouterr()
        assert run(workdir, "few_shot", *flags, *resume, experiment="lost") == 0
        out = capsys.readouterr().out
        assert f"restored the state of study {folder.name}" in out and "| shots |" in out
        assert (folder / "fbft_study.json").is_file()
    client, parents, children = runs_of(workdir, "lost")
    assert len(parents) == 1 and len(children) == 1  # the finished trial is found, not re-run
    assert parents[0].data.metrics["student_fits"] == 1
    assert len(client.get_metric_history(children[0].info.run_id, "train_loss")) == 2  # epochs


def test_a_study_that_loses_its_state_while_running_does_not_report_success(workdir, capsys):
    storage = workdir / "ray_results-vanish"

    def remove_the_study_folder() -> None:
        deadline = time.time() + 120
        while time.time() < deadline:
            found = list(storage.glob("few-shot-*/fbft_study.json"))
            if found:
                shutil.rmtree(found[0].parent, ignore_errors=True)
                return
            time.sleep(0.01)

    thief = threading.Thread(target=remove_the_study_folder)
    thief.start()
    code = run(workdir, "few_shot", "--shots", "2", "--categories", "gravel", experiment="vanish")
    thief.join()
    out = capsys.readouterr().out
    assert code == 1 and "vanished" in out and "NOT A CLEAN SUCCESS" in out
    _, parents, children = runs_of(workdir, "vanish")
    assert parents[0].data.tags["fbft.state_vanished"] == "true"
    assert len(children) == 1
    assert next(storage.glob("few-shot-*/fbft_study.json")).is_file()  # written back


def test_a_tune_error_during_the_trials_leaves_mlflow_true_and_resumes(
    workdir, capsys, monkeypatch
):
    """Tune's controller itself failing (here: a callback raising, as Tune does on an internal
    error) ends the study with the resume command and no RUNNING run; --resume finishes."""
    from fbft.study.progress import Progress

    original = Progress.on_step_begin

    def broken(self, iteration, trials, **info):
        original(self, iteration, trials, **info)
        if any(t.status == "TERMINATED" for t in trials):  # once a trial has finished
            raise RuntimeError("injected failure inside Tune's controller")

    monkeypatch.setattr(Progress, "on_step_begin", broken)
    flags = ["--shots", "2", "3", "--categories", "gravel"]
    assert run(workdir, "few_shot", *flags, experiment="crash") == 1
    captured = capsys.readouterr()
    assert "injected failure" in captured.err and "Traceback" not in captured.err + captured.out
    assert "resume with: " in captured.out
    _, parents, children = runs_of(workdir, "crash")
    assert parents[0].info.status == "FAILED"
    assert not [c for c in [*parents, *children] if c.info.status == "RUNNING"]
    monkeypatch.setattr(Progress, "on_step_begin", original)
    name = next((workdir / "ray_results-crash").glob("few-shot-*/fbft_study.json")).parent.name
    assert run(workdir, "few_shot", *flags, "--resume", name, experiment="crash") == 0
    _, parents, children = runs_of(workdir, "crash")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert sorted(c.data.params["shots"] for c in children) == ["2", "3"]
    assert all(c.info.status == "FINISHED" for c in children)
