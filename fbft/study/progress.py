"""The terminal of a study: Ray and Tune quiet by default, one line per trial event, an ETA
weighted by each trial's expected work."""

from __future__ import annotations

import logging
import os
import time
import warnings
from collections.abc import Sequence
from typing import Any

from ray import tune

from fbft.study.cells import Cell


def quiet_ray(verbose: bool) -> None:
    """Ray's banners, Tune's boxes and loggers off unless ``--verbose`` (set before ray.init)."""
    if verbose:
        return
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    os.environ.setdefault("RAY_DEDUP_LOGS", "1")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "1000000")
    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "0")
    for name in ("ray", "ray.tune", "ray.train", "ray.air", "ray.data", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", module="ray")
    # ray.init sets the "ray" logger's level again; a filter on the logger that says it stays
    auth = logging.getLogger("ray._private.authentication.authentication_token_setup")
    if not any(isinstance(f, _NoAuthNotice) for f in auth.filters):
        auth.addFilter(_NoAuthNotice())


class _NoAuthNotice(logging.Filter):
    """Ray 2.5x's "Token authentication is enabled for this Ray cluster" on every local
    cluster (a notice, not a problem: the token is Ray's default); other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled")


def work_weights(cells: Sequence[Cell], base: Any) -> list[float]:
    """Expected work of each trial (training images × epochs + test images), for the ETA."""
    numeric = [int(c.shots) for c in cells if str(c.shots).isdigit()]
    full = max(numeric, default=100) * 2
    out = []
    for cell in cells:
        images = int(cell.shots) if str(cell.shots).isdigit() else full
        epochs = int(cell.changes.get("epochs", base.epochs))
        out.append(float(images * epochs + 50))
    return out


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def describe(config: dict) -> str:
    """``gravel shots=5 seed=0`` from a trial's Tune config."""
    return Cell.of(config).label()


class Progress(tune.Callback):
    """Prints a line when a trial starts, finishes, fails or is retried: counts (a resumed study
    counts the trials already done), the time of this invocation, and an ETA: the remaining
    work (each trial weighted by training images × epochs + test images) at the seconds per
    unit of work measured on this invocation's trials, divided by the trials running at once.
    """

    def __init__(self, total: int, weights: Sequence[float] = ()) -> None:
        self.total = total
        self.weights = list(weights)
        self._reset()

    def _reset(self) -> None:
        self.start = time.time()
        self.done_work = 0.0
        self.ended: set[str] = set()
        self.started: set[str] = set()
        self.retried: set[str] = set()
        self.began: dict[str, float] = {}
        self.busy = 0.0  # trial-seconds of the trials finished in this invocation
        self.busy_work = 0.0  # their work
        self.slots = 1  # most trials seen running at once
        self.resumed: int | None = None  # trials already ended when this invocation began

    def setup(self, **info) -> None:
        """Called at the start of every invocation (a restored Tuner carries the pickled
        callback): the clock and the counts start again."""
        self._reset()

    def _weight(self, trial) -> float:
        index = Cell.of(trial.config).index
        if index is not None and index < len(self.weights):
            return self.weights[index]
        return 1.0

    def on_step_begin(self, iteration, trials, **info) -> None:
        if self.resumed is None:  # first step: trials a resumed study already ended
            self.resumed = 0
            for trial in trials:
                if trial.status in ("TERMINATED", "ERROR") and trial.trial_id not in self.ended:
                    self.ended.add(trial.trial_id)
                    self.done_work += self._weight(trial)
                    self.resumed += 1
            if self.resumed:
                print(f"[fbft] {self.resumed}/{self.total} trials already done", flush=True)
        running = sum(t.status == "RUNNING" for t in trials)
        self.slots = max(self.slots, running)

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.began.setdefault(trial.trial_id, time.time())
        if trial.trial_id not in self.started:  # a retry is not a new start
            self.started.add(trial.trial_id)
            print(f"[fbft] start: {describe(trial.config)}", flush=True)

    def on_trial_recover(self, iteration, trials, trial, **info) -> None:
        self.retried.add(trial.trial_id)
        print(
            f"[fbft] retry ({len(self.retried)} retried so far): {describe(trial.config)}",
            flush=True,
        )

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._line(trials, trial, "done")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._line(trials, trial, "FAILED")

    def eta(self) -> float:
        """Seconds left: remaining work × seconds per unit of work ÷ trials at once."""
        total_work = sum(self.weights) if len(self.weights) == self.total else float(self.total)
        left = max(0.0, total_work - self.done_work)
        if self.busy_work <= 0:
            return float("nan")
        return left * (self.busy / self.busy_work) / max(1, self.slots)

    def _line(self, trials, trial, what: str) -> None:
        if trial.trial_id in self.ended:
            return
        self.ended.add(trial.trial_id)
        weight = self._weight(trial) if self.weights else 1.0
        self.done_work += weight
        if trial.trial_id in self.began:
            self.busy += time.time() - self.began[trial.trial_id]
            self.busy_work += weight
        status = [t.status for t in trials if t is not trial]  # this one is not updated yet
        failed = status.count("ERROR") + (what == "FAILED")
        running = status.count("RUNNING")
        self.slots = max(self.slots, running + 1)
        eta = self.eta()
        retried = f", {len(self.retried)} retried" if self.retried else ""
        line = (
            f"[fbft] {len(self.ended)}/{self.total} finished ({failed} failed{retried}, "
            f"{running} running) · {duration(time.time() - self.start)} elapsed · "
            f"ETA {duration(eta) if eta == eta else '?'} · {what}: {describe(trial.config)}"
        )
        if what == "FAILED" and trial.error_file:
            line += f"\n        {_error_line(trial.error_file)}"
        print(line, flush=True)


def _error_line(path: str) -> str:
    """The last line of a trial's error file: the exception and its message."""
    try:
        with open(path) as f:
            lines = [ln.strip() for ln in f if ln.strip()]
    except OSError:
        return ""
    found = [ln for ln in lines if "TrialError:" in ln or "Error:" in ln]
    line = found[-1] if found else lines[-1] if lines else ""
    return line.replace("fbft.study.trial.TrialError: ", "")[:300]
