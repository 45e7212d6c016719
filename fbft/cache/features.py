"""Teacher-token cache: content-addressed, memory-mapped, bounded, self-healing.

An entry is keyed by the teacher's identity (its ``describe()``: everything that changes tokens)
and the SHA-256 of the image file's bytes, so trials that vary only student-side settings never
run the teacher again for an image it has seen. Layout under ``root/<teacher id>/``:
``teacher.json`` (identity), ``locks/NNN.lock`` (computing stripes) and per image
``entries/ab/<key>.npy`` (f_j and f_k stacked, shape (2, N, D), float32 or float16) with its
sidecar ``<key>.json`` (shape, dtype, teacher ms, SHA-256 of the .npy). The teacher id hashes the
identity with ``CACHE_VERSION``, so entries of other versions (the old ``.npz`` ones) live in
other folders and are never read; ``prune`` deletes them.

Rules that make concurrent trials safe:
- Writes are atomic: the .npy is written to a temporary name and ``os.replace``d, the sidecar
  last; an entry exists only once its sidecar does.
- Computing: a trial holds the exclusive stripe locks of a batch's keys (taken in sorted order)
  while it looks up, computes and stores them, so parallel trials wait for one teacher pass.
- Reading: every returned array is a view of a read-only memmap whose file descriptor holds a
  shared ``flock`` on the entry's .npy. The lock lives exactly as long as the memmap (and any
  view of it): a trial "is reading" an entry until it drops the arrays. Nothing to release.
- Eviction (``max_gb``, ``prune``) takes exclusive *non-blocking* locks and skips busy entries;
  it takes no stripe lock. Since nothing ever blocks while holding an entry lock, and stripe
  locks are only awaited by holders of no entry lock other than their own, no cycle can form.
- Corruption (truncated, emptied, flipped byte) is caught by the size check on every open and
  the checksum on first use per process; the entry is named in a warning, deleted, recomputed.
LRU order is the sidecar's mtime, touched (``os.utime``) on every read. Inspecting and
trimming a cache (``info``, ``prune``: ``fbft cache``) live in :mod:`fbft.cache.admin`.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import resource
import socket
import time
import uuid
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fbft.cache.admin import CACHE_VERSION, prune

LOCK_STRIPES = 256
CHECKSUM = "sha256"
DTYPES = ("float32", "float16")
_SIDECAR_KEYS = {"shape", "dtype", "digest", "teacher_ms"}
_verified: set[tuple[str, int, int, int]] = set()  # (path, inode, size, mtime) checked here


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


def content_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes."""
    with open(path, "rb") as f:
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


class FeatureCache:
    """Teacher tokens of image files for one teacher identity, under ``root/<teacher id>/``."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        identity: Mapping[str, Any],
        dtype: str = "float32",
        max_gb: float | None = None,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"cache dtype must be one of {DTYPES}, not {dtype!r}")
        self.root = Path(root).expanduser().resolve()
        self.dtype, self.max_gb = np.dtype(dtype), max_gb
        described = {**identity, "dtype": dtype, "cache_version": CACHE_VERSION}
        text = json.dumps(described, sort_keys=True, default=str)
        self.teacher_id = hashlib.sha256(text.encode()).hexdigest()[:20]
        self.dir = self.root / self.teacher_id
        (self.dir / "locks").mkdir(parents=True, exist_ok=True)
        if not (self.dir / "teacher.json").exists():
            _atomic_write(self.dir / "teacher.json", (text + "\n").encode())

    def paths(self, key: str) -> tuple[Path, Path]:
        """(.npy, sidecar .json) of an entry."""
        stem = self.dir / "entries" / key[:2] / key
        return stem.with_suffix(".npy"), stem.with_suffix(".json")

    def open(self, key: str) -> tuple[np.ndarray, np.ndarray, float] | None:
        """(f_j, f_k, teacher ms) as read-locked memmaps, or None; raises CorruptEntry."""
        npy, side = self.paths(key)
        try:
            meta = json.loads(side.read_bytes())
            f = open(npy, "rb")  # noqa: SIM115 - its descriptor outlives this call in the memmap
        except FileNotFoundError:
            return None
        except (ValueError, OSError) as error:
            raise CorruptEntry(f"{side}: unreadable sidecar ({error})") from error
        if not isinstance(meta, dict) or not meta.keys() >= _SIDECAR_KEYS:
            f.close()
            raise CorruptEntry(f"{side}: unreadable sidecar (lacks {sorted(_SIDECAR_KEYS)})")
        with f:
            fcntl.flock(f, fcntl.LOCK_SH)
            st = os.fstat(f.fileno())
            with contextlib.suppress(FileNotFoundError):
                if os.stat(npy).st_ino == st.st_ino and side.exists():
                    tokens = self._map(f, npy, meta, st)
                    os.utime(side)
                    return tokens[0], tokens[1], float(meta["teacher_ms"])
        return None  # evicted or replaced between the lookup and the lock

    def _map(self, f: Any, npy: Path, meta: dict[str, Any], st: os.stat_result) -> np.memmap:
        """Memmap of an open, locked entry file after checking it against its sidecar."""
        try:
            version = np.lib.format.read_magic(f)
            read = {(1, 0): np.lib.format.read_array_header_1_0}
            shape, fortran, dtype = read.get(version, np.lib.format.read_array_header_2_0)(f)
        except (ValueError, OSError, EOFError) as error:
            raise CorruptEntry(f"{npy}: unreadable .npy header ({error})") from error
        expected = f.tell() + int(np.prod(shape)) * dtype.itemsize
        if list(shape) != meta["shape"] or str(dtype) != meta["dtype"] or fortran:
            raise CorruptEntry(f"{npy}: header {shape} {dtype} does not match its sidecar")
        if st.st_size != expected:
            raise CorruptEntry(f"{npy}: {st.st_size} bytes, expected {expected} (truncated?)")
        stamp = (str(npy), st.st_ino, st.st_size, st.st_mtime_ns)
        if stamp not in _verified:
            offset = f.tell()
            f.seek(0)
            if hashlib.file_digest(f, CHECKSUM).hexdigest() != meta["digest"]:
                raise CorruptEntry(f"{npy}: {CHECKSUM} checksum mismatch (bytes changed)")
            _verified.add(stamp)
            f.seek(offset)
        return np.memmap(f, dtype, "r", f.tell(), tuple(shape))

    def store(self, key: str, f_j: np.ndarray, f_k: np.ndarray, teacher_ms: float) -> np.memmap:
        """Write an entry atomically; returns its read-locked memmap (taken before publishing,
        so an eviction cannot remove it before the caller uses it)."""
        npy, side = self.paths(key)
        npy.parent.mkdir(parents=True, exist_ok=True)
        tmp = npy.with_name(f".{key}.{_unique()}.tmp.npy")
        np.save(tmp, np.stack([f_j, f_k]).astype(self.dtype, copy=False))
        with open(tmp, "rb") as f:
            fcntl.flock(f, fcntl.LOCK_SH)
            meta = {"shape": [2, *f_j.shape], "dtype": self.dtype.name, "created": time.time()}
            meta.update(digest=hashlib.file_digest(f, CHECKSUM).hexdigest(), teacher_ms=teacher_ms)
            f.seek(0)
            st = os.fstat(f.fileno())
            _verified.add((str(npy), st.st_ino, st.st_size, st.st_mtime_ns))
            tokens = self._map(f, npy, meta, st)
            os.replace(tmp, npy)
        _atomic_write(side, json.dumps(meta).encode())
        return tokens

    def discard(self, key: str) -> None:
        """Delete an entry (sidecar first, so it disappears before its data)."""
        for path in self.paths(key)[::-1]:
            path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def locked(self, keys: Sequence[str]) -> Iterator[None]:
        """Hold the computing stripes of ``keys`` (taken in sorted order: no deadlock)."""
        with contextlib.ExitStack() as stack:
            for stripe in sorted({int(k[:2], 16) % LOCK_STRIPES for k in keys}):
                path = self.dir / "locks" / f"{stripe:03d}.lock"
                handle = stack.enter_context(open(path, "a+b"))
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def enforce_limit(self) -> int:
        """Evict least-recently-used idle entries (whole root) beyond ``max_gb``; count."""
        if self.max_gb is None:
            return 0
        return prune(self.root, max_gb=self.max_gb).removed


def teacher_tokens(
    samples: Sequence[HasPathAndImage],
    encode: Encode,
    cache: FeatureCache | None,
    batch_size: int,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], CacheReport]:
    """Tokens of every image, from the cache where present, else one teacher pass each.

    ``sample.image`` is only decoded on a miss. With a cache the arrays are read-only memmaps
    of the entries, read-locked until dropped; without, in-memory float32 arrays.
    """
    report, out = CacheReport(), []
    if cache is not None:
        _raise_fd_limit()
    for start in range(0, len(samples), max(1, batch_size)):
        chunk = samples[start : start + max(1, batch_size)]
        if cache is None:
            computed, _ = _compute(encode, [s.image for s in chunk], report)
            out += [(_f32(a), _f32(b)) for a, b in computed]
            continue
        keys = [content_hash(s.path) for s in chunk]
        found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        with cache.locked(keys):
            for key in dict.fromkeys(keys):
                entry = _lookup(cache, key, report)
                if entry is not None:
                    found[key] = entry[:2]
                    report.reused += keys.count(key)
                    report.teacher_ms += [entry[2]] * keys.count(key)
            missing = [k for k in dict.fromkeys(keys) if k not in found]
            if missing:
                images = [chunk[keys.index(k)].image for k in missing]
                computed, ms = _compute(encode, images, report)
                for key, (f_j, f_k) in zip(missing, computed, strict=True):
                    stored = cache.store(key, f_j, f_k, ms)
                    found[key] = (stored[0], stored[1])
        out += [found[k] for k in keys]
        if missing:
            report.evicted += cache.enforce_limit()
    return out, report


def _lookup(
    cache: FeatureCache, key: str, report: CacheReport
) -> tuple[np.ndarray, np.ndarray, float] | None:
    """An entry, or None after warning about, deleting and counting a corrupt one."""
    start = time.perf_counter()
    try:
        return cache.open(key)
    except CorruptEntry as error:
        warnings.warn(f"corrupt teacher-token cache entry, recomputing: {error}", stacklevel=3)
        cache.discard(key)
        report.recomputed_corrupt += 1
        return None
    finally:
        report.verify_ms += 1000 * (time.perf_counter() - start)


def _compute(
    encode: Encode, images: list[np.ndarray], report: CacheReport
) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    """Run the teacher; the time includes the copy to host memory (which syncs a GPU)."""
    start = time.perf_counter()
    tokens = [(_host(a), _host(b)) for a, b in encode(images)]
    per_image_ms = 1000 * (time.perf_counter() - start) / max(1, len(images))
    report.passes += len(images)
    report.teacher_ms += [per_image_ms] * len(images)
    return tokens, per_image_ms


def _f32(array: np.ndarray) -> np.ndarray:
    return array.astype(np.float32, copy=False)


def _host(array: Any) -> np.ndarray:
    """A numpy array of a numpy array or a (device) tensor, without importing torch."""
    return array if isinstance(array, np.ndarray) else array.detach().cpu().numpy()


def _raise_fd_limit() -> None:
    """Each memmapped entry holds one file descriptor: lift the soft limit to the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = 1 << 20 if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{_unique()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _unique() -> str:
    """A temporary-file tag unique across the hosts sharing a cache (NFS) and their processes."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
