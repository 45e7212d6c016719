"""The resume state kept twice: in the storage folder (beside Tune's experiment) and in the
parent MLflow run (a tag and an artifact), so a study whose storage folder is lost can still be
found by its name in the experiment and resumed, and a study that lost it while running says
so instead of reporting success."""

from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fbft.study.state import STATE_FILE, StudyState, read_state

STATE_TAG = "fbft.state"  # the state's JSON on the parent run (when it fits in a tag)
VANISHED_TAG = "fbft.state_vanished"
_TAG_LIMIT = 5000


def save(client: Any, state: StudyState) -> None:
    """Keep ``state`` in its parent run: a tag (read first) and ``fbft_study.json``."""
    from fbft.study import tracking

    text = json.dumps(asdict(state), indent=2)
    if len(text) <= _TAG_LIMIT:
        tracking.set_tags(client, state.parent_run_id, {STATE_TAG: text})
    client.log_text(state.parent_run_id, text, STATE_FILE)


def from_run(client: Any, run: Any) -> StudyState | None:
    """The state kept in a parent run (None when it holds none)."""
    text = run.data.tags.get(STATE_TAG)
    if text is None:
        with tempfile.TemporaryDirectory(prefix="fbft-state-") as tmp:
            try:
                path = client.download_artifacts(run.info.run_id, STATE_FILE, tmp)
                text = Path(path).read_text()
            except Exception:  # no such artifact, or an artifact store that is gone
                return None
    try:
        return StudyState(**json.loads(text))
    except (ValueError, TypeError):
        return None


def find(client: Any, experiment: str, name: str | None, kind: str) -> StudyState | None:
    """The state of study ``name`` (None: the latest ``kind`` study) kept in ``experiment``."""
    from fbft.study import tracking

    found = client.get_experiment_by_name(experiment)
    if found is None or (name is not None and "'" in name):
        return None
    pattern = name if name is not None else f"{kind}-%"
    runs = client.search_runs(
        [found.experiment_id],
        filter_string=f"tags.`{tracking.KEY_TAG}` LIKE '{pattern}'",
        order_by=["attributes.start_time DESC"],
        max_results=100,
    )
    for run in runs:
        if tracking.PARENT_TAG in run.data.tags:
            continue
        state = from_run(client, run)
        if state is not None and (name is None or state.name == name):
            return state
    return None


def restore(storage: str, state: StudyState, why: str) -> None:
    """Write the state back into the storage folder (said, with why it was missing)."""
    print(
        f"{why}: restored the state of study {state.name} from its parent MLflow run "
        f"into {storage}/{state.name}/{STATE_FILE}",
        flush=True,
    )
    with contextlib.suppress(OSError):
        state.write(storage)


def vanished(client: Any, storage: str, state: StudyState) -> bool:
    """Whether the storage folder lost the state while the study ran; if so, tag the parent
    run, say so and write the state back (a later ``--resume`` also finds it in MLflow)."""
    if read_state(storage, state.name) is not None:
        return False
    from fbft.study import tracking

    tracking.set_tags(client, state.parent_run_id, {VANISHED_TAG: "true"})
    print(
        f"\nwarning: the saved state of study {state.name} vanished from {storage} while it ran "
        "(was the --storage folder removed, or is it not shared by every host?); Tune's "
        "checkpoints there may be lost too",
        flush=True,
    )
    restore(storage, state, "the state file was missing")
    return True


def verdict(code: int, lost: bool, state: StudyState) -> int:
    """The exit code of a study that lost its state: never success."""
    if not lost:
        return code
    print(
        f"\nNOT A CLEAN SUCCESS: study {state.name} lost its saved state while it ran (see the "
        f"warning above); check the results, or resume with: {state.resume_command}",
        flush=True,
    )
    return code or 1


def finder(client: Any, storage: str, experiment: str, kind: str) -> Any:
    """``find_state``'s fallback: the state kept in MLflow, written back into the storage."""

    def kept(name: str | None) -> StudyState | None:
        found = find(client, experiment, name, kind)
        if found is not None:
            restore(storage, found, f"no {STATE_FILE} for study {found.name} in {storage}")
        return found

    return kept
