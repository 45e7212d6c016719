"""The Tune trainable that runs on a Ray worker: one trial = one training setting on its
categories, logged as one MLflow child run per variant and reported to Tune.

Errors in the inputs (NaN loss, a corrupt image, bad weights) are deterministic: the trial fails
once, with one clean line, and a retry within the same invocation fails at once without
recomputing. Infrastructure errors (I/O, network) are retried by Tune.
"""

from __future__ import annotations

import errno
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from fbft.study import node
from fbft.study.cells import Cell, run_key
from fbft.study.job import Job, JobSettings, Outcome, run_job, variant_label
from fbft.study.shipped import Shipped, data_on_node, node_cache_root, weights_on_node
from fbft.study.spec import show

ERROR_TAG = "error"
INVOCATION_TAG = "fbft.invocation"


class TrialError(Exception):
    """A deterministic failure of a trial, carried as one line (the traceback is in MLflow)."""


@dataclass(frozen=True)
class Context:
    """Everything a trial needs besides its own settings (the same for every trial)."""

    base_config: dict[str, Any]
    variant_axes: tuple[dict[str, str], ...]
    tracking_uri: str
    parent_run_id: str
    invocation: str
    cpus_per_trial: float
    settings: JobSettings  # what every job of the study shares (format, cache, metrics, ...)
    tags: dict[str, str]
    metric: str | None = None
    varying: tuple[str, ...] = ()  # axes with more than one value in the study (run names)
    shipped: Shipped | None = None  # weights and data resolved on the driver, with checksums


def run_trial(config: dict[str, Any], context: Context) -> None:
    """Tune trainable: evaluate one setting on its categories, log it, report it."""
    import torch
    from mlflow.tracking import MlflowClient
    from ray import tune

    torch.set_num_threads(max(1, int(context.cpus_per_trial)))
    cell = Cell.of(config)
    client = MlflowClient(context.tracking_uri)
    runs = _Runs(client, context, cell, run_key(cell, tune.get_context().get_trial_id() or "local"))
    if runs.finished:  # an earlier attempt logged everything: report it again
        tune.report(runs.finished_metrics())
        return
    runs.reraise_known_failure()
    runs.start()
    gpu_ids = node.granted_gpus()
    runs.tag(node.device_tags(gpu_ids))
    done, totals = 0, [{} for _ in context.settings.variants]
    try:
        node.check_gpu(gpu_ids)
        context = _on_node(context, gpu_ids)
        runs.tag({"teacher_weights_file": str(context.base_config.get("weights"))})
        for done, category in enumerate(cell.categories, start=1):
            outcome = _run_category(category, cell, context, runs)
            means = _accumulate(totals, outcome)
            runs.log_step(means, done)
            tune.report(_report(means, done))
    except SystemExit:  # Tune ends the trial from tune.report: a scheduler stopped it
        runs.stopped(done, len(cell.categories))
        raise
    except Exception as err:
        deterministic = not _infrastructure(err)
        runs.failed(err, deterministic)
        if deterministic:
            raise TrialError(_one_line(err)) from None
        raise
    runs.finish()


def _on_node(context: Context, gpu_ids: list[str]) -> Context:
    """The context with this node's files: the shipped weights (checksum verified), the
    node's own cache folder when none was given, ``device=cuda`` where a GPU was granted."""
    share, gpu_bytes = node.gpu_share() if gpu_ids else (0.0, None)
    base = node.device_config(context.base_config, gpu_ids, share, gpu_bytes)
    settings, shipped = context.settings, context.shipped
    if shipped is not None:
        local = weights_on_node(shipped)
        if local is not None:
            base = {**base, "weights": local}
        if shipped.cache_root is None and settings.cache_dir:
            settings = replace(settings, cache_dir=str(node_cache_root(shipped) / "features"))
    return replace(context, base_config=base, settings=settings)


def _run_category(category: str, cell: Cell, context: Context, runs: _Runs) -> Outcome:
    data = cell.data
    if context.shipped is not None:
        data = data_on_node(context.shipped, cell.data, category)
    job = Job(
        data=data,
        category=category,
        method=cell.method,
        config={**cell.config(context.base_config), "progress": False},
        shots=cell.shots,
        seed=cell.seed,
        settings=context.settings,
    )
    with tempfile.TemporaryDirectory(prefix=f"fbft-{category}-") as tmp:
        outcome = run_job(job, Path(tmp))
        start = time.perf_counter()
        runs.log_category(category, outcome, Path(tmp), prefixed=len(cell.categories) > 1)
        seconds = {"time/logging_seconds": time.perf_counter() - start}
        runs.log_metrics(seconds, f"{category}/" if len(cell.categories) > 1 else "")
        outcome.counters.update(seconds)
    return outcome


def _accumulate(totals: list[dict], outcome: Outcome) -> list[dict[str, float]]:
    for total, metrics in zip(totals, outcome.metrics, strict=True):
        for key, value in {**metrics, **outcome.counters}.items():
            total.setdefault(key, []).append(value)
    return [{k: float(np.mean(v)) for k, v in t.items()} for t in totals]


def _report(means: list[dict[str, float]], done: int) -> dict[str, float]:
    """Variant 0's metrics at the top level (a search optimises them), the others under
    ``v<i>/``; counters once (one fit serves every variant)."""
    out = {**means[0], "categories_done": done}
    for i, m in enumerate(means[1:], start=1):
        out.update({f"v{i}/{k}": v for k, v in m.items() if not k.startswith(("time/", "cache/"))})
    return out


def _infrastructure(err: BaseException) -> bool:
    """I/O and network failures are worth a retry; everything else repeats identically."""
    from fbft.data import DatasetError

    if isinstance(err, DatasetError | FileNotFoundError | IsADirectoryError | PermissionError):
        return False
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:  # a full disk stays full
        return False
    return isinstance(err, OSError | ConnectionError | TimeoutError)


def _one_line(err: BaseException) -> str:
    from fbft.core.redact import redact

    text = redact(str(err)).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:400]


class _Runs:
    """The child runs of one trial: one per variant (runs of variants > 0 point at variant 0's,
    which holds the fit, the counters and the model)."""

    def __init__(self, client: Any, context: Context, cell: Cell, trial_id: str) -> None:
        from fbft.study import tracking

        self.client, self.context, self.cell = client, context, cell
        self.ids: list[str] = []
        states = []
        # the axes that vary first, the category last: names readable in a narrow runs table
        varied = [
            f"{k}={v}" for k, v in cell.axes.items() if k in context.varying or k in cell.sampled
        ]
        base = " · ".join([*varied, cell.where])
        for i, shown in enumerate(context.variant_axes):
            label = variant_label(shown)
            key = trial_id if len(context.settings.variants) == 1 else f"{trial_id}/{i}"
            tags = {
                **context.tags,
                "method": cell.method,
                "categories": ",".join(cell.categories),
                **({"category": cell.categories[0]} if len(cell.categories) == 1 else {}),
                "dataset": Path(cell.data).name,
                **({"variant": label} if label else {}),
            }
            run_id, finished = tracking.child_run(
                client, context.parent_run_id, key, " · ".join(filter(None, [base, label])), tags
            )
            self.ids.append(run_id)
            states.append(finished)
        self.finished = all(states)

    def start(self) -> None:
        import ray

        from fbft.study import tracking

        ctx, cell = self.context, self.cell
        for i, run_id in enumerate(self.ids):
            self.client.update_run(run_id, status="RUNNING")
            config = {**cell.config(ctx.base_config), **ctx.settings.variants[i]}
            params = {f"config.{k}": show(v) for k, v in config.items() if k != "progress"}
            params.update({"method": cell.method, "shots": cell.shots, "seed": cell.seed})
            params.update({**cell.axes, **ctx.variant_axes[i]})
            tracking.log_params(self.client, run_id, params)
            tracking.set_tags(
                self.client,
                run_id,
                {
                    "host": socket.gethostname(),
                    "ray_node_id": ray.get_runtime_context().get_node_id(),
                    INVOCATION_TAG: ctx.invocation,
                    **({"fit_run": self.ids[0]} if i else {}),
                },
            )

    def tag(self, tags: dict[str, str]) -> None:
        from fbft.study import tracking

        shipped = self.context.shipped
        if shipped is not None and shipped.weights_sha256:
            tags = {**tags, "teacher_weights_sha256": shipped.weights_sha256}
        for run_id in self.ids:
            tracking.set_tags(self.client, run_id, tags)

    def finished_metrics(self) -> dict[str, float]:
        from fbft.study import tracking

        means = [tracking.finished_metrics(self.client, r) for r in self.ids]
        return _report(means, len(self.cell.categories))

    def reraise_known_failure(self) -> None:
        """A deterministic failure in this invocation: fail again at once (Tune's retry)."""
        run = self.client.get_run(self.ids[0])
        tags = run.data.tags
        if tags.get(INVOCATION_TAG + ".failed") == self.context.invocation and ERROR_TAG in tags:
            raise TrialError(tags[ERROR_TAG])

    def log_category(self, category: str, outcome: Outcome, tmp: Path, prefixed: bool) -> None:
        from fbft.study import tracking

        prefix = f"{category}/" if prefixed else ""
        for i, run_id in enumerate(self.ids):
            metrics = dict(outcome.metrics[i])
            metrics.update(outcome.counters if i == 0 else {"student_fits": 0.0})
            if not prefixed:  # the key metrics first in the run page's lists and charts
                metrics = tracking.with_key_metrics(metrics, self.context.settings.protocol)
            tracking.log_metrics(self.client, run_id, {prefix + k: v for k, v in metrics.items()})
            if not prefixed:
                tracking.log_params(self.client, run_id, {"category": category, **outcome.sizes})
            tracking.set_tags(self.client, run_id, outcome.tags)
            for name, path in outcome.files[i].items():
                folder = str(Path(prefix + name).parent)
                self.client.log_artifact(run_id, str(path), None if folder == "." else folder)
        if outcome.history:
            tracking.log_series(self.client, self.ids[0], prefix + "train_loss", outcome.history)
        self._log_detector(outcome, tmp, prefix)

    def _log_detector(self, outcome: Outcome, tmp: Path, prefix: str) -> None:
        saved = outcome.detector.save(tmp / "detector.pt")
        if outcome.thresholds is not None:
            (tmp / "thresholds.json").write_text(outcome.thresholds.to_json())
        if prefix:  # a search trial's categories: the files only
            self.client.log_artifact(self.ids[0], str(saved), prefix.rstrip("/") or None)
            return
        import mlflow

        from fbft.serve import pyfunc as serving
        from fbft.study import tracking

        mlflow.set_tracking_uri(self.context.tracking_uri)
        with mlflow.start_run(run_id=self.ids[0]):
            uri = serving.log_model(
                saved,
                thresholds=outcome.thresholds,
                name="model",
                log_teacher=self.context.settings.log_teacher,
            )
        self.client.set_tag(self.ids[0], tracking.MODEL_TAG, uri)
        self.client.update_run(self.ids[0], status="RUNNING")

    def log_metrics(self, metrics: dict[str, float], prefix: str) -> None:
        from fbft.study import tracking

        tracking.log_metrics(self.client, self.ids[0], {prefix + k: v for k, v in metrics.items()})

    def log_step(self, means: list[dict[str, float]], done: int) -> None:
        from fbft.study import tracking

        if len(self.cell.categories) > 1:  # running means, one step per category
            for run_id, m in zip(self.ids, means, strict=True):
                m = tracking.with_key_metrics(m, self.context.settings.protocol)
                tracking.log_metrics(self.client, run_id, m, step=done)

    def stopped(self, done: int, total: int) -> None:
        for run_id in self.ids:
            if done < total:
                self.client.set_tag(run_id, "stopped_early", f"after {done} of {total} categories")
            self.client.set_terminated(run_id, "FINISHED" if done == total else "KILLED")

    def failed(self, err: BaseException, deterministic: bool) -> None:
        from fbft.study import tracking

        text = tracking.redact("".join(traceback.format_exception(err)))
        for run_id in self.ids:
            tags = {ERROR_TAG: _one_line(err)}
            if deterministic:
                tags[INVOCATION_TAG + ".failed"] = self.context.invocation
            tracking.set_tags(self.client, run_id, tags)
            self.client.log_text(run_id, text, "error.txt")
            self.client.set_terminated(run_id, "FAILED")

    def finish(self) -> None:
        for run_id in self.ids:
            self.client.set_terminated(run_id, "FINISHED")
