"""MLflow tracking: one experiment per study, a parent run per invocation, a child run per trial.

The default store is a local SQLite file (``sqlite:///mlflow.db`` in the working directory). URIs
are made absolute before Ray starts, because Ray Tune runs each trial in its own working
directory. Child runs are keyed by the Tune trial id, so a retried or resumed trial reuses its run
instead of adding a duplicate.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

TRIAL_TAG = "fbft.trial_id"
PARENT_TAG = "mlflow.parentRunId"


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
    """The command that opens the MLflow UI on this store."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri}"
    return f"mlflow ui --backend-store-uri {uri}"


def experiment_id(client: MlflowClient, name: str) -> str:
    """Id of the experiment ``name``, created if missing."""
    found = client.get_experiment_by_name(name)
    return found.experiment_id if found else client.create_experiment(name)


def start_parent_run(
    uri: str, experiment: str, run_name: str, params: Mapping[str, Any], tags: Mapping[str, str]
) -> str:
    """Create the parent run of a study invocation and return its id."""
    client = MlflowClient(uri)
    run = client.create_run(experiment_id(client, experiment), run_name=run_name, tags=dict(tags))
    log_params(client, run.info.run_id, params)
    return run.info.run_id


def child_run(
    client: MlflowClient, parent_id: str, trial_id: str, run_name: str, tags: Mapping[str, str]
) -> tuple[str, bool]:
    """The child run of a trial: (run id, already finished). Reuses a run left by an earlier
    attempt of the same trial, so every trial has exactly one child run."""
    parent = client.get_run(parent_id)
    existing = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}' and tags.`{TRIAL_TAG}` = '{trial_id}'",
    )
    if existing:
        run = existing[0]
        return run.info.run_id, run.info.status == "FINISHED"
    run = client.create_run(
        parent.info.experiment_id,
        run_name=run_name,
        tags={PARENT_TAG: parent_id, TRIAL_TAG: trial_id, **tags},
    )
    return run.info.run_id, False


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Log params in one batch (values as strings, MLflow's 6000-character limit respected)."""
    items = [Param(str(k), str(v)[:6000]) for k, v in params.items()]
    for start in range(0, len(items), 100):
        client.log_batch(run_id, params=items[start : start + 100])


def log_metrics(
    client: MlflowClient, run_id: str, metrics: Mapping[str, float], step: int = 0
) -> None:
    """Log numeric metrics in batches (NaN is kept: MLflow stores it; inf is dropped)."""
    now = int(1000 * time.time())
    items = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, int | float) and not math.isinf(float(v))
    ]
    for start in range(0, len(items), 1000):
        client.log_batch(run_id, metrics=items[start : start + 1000])


def finished_metrics(client: MlflowClient, run_id: str) -> dict[str, float]:
    """Latest metric values of a run."""
    return dict(client.get_run(run_id).data.metrics)
