"""The one saved-file format of every detector, and the teacher record that lets a file rebuild
its teacher.

A file is a ``torch.save`` dict (read back with ``weights_only=True``: tensors and plain values):
a header — ``format_version``, ``method``, ``settings`` (JSON of the method's config) and
``teacher`` (JSON: the teacher's identity and the config fields that rebuild it) — then the
fitted ``state`` (a ``state_dict``: the students' weights, the memory bank's buffers) and
``extra`` (JSON: training history, patch grid). Files written before format version 2 (FBFT's
had no ``method``) are read and upgraded in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from fbft.core.teacher import Teacher

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
# The FBFTConfig fields a teacher is rebuilt from (Teacher.build_config()).
TEACHER_BUILD_FIELDS = (
    "backbone", "backbone_kwargs", "weights", "teacher_seed", "image_size", "layers",
    "precision", "normalize",
)  # fmt: skip


@dataclass
class SavedDetector:
    """A saved file, read: header (method, settings, teacher record) and fitted state."""

    method: str
    settings: dict[str, Any]
    teacher: dict[str, Any] | None  # {"identity": Teacher.describe(), "config": build fields}
    state: dict[str, torch.Tensor]
    extra: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION


def teacher_record(teacher: Teacher | None) -> dict[str, Any] | None:
    """What a saved file records of its teacher: identity (checked at load) and build fields."""
    if teacher is None:
        return None
    return {"identity": teacher.describe(), "config": teacher.build_config()}


def write_detector(saved: SavedDetector, path: str | os.PathLike[str]) -> Path:
    """Write a detector file atomically (a temporary file, then ``os.replace``)."""
    import torch

    payload = {
        "format_version": FORMAT_VERSION,
        "method": saved.method,
        "settings": json.dumps(saved.settings, sort_keys=True),
        "teacher": json.dumps(saved.teacher, sort_keys=True),
        "state": {k: v.detach().cpu() for k, v in saved.state.items()},
        "extra": json.dumps(saved.extra, sort_keys=True),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path)
    return path


def read_detector(path: str | os.PathLike[str]) -> SavedDetector:
    """Read any detector file this fbft wrote (format versions 1 and 2)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no saved detector at {str(path)!r}")
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"{path} is not a saved fbft detector ({type(err).__name__})") from err
    found = raw.get("format_version") if isinstance(raw, dict) else None
    if found not in READABLE_VERSIONS:
        raise ValueError(
            f"{path}: unsupported detector file format version {found!r} (this fbft reads "
            f"versions {', '.join(map(str, READABLE_VERSIONS))}); save it again with this fbft"
        )
    if found == 1:
        return _upgrade_v1(raw)
    return SavedDetector(
        raw["method"],
        json.loads(raw["settings"]),
        json.loads(raw["teacher"]),
        dict(raw["state"]),
        json.loads(raw["extra"]),
        found,
    )


def _upgrade_v1(raw: Mapping[str, Any]) -> SavedDetector:
    """Version 1: FBFT's file (no method; config, students, history) or a memory bank's
    (method, config, grid, tensors; teacher identity only, so it cannot rebuild its teacher)."""
    settings = json.loads(raw["config"])
    identity = json.loads(raw["teacher"])
    if "method" not in raw:
        teacher = {
            "identity": identity,
            "config": {k: settings[k] for k in TEACHER_BUILD_FIELDS if k in settings},
        }
        extra = {"history": list(raw.get("history", []))}
        return SavedDetector("fbft", settings, teacher, dict(raw["students"]), extra, 1)
    teacher = None if identity is None else {"identity": identity, "config": None}
    extra = {"grid": int(raw["grid"])}
    return SavedDetector(raw["method"], settings, teacher, dict(raw["tensors"]), extra, 1)


def rebuild_teacher(
    record: Mapping[str, Any] | None,
    where: str,
    weights: str | None = None,
    device: str | None = None,
) -> Teacher:
    """The teacher a saved file was fitted on: a random-init teacher from its seed, a file
    teacher from its weights file (``weights`` overrides where), checked against the recorded
    identity (the SHA-256 of a weights file), so no detector runs on other tokens."""
    from fbft.core.config import FBFTConfig
    from fbft.core.device import resolve_device
    from fbft.core.teacher import make_teacher

    if not record or not record.get("config"):
        raise ValueError(
            f"{where} records no teacher to rebuild (it was fitted on tokens alone, or saved "
            "before format version 2); predict on teacher tokens (predict_variants) or refit it "
            "with a teacher (fbft.detectors.create_detector)"
        )
    build = dict(record["config"])
    if weights is not None:
        build["weights"] = weights
    config = FBFTConfig(**build, progress=False, device=device or "auto")
    teacher = make_teacher(config).to(resolve_device(config.device))
    expected = record["identity"]["weights"]
    if teacher.weights_id != expected:
        raise ValueError(
            f"{where}: the detector was fitted with teacher weights {expected} but the teacher "
            f"now loads {teacher.weights_id}; pass weights=... pointing at the same weights"
        )
    return teacher
