"""What a study shows of itself in MLflow's UI and terminal, without a browser: the printed link,
parent run names, the key metrics' order and section, and Ray's token-auth notice."""

from __future__ import annotations

import json
import logging
from datetime import datetime
from urllib.parse import parse_qs, urlsplit

import pytest

from fbft.study import tracking


def _link_parts(link: str) -> tuple[str, str, dict[str, list[str]]]:
    """(server, hash route, hash query) of a UI link."""
    parts = urlsplit(link)
    route, _, query = parts.fragment.partition("?")
    assert parts.path.endswith("/")  # the UI is the page at the server root (or prefix)
    return f"{parts.scheme}://{parts.netloc}{parts.path[:-1]}", route, parse_qs(query)


@pytest.mark.parametrize(
    ("uri", "server"),
    [
        ("sqlite:////tmp/x/mlflow.db", "http://127.0.0.1:5000"),
        ("postgresql://bob:pa/ss@db/mlflow", "http://127.0.0.1:5000"),
        ("http://alice:s3cr3t@mlflow.lan:5000", "http://mlflow.lan:5000"),
        ("https://tok@host/mlflow/?token=abc", "https://host/mlflow"),
    ],
)
def test_the_link_opens_the_experiment_runs_in_the_model_training_view(uri, server):
    link = tracking.experiment_link(uri, "17")
    shown, route, query = _link_parts(link)
    assert shown == server  # where `mlflow ui` serves, or the tracking server itself
    assert route == "/experiments/17/runs"
    # MLflow 3.17's UI: workflowType picks the view; viewStateShareKey a shared view (below)
    assert query == {"workflowType": ["machine_learning"], "viewStateShareKey": ["fbft"]}
    assert not any(s in link for s in ("s3cr3t", "alice", "tok@", "abc", "pa/ss"))


def test_a_study_prints_the_ui_command_and_the_link_or_only_the_link_of_a_server():
    lines = tracking.ui_lines("sqlite:////tmp/x/mlflow.db", "3")
    assert lines[0].startswith("MLflow: mlflow ui --backend-store-uri sqlite:////tmp/x/mlflow.db")
    assert lines[1].strip() == "then open " + tracking.experiment_link("sqlite:///", "3")
    assert tracking.ui_lines("http://host:5000", "3") == [
        "MLflow: http://host:5000/#/experiments/3/runs?workflowType=machine_learning"
        "&viewStateShareKey=fbft"
    ]


def test_the_shared_view_widens_the_run_name_column():
    state = json.loads(json.dumps(tracking.VIEW_STATE))  # what the experiment tag holds
    column = "attributes.`Run Name`"  # MLflow's column id of run names
    assert state["columnOrder"] == [column] and state["columnWidths"][column] >= 360
    assert tracking.VIEW_TAG == "mlflow.sharedViewState.fbft"


def test_parent_run_names_say_study_data_and_start_and_differ_between_invocations():
    key = "few-shot-20261202-032107-ab12cd"
    started = datetime.strptime(key[len("few-shot-") : -len("-ab12cd")], "%Y%m%d-%H%M%S")
    name = tracking.parent_run_name("few-shot", ["/x/cache/synthetic/v1-seed0"], True, key)
    assert name == f"few-shot · synthetic · {started:%m-%d %H:%M} · ab12cd"
    assert name == "few-shot · synthetic · 12-02 03:21 · ab12cd"
    two = tracking.parent_run_name("few-shot", ["/d/mvtec", "/d/visa"], False, key)
    assert two.startswith("few-shot · mvtec+visa · ")
    same_minute = tracking.parent_run_name("few-shot", ["/d/mvtec"], False, key[:-6] + "99ffee")
    assert same_minute != tracking.parent_run_name("few-shot", ["/d/mvtec"], False, key)


@pytest.mark.parametrize("protocol", ["official", "exact"])
def test_key_metrics_come_first_and_again_in_a_section_sorted_before_the_others(protocol):
    metrics = {
        "cache/teacher_passes": 3.0,
        "aupro_30": 0.1, "aupro_5": 0.2, "aupro_5_q1": 0.3, "rho_5": 0.4, "aupro_1": 0.5,
        "official_aupro_30": 0.6, "official_aupro_5": 0.7, "official_aupro_5_q1": 0.8,
        "official_rho_5": 0.9, "i_auroc": 0.95, "p_auroc": 0.96, "time/fit_seconds": 1.0,
    }  # fmt: skip
    out = tracking.with_key_metrics(metrics, protocol)
    prefix = "official_" if protocol == "official" else ""
    key = ["i_auroc", "p_auroc", *(prefix + k for k in ("aupro_30", "aupro_5", "aupro_5_q1",
                                                       "rho_5"))]  # fmt: skip
    assert list(out)[: len(key)] == key
    assert {k: out[k] for k in metrics} == metrics  # every metric kept, under its own name
    section = {k[len(tracking.KEY_SECTION) :]: v for k, v in out.items() if "/" in k and
               k.startswith(tracking.KEY_SECTION)}  # fmt: skip
    assert section == {k: metrics[k] for k in key}
    # MLflow's charts: one section per prefix before the last "/", sorted; unprefixed last
    sections = sorted({k.rsplit("/", 1)[0] for k in out if "/" in k})
    assert sections[0] == tracking.KEY_SECTION.rstrip("/")


def test_finished_metrics_read_back_the_key_metrics_once(tmp_path):
    client = tracking.prepare_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = client.create_experiment("e")
    run = client.create_run(exp).info.run_id
    tracking.log_metrics(client, run, tracking.with_key_metrics({"aupro_5": 0.5}, "exact"))
    assert tracking.finished_metrics(client, run) == {"aupro_5": 0.5}


def test_rays_token_auth_notice_is_silenced_unless_verbose():
    from ray._private.authentication import authentication_token_setup as auth

    from fbft.study.progress import quiet_ray

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    logger = logging.getLogger(auth.__name__)
    handler, level, earlier = Keep(), logger.level, list(logger.filters)
    logger.filters.clear()  # a study run earlier in this process may have added the filter
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)  # as ray.init leaves it: the notice is a WARNING
    try:
        auth._warn_token_auth_enabled()  # Ray's own function, as ray.init calls it
        assert any("Token authentication is enabled" in m for m in seen)  # the test can fail
        seen.clear()
        quiet_ray(verbose=False)
        auth._warn_token_auth_enabled()
        auth._warn_token_auth_disabled()  # other notices still pass
        assert not any("is enabled" in m for m in seen) and any("is disabled" in m for m in seen)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.filters[:] = earlier
