"""One study, one driver: a lock file in the study's storage folder.

Two drivers of one study (two ``--resume NAME`` at once) would train every trial twice and give
child runs two loss series and two models. The lock file names its holder (host, pid, when it
started) and is created atomically by hard-linking a complete file into place (``link`` fails if
the name exists, on local disks and NFS alike), so a reader never sees half a lock. A lock is
*stale*, and taken over with a message, when its holder is gone: on the same host its pid has
exited (or now belongs to another process, or the host rebooted); on another host, whose pids
cannot be checked, when its heartbeat (the holder touches the file every ``HEARTBEAT`` seconds)
is older than ``FBFT_STUDY_LOCK_STALE_SECONDS`` (default 600).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import stat
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path

from fbft.study.checks import CheckError

LOCK_FILE = "fbft_driver.lock"
STALE_ENV = "FBFT_STUDY_LOCK_STALE_SECONDS"
STALE_SECONDS = 600.0
HEARTBEAT = 30.0
GUARD_SECONDS = 30.0  # a takeover takes milliseconds; an older guard is left by a crash


class StudyBusyError(CheckError):
    """Another driver runs this study (exit 2, one line naming its host and pid)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: ``boot`` and ``ticks`` (the process start time since boot) tell a
    live holder from a pid the kernel has given to another process since."""

    host: str
    pid: int
    started: float
    boot: str = ""
    ticks: int | None = None

    @classmethod
    def me(cls) -> Holder:
        return cls(socket.gethostname(), os.getpid(), time.time(), _boot_id(), _ticks(os.getpid()))

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.started)
        return f"pid {self.pid} on host {self.host} (since {since:%Y-%m-%d %H:%M:%S})"


def stale_reason(holder: Holder, age: float, stale_after: float | None = None) -> str | None:
    """Why ``holder`` is gone (None: it may still run). ``age``: seconds since its heartbeat."""
    if holder.host != socket.gethostname():
        limit = _stale_after(stale_after)
        if age > limit:
            return f"no heartbeat for {age:.0f} s (limit {limit:g} s, {STALE_ENV})"
        return None
    if holder.boot and holder.boot != _boot_id():
        return "its host has rebooted since"
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return "its process has exited"
    except PermissionError:
        pass  # alive, another user's
    now = _ticks(holder.pid)
    if holder.ticks is not None and now is not None and now != holder.ticks:
        return "its pid now belongs to another process"
    return None


class DriverLock:
    """A held lock: released by :meth:`release` (or :func:`release_all`), kept fresh meanwhile."""

    def __init__(self, path: Path, holder: Holder) -> None:
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="fbft-lock", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT):
            if self.ours():
                with contextlib.suppress(OSError):
                    os.utime(self.path)

    def ours(self) -> bool:
        found = _read(self.path)
        return found is not None and _parse(found[0]) == self.holder

    def release(self) -> None:
        self._stop.set()
        if self.ours():
            with contextlib.suppress(OSError):
                os.unlink(self.path)
        if self in _held:
            _held.remove(self)


_held: list[DriverLock] = []


def acquire(storage: str, name: str, stale_after: float | None = None) -> DriverLock | None:
    """Hold the driver lock of study ``name`` (None for a remote --storage, said once);
    raises :class:`StudyBusyError` while another driver holds it."""
    if "://" in storage:
        print(
            f"note: --storage {storage} is remote: no driver lock; do not run --resume {name} "
            "twice at once",
            flush=True,
        )
        return None
    folder = Path(storage) / name
    folder.mkdir(parents=True, exist_ok=True)
    path, me = folder / LOCK_FILE, Holder.me()
    for _ in range(50):
        if _create(path, me):
            lock = DriverLock(path, me)
            _held.append(lock)
            return lock
        found = _read(path)
        if found is None:
            continue  # released or taken over meanwhile: try again
        text, age = found
        holder = _parse(text)
        if holder is None:  # not a lock file we wrote: garbage in its place
            reason = "it is not a valid lock file"
        else:
            reason = stale_reason(holder, age, stale_after)
            if reason is None:
                raise StudyBusyError(
                    f"study {name} is already running: its driver is {holder.describe()}; wait "
                    f"for it to end or stop it (lock: {path})"
                )
        if _take_over(path, text):
            who = holder.describe() if holder else "an unknown driver"
            print(f"study {name}: taking over the stale lock of {who}: {reason}", flush=True)
        time.sleep(0.05)
    raise StudyBusyError(f"study {name}: could not take its driver lock {path}; retry")


def release_all() -> None:
    """Release every lock this process holds (the study driver's ``finally``)."""
    for lock in list(_held):
        lock.release()


def _create(path: Path, holder: Holder) -> bool:
    """Put a complete lock file at ``path`` unless one is there (atomic: ``link``)."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(asdict(holder)))
            f.flush()
            os.fsync(f.fileno())
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def _take_over(path: Path, seen: str) -> bool:
    """Remove the stale lock if it is still the one judged stale. One driver at a time does
    this (the holder of ``<lock>.takeover``), so a live lock created meanwhile is never removed."""
    guard = path.with_name(path.name + ".takeover")
    if not _create(guard, Holder.me()):
        found = _read(guard)
        if found is not None and found[1] > GUARD_SECONDS:  # its taker died half-way
            with contextlib.suppress(OSError):
                os.unlink(guard)
        return False
    try:
        found = _read(path)
        if found is None or found[0] != seen:
            return False
        os.unlink(path)
        return True
    finally:
        with contextlib.suppress(OSError):
            os.unlink(guard)


def _read(path: Path) -> tuple[str, float] | None:
    """(text, seconds since its last heartbeat) of a lock file; None if there is none. A link or
    a folder in its place is read as garbage (never followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError:
        return "", float("inf")
    try:
        info = os.fstat(fd)
        regular = stat.S_ISREG(info.st_mode)
        text = os.read(fd, 4096).decode(errors="replace") if regular else ""
    except OSError:
        text = ""
    finally:
        os.close(fd)
    return text, time.time() - info.st_mtime


def _parse(text: str) -> Holder | None:
    """The holder a lock file names (fields a later version adds are ignored)."""
    try:
        data = json.loads(text)
        return Holder(**{k: data[k] for k in Holder.__dataclass_fields__ if k in data})
    except (ValueError, TypeError, AttributeError):
        return None


def _stale_after(given: float | None) -> float:
    if given is not None:
        return given
    value = os.environ.get(STALE_ENV, "")
    try:
        return float(value) if value else STALE_SECONDS
    except ValueError:
        raise CheckError(f"{STALE_ENV}={value!r}: give a number of seconds") from None


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _ticks(pid: int) -> int | None:
    """The start time of process ``pid`` in clock ticks since boot (Linux), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
        return int(fields[19])
    except (OSError, ValueError, IndexError):
        return None
