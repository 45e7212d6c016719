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
- Untrusted files (:mod:`fbft.cache.files`): no link below the root is ever followed; a link,
  FIFO or folder in place of an entry, its sidecar or its folder is treated as corruption; a
  failed write removes its temporary file at once (a full disk: :class:`CacheFullError`, not
  retried); ``prune`` removes those of dead writers. A read-only folder serves its entries.
LRU order is the sidecar's mtime, touched (``os.utime`` on its descriptor) on every read.
Inspecting and trimming a cache (``info``, ``prune``: ``fbft cache``): :mod:`fbft.cache.admin`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fbft.cache import files
from fbft.cache.admin import CACHE_VERSION, prune
from fbft.cache.common import (
    CacheReport,
    CorruptEntry,
    Encode,
    HasPathAndImage,
    content_hash,
    default_cache_dir,
    f32,
    host,
    raise_fd_limit,
    unique,
)
from fbft.cache.files import CacheFullError, NotRegularFile

__all__ = [
    "CacheFullError",
    "CacheReport",
    "CorruptEntry",
    "FeatureCache",
    "NotRegularFile",
    "content_hash",
    "default_cache_dir",
    "teacher_tokens",
]

LOCK_STRIPES = 256
CHECKSUM = "sha256"
DTYPES = ("float32", "float16")
_SIDECAR_KEYS = {"shape", "dtype", "digest", "teacher_ms"}
_verified: set[tuple[str, int, int, int]] = set()  # (path, inode, size, mtime) checked here
_announced: set[str] = set()  # read-only cache folders already reported


class FeatureCache:
    """Teacher tokens of image files for one teacher identity, under ``root/<teacher id>/``.

    A cache folder this process cannot write to is *read-only*: complete, checksummed entries
    are served without any lock, new tokens are computed but not stored (said once).
    """

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
        self.read_only = False
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with files.folder(self.root, [self.teacher_id, "locks"], create=True):
                pass
            with files.folder(self.root, [self.teacher_id], create=True) as fd:
                probe = f".probe.{unique()}.tmp"  # a folder we may not write to is read-only
                files.create_locked_temp(probe, fd).close()
                os.unlink(probe, dir_fd=fd)
                if not files.exists("teacher.json", fd):
                    files.write_new("teacher.json", (text + "\n").encode(), fd, unique())
        except OSError as error:
            if error.errno not in files.READ_ONLY_ERRNOS:
                raise
            self.read_only = True
            if str(self.dir) not in _announced:
                _announced.add(str(self.dir))
                warnings.warn(
                    f"teacher-token cache {self.dir} is read-only ({error.strerror}): cached "
                    "entries are used, new ones are not stored",
                    stacklevel=2,
                )

    def paths(self, key: str) -> tuple[Path, Path]:
        """(.npy, sidecar .json) of an entry."""
        stem = self.dir / "entries" / key[:2] / key
        return stem.with_suffix(".npy"), stem.with_suffix(".json")

    def _folder(self, key: str, create: bool = False) -> contextlib.AbstractContextManager[int]:
        """The entry folder of ``key``, reached without following any link."""
        return files.folder(self.root, [self.teacher_id, "entries", key[:2]], create)

    def open(self, key: str) -> tuple[np.ndarray, np.ndarray, float] | None:
        """(f_j, f_k, teacher ms) as read-locked memmaps, or None; raises CorruptEntry (also
        for a link, FIFO or folder in place of the entry, its sidecar or its folder)."""
        npy, side = self.paths(key)
        try:
            with self._folder(key) as fd:
                meta = _sidecar(f"{key}.json", fd, side)
                with files.open_regular(f"{key}.npy", fd, npy) as f:
                    fcntl.flock(f, fcntl.LOCK_SH)
                    st = os.fstat(f.fileno())
                    same = files.inode(f"{key}.npy", fd) == st.st_ino
                    if same and files.exists(f"{key}.json", fd):
                        tokens = self._map(f, npy, meta, st)
                        return tokens[0], tokens[1], float(meta["teacher_ms"])
        except FileNotFoundError:
            return None
        except NotRegularFile as error:
            raise CorruptEntry(str(error)) from error
        except OSError as error:
            raise CorruptEntry(f"{npy}: unreadable ({error})") from error
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

    def store(self, key: str, f_j: np.ndarray, f_k: np.ndarray, teacher_ms: float) -> np.ndarray:
        """Write an entry atomically; returns its read-locked memmap (taken before publishing,
        so an eviction cannot remove it before the caller uses it). A read-only cache returns
        the tokens in memory. A failed write leaves no temporary file; a full disk raises
        :class:`CacheFullError` naming the folder and the bytes needed."""
        tokens = np.stack([f_j, f_k]).astype(self.dtype, copy=False)
        if self.read_only:
            return tokens
        npy, side = self.paths(key)
        tmp = f".{key}.{unique()}.tmp.npy"
        with self._folder(key, create=True) as fd:
            try:
                with files.create_locked_temp(tmp, fd) as f:
                    np.save(f, tokens)
                    f.flush()
                    meta = {"shape": [2, *f_j.shape], "dtype": self.dtype.name}
                    meta.update(created=time.time(), teacher_ms=teacher_ms)
                    f.seek(0)
                    meta["digest"] = hashlib.file_digest(f, CHECKSUM).hexdigest()
                    f.seek(0)
                    st = os.fstat(f.fileno())
                    _verified.add((str(npy), st.st_ino, st.st_size, st.st_mtime_ns))
                    mapped = self._map(f, npy, meta, st)
                    os.replace(tmp, npy.name, src_dir_fd=fd, dst_dir_fd=fd)
                files.write_new(side.name, json.dumps(meta).encode(), fd, unique())
            except BaseException as error:
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=fd)
                if isinstance(error, OSError) and error.errno == errno.ENOSPC:
                    raise self._full(npy.parent, tokens.nbytes) from None
                raise
        return mapped

    def _full(self, where: Path, need: int) -> files.CacheFullError:
        free = files.free_bytes(where)
        return files.CacheFullError(
            f"no space left for the teacher-token cache in {where}: an entry needs "
            f"{need / 1e6:.1f} MB, {free / 1e6:.1f} MB are free; free space (fbft cache prune "
            "--max-gb X), bound it (--cache-max-gb), or move it (--cache-dir)"
        )

    def discard(self, key: str) -> None:
        """Delete an entry (sidecar first, so it disappears before its data); whatever stands
        in its place (a link, a FIFO, a folder) goes too, without being followed."""
        if self.read_only:
            return
        npy, side = self.paths(key)
        with self._folder(key, create=True) as fd:
            for path in (side, npy):
                files.remove(path.name, fd)

    @contextlib.contextmanager
    def locked(self, keys: Sequence[str]) -> Iterator[None]:
        """Hold the computing stripes of ``keys`` (taken in sorted order: no deadlock). A
        read-only cache stores nothing, so it needs no lock (entries are read-locked alone)."""
        if self.read_only:
            yield
            return
        with contextlib.ExitStack() as stack:
            fd = stack.enter_context(files.folder(self.root, [self.teacher_id, "locks"], True))
            for stripe in sorted({int(k[:2], 16) % LOCK_STRIPES for k in keys}):
                name = f"{stripe:03d}.lock"
                handle = files.lock_file(name, fd, self.dir / "locks" / name)
                stack.callback(os.close, handle)
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def enforce_limit(self) -> int:
        """Evict least-recently-used idle entries (whole root) beyond ``max_gb``; count."""
        if self.max_gb is None or self.read_only:
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
        raise_fd_limit()
    for start in range(0, len(samples), max(1, batch_size)):
        chunk = samples[start : start + max(1, batch_size)]
        if cache is None:
            computed, _ = _compute(encode, [s.image for s in chunk], report)
            out += [(f32(a), f32(b)) for a, b in computed]
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
    tokens = [(host(a), host(b)) for a, b in encode(images)]
    per_image_ms = 1000 * (time.perf_counter() - start) / max(1, len(images))
    report.passes += len(images)
    report.teacher_ms += [per_image_ms] * len(images)
    return tokens, per_image_ms


def _sidecar(name: str, fd: int, where: Path) -> dict[str, Any]:
    """An entry's sidecar (touched: LRU order; a read-only cache keeps its own order)."""
    try:
        with files.open_regular(name, fd, where) as handle:
            meta = json.loads(handle.read())
            with contextlib.suppress(OSError):
                os.utime(handle.fileno())
    except (FileNotFoundError, NotRegularFile):
        raise
    except (ValueError, OSError) as error:
        raise CorruptEntry(f"{where}: unreadable sidecar ({error})") from error
    if not isinstance(meta, dict) or not meta.keys() >= _SIDECAR_KEYS:
        raise CorruptEntry(f"{where}: unreadable sidecar (lacks {sorted(_SIDECAR_KEYS)})")
    return meta
