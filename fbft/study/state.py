"""A study's saved state (beside Tune's own): its parent run, tracking store, the resume
command, and the options it was started with — so ``--resume`` continues the same study or
refuses, naming what changed."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fbft.study.checks import CheckError
from fbft.study.options import Options
from fbft.study.spec import Study

STATE_FILE = "fbft_study.json"


@dataclass(frozen=True)
class StudyState:
    name: str
    parent_run_id: str
    tracking_uri: str
    resume_command: str
    options: dict[str, Any]
    started: float
    # preset, its reason and GPUs per trial as decided at the start (--resume keeps them)
    resources: dict[str, Any] = field(default_factory=dict)

    def write(self, storage: str) -> None:
        fs, root = _fs(storage)
        fs.create_dir(f"{root}/{self.name}", recursive=True)
        with fs.open_output_stream(f"{root}/{self.name}/{STATE_FILE}") as f:
            f.write(json.dumps(asdict(self), indent=2).encode())


def storage_path(requested: str | None) -> str:
    """Tune's storage: a remote URI as given, else an absolute local folder."""
    if requested and "://" in requested:
        return requested.rstrip("/")
    return str(Path(requested or "ray_results").expanduser().resolve())


def _fs(storage: str) -> tuple[Any, str]:
    import pyarrow.fs

    if "://" in storage:
        return pyarrow.fs.FileSystem.from_uri(storage)
    return pyarrow.fs.LocalFileSystem(), storage


def read_state(storage: str, name: str) -> StudyState | None:
    fs, root = _fs(storage)
    try:
        with fs.open_input_stream(f"{root}/{name}/{STATE_FILE}") as f:
            data = json.loads(f.read())
        return StudyState(**data)
    except (FileNotFoundError, OSError, ValueError, TypeError):
        return None


def find_state(
    study: Study,
    options: Options,
    storage: str,
    kept: Callable[[str | None], StudyState | None] | None = None,
) -> StudyState | None:
    """The saved state to resume (None for a new study); refuses changed options. ``kept``
    finds a state kept elsewhere (the parent MLflow run) by name, or the latest when None."""
    if not options.resume:
        return None
    name = options.resume
    if name == "latest":
        if "://" in storage:
            raise CheckError("with a remote --storage, name the study to resume: --resume NAME")
        states = [
            read_state(storage, p.parent.name)
            for p in Path(storage).glob(f"{study.name}-*/{STATE_FILE}")
        ]
        states = [s for s in states if s is not None]
        if not states and kept is not None and (found := kept(None)) is not None:
            states = [found]
        if not states:
            raise CheckError(f"no {study.name} study to resume in {storage}")
        name = max(states, key=lambda s: s.started).name
    state = read_state(storage, name) or (kept(name) if kept is not None else None)
    if state is None:
        raise CheckError(
            f"no study named {name!r} in {storage} (look for folders with {STATE_FILE}) nor "
            "in the MLflow experiment"
        )
    changed = _differences(state.options, options.comparable())
    if changed:
        raise CheckError(
            f"--resume {name}: these options differ from the ones the study was started with "
            f"({'; '.join(changed)}). Resume with the original options "
            f"({state.resume_command}), or start a new study."
        )
    return state


def _differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    out = []
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            out.append(f"{key}: was {saved.get(key)!r}, now {now.get(key)!r}")
    return out
