"""Every way a study can end leaves MLflow true: SIGTERM handled like SIGINT, Ray/Tune errors
caught around ``fit()`` and told as one line per cause, runs that did not finish marked KILLED
(the parent FAILED or KILLED, never RUNNING), and the resume command printed."""

from __future__ import annotations

import os
import re
import signal
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

UNFINISHED = ("RUNNING", "SCHEDULED")
EXIT_SIGNAL = {signal.SIGINT: 130, signal.SIGTERM: 143}


@dataclass
class Stop:
    """The signal that ended the study, if one did (SIGINT unless SIGTERM was seen)."""

    signum: int = signal.SIGINT

    @property
    def exit_code(self) -> int:
        return EXIT_SIGNAL.get(self.signum, 130)


@contextmanager
def sigterm_as_sigint() -> Iterator[Stop]:
    """SIGTERM (how Kubernetes and Slurm stop a job) takes Tune's SIGINT path: the experiment
    state is saved and the trials stopped, so the study can be resumed."""
    stop = Stop()

    def on_term(signum: int, frame: Any) -> None:
        stop.signum = signum
        os.kill(os.getpid(), signal.SIGINT)

    previous = signal.signal(signal.SIGTERM, on_term)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def close_children(client: Any, parent_id: str) -> int:
    """Child runs left RUNNING (a trial killed by a signal, the memory monitor or a lost
    node never ends its own run) -> KILLED; a later ``--resume`` reopens them."""
    from fbft.study import tracking

    parent = client.get_run(parent_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{tracking.PARENT_TAG}` = '{parent_id}'",
        max_results=50000,
    )
    left = [r for r in runs if r.info.status in UNFINISHED]
    for run in left:
        client.set_terminated(run.info.run_id, "KILLED")
    return len(left)


def close_parent(client: Any, parent_id: str, status: str, note: str) -> None:
    from fbft.study import tracking

    tracking.set_tags(client, parent_id, {"fbft.ended": note})
    client.set_terminated(parent_id, status)


# (pattern in an error's text, kind)
_KINDS = (
    (re.compile(r"OutOfMemoryError|memory monitor|running low on memory", re.I), "oom"),
    (
        re.compile(
            r"NodeDiedError|node .*(died|dead|removed)|ActorDiedError|actor died|"
            r"WorkerCrashedError|worker (died|crashed)|SIGKILL",
            re.I,
        ),
        "lost",
    ),
)
_NODE = re.compile(r"\(IP: ([^,)\s]+)|node_ip(?:_address)?[=: ]+'?([\d.]+)|on node ([\w.:-]+)")


def kind(text: str) -> str:
    """``oom`` (Ray's memory monitor), ``lost`` (a node or worker process died) or ``trial``."""
    return next((k for pattern, k in _KINDS if pattern.search(text)), "trial")


def causes(
    failures: Sequence[tuple[str, str]], max_failures: int, infrastructure: bool = False
) -> list[str]:
    """One line per cause of failed trials (``(description, error text)`` pairs); only the
    infrastructure causes (memory monitor, lost nodes) with ``infrastructure``."""
    if infrastructure:
        failures = [f for f in failures if kind(f[1]) != "trial"]
    grouped: Counter[tuple[str, str]] = Counter()
    texts: dict[tuple[str, str], str] = {}
    for _, text in failures:
        k = kind(text)
        found = _NODE.search(text)
        node = next((g for g in found.groups() if g), "?") if found else "?"
        key = (k, node) if k != "trial" else (k, text.splitlines()[0][:300] if text else "")
        grouped[key] += 1
        texts[key] = text
    lines = []
    for (k, what), n in grouped.items():
        if k == "oom":
            lines.append(
                f"{n} trial(s) killed by Ray's memory monitor on node {what}: lower "
                "--max-concurrent or raise the node's memory"
            )
        elif k == "lost":
            lines.append(
                f"{n} trial(s) lost their Ray worker (node {what}) more than --max-failures "
                f"{max_failures} times: check that node (`ray logs`), or raise --max-failures"
            )
        else:
            lines.append(f"{n} trial(s) failed: {what}")
    return lines


def crash_lines(
    err: BaseException, failures: Sequence[tuple[str, str]], max_failures: int
) -> list[str]:
    """What to print when Tune itself stopped: its error in one line, then the trials' causes."""
    cause = err
    while cause.__cause__ is not None and cause.__cause__ is not cause:
        cause = cause.__cause__
    text = str(cause).strip().splitlines()
    head = f"Ray Tune stopped: {type(cause).__name__}: {text[0][:300] if text else ''}"
    lines = causes(failures, max_failures)
    if not failures and kind(str(cause)) != "trial":
        lines = causes([("", str(cause))], max_failures)
    return [head, *lines]


def saved_failures(path: str, trainable: Any) -> list[tuple[str, str]]:
    """The failed trials Tune saved in ``path`` (after ``fit()`` raised, no result grid)."""
    from ray import tune

    from fbft.study.report import collect

    try:
        grid = tune.Tuner.restore(path, trainable).get_results()
    except Exception:
        return []
    return collect(grid, ({},)).failures
