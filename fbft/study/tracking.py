"""MLflow tracking: one experiment per study, a parent run per invocation, child runs per trial.

The default store is a local SQLite file (``sqlite:///mlflow.db`` in the working directory) with
its artifacts beside it (``mlartifacts/``). URIs are made absolute before Ray starts, because
Ray Tune runs each trial in its own working directory. Child runs are keyed by the Tune trial id
(and the variant), so a retried or resumed trial reuses its run instead of adding a duplicate.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlsplit, urlunsplit

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from fbft.core.redact import redact  # also tracking.redact, for every caller in the study
from fbft.metrics.keys import OFFICIAL_PREFIX

TRIAL_TAG = "fbft.trial_id"
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"  # a run's description on its Overview page
KEY_TAG = "fbft.study_key"  # a parent run's resume key (its run name is a display name)
MODEL_TAG = "fbft.model"  # runs:/<id>/model on a child run that logged its detector
STORE_WAIT_ENV = "FBFT_STORE_WAIT_SECONDS"  # how long a busy SQLite store is waited for
KIND_TAG = "mlflow.experimentKind"  # MLflow 3: open the experiment in its model-training view
# MLflow 3.x's UI opens every experiment in its GenAI view on a browser that has not chosen one
# (localStorage ``mlflow.workflowType``); KIND_TAG does not switch it, this URL parameter does.
MODEL_TRAINING_VIEW = "workflowType=machine_learning"
# MLflow 3's own "shared view" (an experiment tag the runs page applies when the URL names its
# key): a Run Name column wide enough for whole nested run names (its 190 px cut them at ~11
# characters). The link a study prints names it.
VIEW_KEY = "fbft"
VIEW_TAG = f"mlflow.sharedViewState.{VIEW_KEY}"
_RUN_NAME_COLUMN = "attributes.`Run Name`"
VIEW_STATE = {"columnOrder": [_RUN_NAME_COLUMN], "columnWidths": {_RUN_NAME_COLUMN: 400}}
UI_PORT = 5000  # where `mlflow ui` serves unless told otherwise (http://127.0.0.1:5000)
# Metric charts: MLflow's run page shows one section per key prefix, prefixes sorted (capitals
# before lower case), and the unprefixed "Model metrics" last; the key metrics are logged a
# second time under this prefix so that a run's charts open on them, not on cache/ counters.
KEY_SECTION = "Key metrics/"
KEY_METRICS = ("i_auroc", "p_auroc", "aupro_30", "aupro_5", "aupro_5_q1", "rho_5")


class TrackingError(Exception):
    """The tracking store cannot be used (named, with what to do)."""


def resolve_tracking_uri(uri: str | None, cwd: str | os.PathLike[str] | None = None) -> str:
    """An absolute tracking URI: relative SQLite/file paths are anchored at ``cwd``."""
    base = Path(cwd or os.getcwd()).resolve()
    if not uri:
        return f"sqlite:///{base / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        return uri if path.is_absolute() else f"sqlite:///{base / path}"
    scheme = urlparse(uri).scheme
    if scheme in ("", "file"):
        path = Path(uri[len("file://") :] if scheme == "file" else uri).expanduser()
        return (path if path.is_absolute() else base / path).resolve().as_uri()
    return uri


def ui_command(uri: str) -> str:
    """The command that serves the MLflow UI on this store (credentials never printed); a
    server needs none: open :func:`experiment_link`."""
    if uri.startswith(("http://", "https://")):
        return f"open {_server(uri)}"
    if uri.startswith("sqlite:///"):
        root = artifact_root(uri)
        return f"mlflow ui --backend-store-uri {redact(uri)} --default-artifact-root {root}"
    return f"mlflow ui --backend-store-uri {redact(uri)}"


def experiment_link(uri: str, experiment_id: str) -> str:
    """The experiment's runs in the UI's model-training view: on the server of an http(s)
    tracking URI (without its credentials), else where :func:`ui_command` serves it."""
    base = (
        _server(uri) if uri.startswith(("http://", "https://")) else f"http://127.0.0.1:{UI_PORT}"
    )
    view = f"{MODEL_TRAINING_VIEW}&viewStateShareKey={VIEW_KEY}"
    return f"{base}/#/experiments/{experiment_id}/runs?{view}"


def ui_lines(uri: str, experiment_id: str) -> list[str]:
    """What a study prints at its end: the command that serves the UI (none for a server) and
    the direct link to the experiment in the model-training view."""
    link = experiment_link(uri, experiment_id)
    if uri.startswith(("http://", "https://")):
        return [f"MLflow: {link}"]
    return [f"MLflow: {ui_command(uri)}", f"        then open {link}"]


def _server(uri: str) -> str:
    """A server URI without user information, query or fragment."""
    parts = urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


def parent_run_name(study: str, roots: Sequence[str], synthetic: bool, key: str) -> str:
    """The parent run's display name, ``few-shot · synthetic · 12-02 03:39 · 3c107e``: the
    study, the data (folder names) and the date, time and tail of the resume key
    (``few-shot-20261202-033903-3c107e``), which stays the storage folder and --resume name."""
    data = "synthetic" if synthetic else "+".join(Path(r).name for r in roots)
    found = re.search(r"-\d{4}(\d\d)(\d\d)-(\d\d)(\d\d)\d\d-(\w+)$", key)
    when = f"{found[1]}-{found[2]} {found[3]}:{found[4]} · {found[5]}" if found else key
    return f"{study} · {data} · {when}"


def with_key_metrics(metrics: Mapping[str, float], protocol: str) -> dict[str, float]:
    """``metrics`` with the detector's key metrics (in the tables' ``protocol``) first, as the
    run page lists them in logging order, and again under :data:`KEY_SECTION`, the first
    section of its charts."""
    official = protocol == "official"
    keys = [OFFICIAL_PREFIX + k if official and k.startswith(("aupro_", "rho_")) else k
            for k in KEY_METRICS]  # fmt: skip
    first = {k: metrics[k] for k in keys if k in metrics}
    return {**first, **metrics, **{KEY_SECTION + k: v for k, v in first.items()}}


def artifact_root(uri: str) -> str | None:
    """Where artifacts go for a SQLite store: ``mlartifacts/`` beside the database."""
    if not uri.startswith("sqlite:///"):
        return None
    return str(Path(uri[len("sqlite:///") :]).parent / "mlartifacts")


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise schema creation of a SQLite store across processes (file lock beside it)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    db = Path(uri[len("sqlite:///") :])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def prepare_store(uri: str) -> MlflowClient:
    """A client on a store that is ready: a server that answers, or a SQLite file whose schema
    exists (created by one process at a time, so concurrent studies do not race)."""
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(_health_request(uri), timeout=10) as response:
                response.read()
        except urllib.error.HTTPError:
            pass  # it answers (a proxy may guard /health); credentials are MLflow's business
        except OSError as err:
            raise TrackingError(
                f"--tracking-uri {redact(uri)}: the MLflow server does not answer "
                f"({redact(str(err))})"
            ) from None
        return MlflowClient(uri)
    with _store_lock(uri):
        for _ in range(5):  # the lock may be taken again between the wait and the first read
            wait_while_busy(uri)
            try:
                client = MlflowClient(uri)
                client.search_experiments(max_results=1)
                return client
            except Exception as err:  # SQLAlchemy/MLflow errors of a file that is not a store
                if _busy(err):
                    continue
                raise TrackingError(
                    f"--tracking-uri {redact(uri)} is not a usable MLflow store "
                    f"({type(err).__name__}: {redact(str(err).splitlines()[0][:200])}); point it "
                    "at an MLflow database, a new file name, or a server"
                ) from None
    raise TrackingError(f"--tracking-uri {redact(uri)}: the store stays busy; retry later")


def wait_while_busy(uri: str, limit: float | None = None) -> None:
    """Wait, saying so, while another process holds the write lock of a SQLite store (an
    open write transaction), up to ``limit`` seconds (``FBFT_STORE_WAIT_SECONDS``, 600)."""
    import sqlite3

    db = Path(uri[len("sqlite:///") :]) if uri.startswith("sqlite:///") else None
    if db is None or not db.is_file():
        return
    limit = float(os.environ.get(STORE_WAIT_ENV, 600)) if limit is None else limit
    started, said = time.monotonic(), False
    while True:
        try:
            with contextlib.closing(sqlite3.connect(db, timeout=1.0)) as con:
                con.execute("BEGIN IMMEDIATE")  # the write lock, released at once
                con.rollback()
            break
        except sqlite3.OperationalError as err:
            if not _busy(err):
                return  # not a store, or unreadable: prepare_store names it
        except sqlite3.DatabaseError:
            return
        waited = time.monotonic() - started
        if waited > limit:
            raise TrackingError(
                f"--tracking-uri {redact(uri)}: the SQLite store is still busy after "
                f"{waited:.0f} s (another process holds its write lock; `fuser {db}` names it); "
                f"retry when it ends, raise {STORE_WAIT_ENV}, or use an MLflow server"
            )
        if not said:
            print(
                f"waiting for the MLflow store {redact(uri)}: another process holds its write "
                f"lock (up to {limit:g} s, {STORE_WAIT_ENV})",
                flush=True,
            )
            said = True
    if said:
        print(f"the MLflow store is free after {time.monotonic() - started:.0f} s", flush=True)


def _busy(err: BaseException) -> bool:
    text = str(err).lower()
    return "database is locked" in text or "database is busy" in text


def _health_request(uri: str) -> Any:
    """The reachability probe of a server URI; user:password@ in it becomes HTTP basic auth,
    as MLflow's client (requests) sends it."""
    import base64
    import urllib.request
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    netloc = parts.netloc.rpartition("@")[2]
    url = urlunsplit(parts._replace(netloc=netloc, path=parts.path.rstrip("/") + "/health"))
    request = urllib.request.Request(url)
    if parts.username is not None:
        user, password = unquote(parts.username), unquote(parts.password or "")
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    return request


def experiment_id(client: MlflowClient, name: str, uri: str) -> str:
    """Id of the experiment ``name``, created if missing (artifacts beside a SQLite store, the
    model-training view in MLflow 3's UI)."""
    found = client.get_experiment_by_name(name)
    if found:
        return found.experiment_id
    root = artifact_root(uri)
    location = Path(root).joinpath(name).as_uri() if root else None
    try:
        exp_id = client.create_experiment(name, artifact_location=location)
    except Exception:  # another study created it at the same moment
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id
    client.set_experiment_tag(exp_id, KIND_TAG, "custom_model_development")
    return exp_id


def start_parent_run(
    client: MlflowClient,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any],
    tags: Mapping[str, str],
) -> str:
    """Create the parent run of a study invocation (``run_name``: its display name) and return
    its id; (re)write the experiment's shared view that the printed link opens."""
    exp = experiment_id(client, experiment, client.tracking_uri)
    client.set_experiment_tag(exp, VIEW_TAG, json.dumps(VIEW_STATE))
    run = client.create_run(exp, run_name=run_name, tags=dict(tags))
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def child_run(
    client: MlflowClient, parent_id: str, key: str, run_name: str, tags: Mapping[str, str]
) -> tuple[str, bool]:
    """The child run of a trial (``key``: trial id, plus the variant when a trial evaluates
    several): (run id, already finished). Reuses a run left by an earlier attempt."""
    parent = client.get_run(parent_id)
    existing = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{key}'",
    )
    if existing:
        run = existing[0]
        return run.info.run_id, run.info.status == "FINISHED"
    run = client.create_run(
        parent.info.experiment_id,
        run_name=run_name,
        tags={PARENT_TAG: parent_id, TRIAL_TAG: key, **tags},
    )
    return run.info.run_id, False


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params (values as strings within MLflow's 6000-character limit; batches split by
    MLflow itself)."""
    client.log_batch(run_id, params=[Param(str(k), str(v)[:6000]) for k, v in params.items()])


def set_tags(client: MlflowClient, run_id: str, tags: Mapping[str, Any]) -> None:
    client.log_batch(run_id, tags=[RunTag(str(k), str(v)[:5000]) for k, v in tags.items()])


def log_metrics(
    client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0
) -> None:
    """Log numeric metrics in one call (NaN is kept: MLflow stores it; inf is dropped)."""
    now = int(1000 * time.time())
    items = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not math.isinf(float(v))
    ]
    client.log_batch(run_id, metrics=items)


def log_series(client: MlflowClient, run_id: str, key: str, values: list[float]) -> None:
    """A metric series, one step per value (e.g. the training loss per epoch)."""
    now = int(1000 * time.time())
    items = [Metric(key, float(v), now, step) for step, v in enumerate(values, start=1)]
    client.log_batch(run_id, metrics=items)


def finished_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    """Latest metric values of a run (the key metrics once, under their own names)."""
    metrics = client.get_run(run_id).data.metrics
    return {k: v for k, v in metrics.items() if not k.startswith(KEY_SECTION)}
