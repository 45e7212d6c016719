"""Inspecting and trimming the teacher-token cache (``fbft cache info|prune``): per-teacher
entries and bytes, and least-recently-used eviction that skips entries a trial is reading."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Layout version of the cache folder: entries of other versions are never read (prune removes
# them). Bump it when the entry format changes.
CACHE_VERSION = 2


@dataclass
class PruneResult:
    removed: int = 0
    freed_bytes: int = 0
    busy: int = 0


def _entries(root: Path, teacher: str | None = None) -> list[tuple[float, int, Path, Path]]:
    """(last use, bytes, .npy, sidecar) of every current-version entry under ``root``."""
    found = []
    for tdir, meta in _teachers(root):
        if meta.get("cache_version") != CACHE_VERSION or not _matches(tdir, meta, teacher):
            continue
        for side in tdir.glob("entries/*/*.json"):
            npy = side.with_suffix(".npy")
            with contextlib.suppress(FileNotFoundError):
                st = side.stat()
                size = st.st_size + (npy.stat().st_size if npy.exists() else 0)
                found.append((st.st_mtime, size, npy, side))
    return found


def _teachers(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Teacher folders under ``root`` with their identity ({} when missing or unreadable)."""
    out = []
    for tdir in sorted(p for p in Path(root).glob("*") if p.is_dir()):
        try:
            out.append((tdir, json.loads((tdir / "teacher.json").read_bytes())))
        except (OSError, ValueError):
            out.append((tdir, {}))
    return out


def _matches(tdir: Path, meta: Mapping[str, Any], teacher: str | None) -> bool:
    return teacher is None or tdir.name.startswith(teacher) or meta.get("backbone") == teacher


def prune(
    root: str | os.PathLike[str],
    max_gb: float | None = None,
    older_than_days: float | None = None,
    teacher: str | None = None,
    everything: bool = False,
) -> PruneResult:
    """Remove idle entries: all (``everything``), unused for ``older_than_days``, and then the
    least recently used until the root holds at most ``max_gb``. Entries being read are
    skipped. Folders of other cache versions (never readable) are deleted whole."""
    root, result = Path(root).expanduser().resolve(), PruneResult()
    for tdir, meta in _teachers(root):
        if meta.get("cache_version") != CACHE_VERSION and _matches(tdir, meta, teacher):
            result.freed_bytes += _tree_bytes(tdir)
            shutil.rmtree(tdir, ignore_errors=True)
    for tmp in root.glob("*/entries/*/.*.tmp*"):  # left by writers that crashed a day ago
        with contextlib.suppress(OSError):
            if tmp.stat().st_mtime < time.time() - 86400:
                result.freed_bytes += tmp.stat().st_size
                tmp.unlink()
    entries = sorted(_entries(root, teacher))  # oldest use first
    total = sum(e[1] for e in _entries(root))
    cutoff = time.time() - 86400 * older_than_days if older_than_days is not None else None
    limit = None if max_gb is None else max_gb * 1e9
    for used, size, npy, side in entries:
        if not (everything or (cutoff and used < cutoff) or (limit is not None and total > limit)):
            continue
        if _evict(npy, side):
            result.removed, result.freed_bytes = result.removed + 1, result.freed_bytes + size
            total -= size
        else:
            result.busy += 1
    return result


def _evict(npy: Path, side: Path) -> bool:
    """Delete an entry unless someone reads it (exclusive non-blocking lock on its .npy)."""
    try:
        with open(npy, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            side.unlink(missing_ok=True)
            npy.unlink(missing_ok=True)
    except BlockingIOError:
        return False
    except FileNotFoundError:
        side.unlink(missing_ok=True)
    return True


def info(root: str | os.PathLike[str]) -> dict[str, Any]:
    """Entries, bytes and identity per teacher folder, and the free disk of ``root``."""
    root = Path(root).expanduser().resolve()
    teachers = []
    for tdir, meta in _teachers(root):
        current = meta.get("cache_version") == CACHE_VERSION
        entries = _entries(root, tdir.name) if current else []
        teachers.append(
            {"id": tdir.name, "identity": meta, "current": current, "entries": len(entries),
             "bytes": _tree_bytes(tdir),
             "last_used": max((e[0] for e in entries), default=None)}
        )  # fmt: skip
    free = shutil.disk_usage(root).free if root.exists() else None
    total = {k: sum(t[k] for t in teachers) for k in ("entries", "bytes")}
    return {"root": str(root), "teachers": teachers, **total, "free_bytes": free}


def _tree_bytes(path: Path) -> int:
    """Bytes of the files under ``path`` (files deleted meanwhile count 0)."""
    total = 0
    for p in path.rglob("*"):
        with contextlib.suppress(OSError):
            total += p.stat().st_size if p.is_file() else 0
    return total
