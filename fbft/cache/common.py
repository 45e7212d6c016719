"""What the cache's modules share: the report of a lookup, the default folder, content keys,
and small helpers (host arrays, file-descriptor limit, temporary-file tags)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import socket
import stat
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class HasPathAndImage(Protocol):
    path: str

    @property
    def image(self) -> np.ndarray: ...


Encode = Callable[[list[np.ndarray]], Sequence[tuple[Any, Any]]]


class CorruptEntry(Exception):
    """A cache entry whose bytes do not match its sidecar."""


def default_cache_dir() -> Path:
    """``$FBFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fbft``, else ``~/.cache/fbft``."""
    if "FBFT_CACHE_DIR" in os.environ:
        return Path(os.environ["FBFT_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return base / "fbft"


def human_bytes(n: float) -> str:
    """``3.1 MB`` rather than ``0.00 GB``: decimal units (as ``du --si`` and disk makers use),
    two or three significant digits."""
    unit = "B"
    for unit in ("B", "kB", "MB", "GB"):
        if round(abs(n)) < 1000 or unit == "GB":
            break
        n /= 1000
    if unit == "B" or abs(n) >= 99.5:
        return f"{n:.0f} {unit}"
    return f"{n:.1f} {unit}"


def content_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 of an image file's bytes (a FIFO or device in a data folder cannot block it)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is not a regular file; remove it from the data folder")
        return hashlib.file_digest(f, "sha256").hexdigest()


@dataclass
class CacheReport:
    """What one ``teacher_tokens`` call did; reports add up (``a + b``, ``sum(reports, ...)``)."""

    passes: int = 0
    reused: int = 0
    teacher_ms: list[float] = field(default_factory=list)
    recomputed_corrupt: int = 0
    evicted: int = 0
    verify_ms: float = 0.0

    def __add__(self, other: CacheReport) -> CacheReport:
        return CacheReport(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __radd__(self, other: object) -> CacheReport:
        """``sum(reports)`` starts from 0."""
        return self if other == 0 else NotImplemented


def f32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32, copy=False)


def host(array: Any) -> np.ndarray:
    """A numpy array of a numpy array or a (device) tensor, without importing torch."""
    return array if isinstance(array, np.ndarray) else array.detach().cpu().numpy()


def raise_fd_limit() -> None:
    """Each memmapped entry holds one file descriptor: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def unique() -> str:
    """A temporary-file tag unique across the hosts sharing a cache (NFS) and their processes."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
