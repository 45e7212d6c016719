"""Inspecting and trimming the teacher-token cache (``fbft cache info|prune``): per-teacher
entries and bytes, and least-recently-used eviction that skips entries a trial is reading.

Nothing here follows a link: listing never descends through one, and a link, FIFO or other
special file found where an entry or a temporary file belongs is deleted itself (its target is
never touched)."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import stat
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fbft.cache import files

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
        for folder, entry in files.walk(tdir / "entries"):
            if not entry.name.endswith(".json") or entry.name.startswith("."):
                continue
            side = folder / entry.name
            npy = side.with_suffix(".npy")
            with contextlib.suppress(FileNotFoundError):
                st = entry.stat(follow_symlinks=False)
                data = npy.lstat().st_size if os.path.lexists(npy) else 0
                found.append((st.st_mtime, st.st_size + data, npy, side))
    return found


def _teachers(root: Path) -> list[tuple[Path, dict[str, Any]]]:
    """Teacher folders under ``root`` with their identity ({} when missing or unreadable); links
    are not teacher folders (prune deletes them)."""
    out = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False):
                tdir, name = Path(entry.path), "teacher.json"
                try:
                    with (
                        files.folder(root, [entry.name]) as fd,
                        files.open_regular(name, fd, tdir / name) as f,
                    ):
                        out.append((tdir, json.loads(f.read())))
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
            with contextlib.suppress(OSError), files.folder(root, []) as fd:
                files.remove(tdir.name, fd)
    for tdir, _ in _teachers(root):
        result.freed_bytes += _sweep(tdir / "entries")
    with contextlib.suppress(FileNotFoundError):
        for link in (e for e in os.scandir(root) if e.is_symlink()):
            os.unlink(link.path)
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


def _sweep(entries: Path) -> int:
    """Delete what a writer left (temporary files whose writer is gone: no lock held on them)
    and anything that is not a regular file (links, FIFOs); bytes freed."""
    freed = 0
    for folder, entry in list(files.walk(entries)):
        if entry.is_dir(follow_symlinks=False):
            continue
        temporary = entry.name.startswith(".") and ".tmp" in entry.name
        with contextlib.suppress(OSError):
            st = entry.stat(follow_symlinks=False)
            if not stat.S_ISREG(st.st_mode):
                (folder / entry.name).unlink()
            elif temporary and _evict(folder / entry.name):
                freed += st.st_size
    return freed


def _evict(npy: Path, side: Path | None = None) -> bool:
    """Delete an entry (or a temporary file) unless someone reads or writes it (exclusive
    non-blocking lock on it); the file is opened without following a link."""
    try:
        fd = os.open(npy, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        if side is not None:
            side.unlink(missing_ok=True)
        return True
    except OSError:  # a link or special file where the entry belongs: delete the name only
        if side is not None:
            side.unlink(missing_ok=True)
        npy.unlink(missing_ok=True)
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if side is not None:
            side.unlink(missing_ok=True)
        npy.unlink(missing_ok=True)
    except BlockingIOError:
        return False
    finally:
        os.close(fd)
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
    free = files.free_bytes(root)
    total = {k: sum(t[k] for t in teachers) for k in ("entries", "bytes")}
    return {"root": str(root), "teachers": teachers, **total, "free_bytes": free}


def _tree_bytes(path: Path) -> int:
    """Bytes of the regular files under ``path``, links not followed (deleted ones count 0)."""
    total = 0
    for _, entry in files.walk(path):
        with contextlib.suppress(OSError):
            st = entry.stat(follow_symlinks=False)
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def datasets(root: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The generated data sets a study keeps beside the tokens (``<cache>/synthetic/<version>``):
    bytes and finished categories of each, so that ``fbft cache info`` accounts for the whole
    cache folder. A category is finished once its name is in the set's folder (a link made
    after generation); half-made ones count in the bytes only."""
    out = []
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        for entry in sorted(os.scandir(root), key=lambda e: e.name):
            if not entry.is_dir(follow_symlinks=False) or entry.name.startswith("."):
                continue
            cats = sorted(
                e.name
                for e in os.scandir(entry.path)
                if not e.name.startswith(".") and (e.is_symlink() or e.is_dir())
            )
            out.append({"id": entry.name, "bytes": _tree_bytes(Path(entry.path)),
                        "categories": cats})  # fmt: skip
    return out
