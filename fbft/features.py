"""Teacher-feature cache: content-addressed on disk and shared by every trial of every study.

An entry is keyed by the teacher's identity (backbone, weights, image size, blocks, precision)
and the SHA-256 of the image file's bytes, so trials that vary only student-side settings
(shots, seeds, loss, lr, epochs, fusion) never run the teacher again for an image it has seen.
Writes are atomic (temporary file + ``os.replace``) and an image being computed is locked, so
parallel trials wait for one teacher pass instead of running their own.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from fbft.model import FBFT

CACHE_VERSION = 1
LOCK_STRIPES = 256


def default_cache_dir() -> Path:
    """``$FBFT_CACHE_DIR``, else ``$XDG_CACHE_HOME/fbft``, else ``~/.cache/fbft``."""
    if "FBFT_CACHE_DIR" in os.environ:
        return Path(os.environ["FBFT_CACHE_DIR"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")).expanduser()
    return base / "fbft"


def content_hash(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class CacheStats:
    """Teacher passes run and cache entries reused by one caller."""

    passes: int = 0
    reused: int = 0
    teacher_ms: list[float] = field(default_factory=list)


class FeatureCache:
    """Teacher tokens of image files for one teacher, under ``root/<teacher id>/``."""

    def __init__(self, root: str | os.PathLike[str], model: FBFT) -> None:
        identity = {**model.teacher.describe(), "precision": model.config.precision}
        identity["cache_version"] = CACHE_VERSION
        text = json.dumps(identity, sort_keys=True)
        self.teacher_id = hashlib.sha256(text.encode()).hexdigest()[:20]
        self.dir = Path(root).expanduser().resolve() / self.teacher_id
        (self.dir / "locks").mkdir(parents=True, exist_ok=True)
        description = self.dir / "teacher.json"
        if not description.exists():
            _atomic_write_bytes(description, (text + "\n").encode())

    def entry(self, key: str) -> Path:
        return self.dir / key[:2] / f"{key}.npz"

    def load(self, key: str) -> tuple[np.ndarray, np.ndarray, float] | None:
        """(f_j, f_k, teacher ms) of a cached image, or None."""
        path = self.entry(key)
        if not path.exists():
            return None
        with np.load(path) as data:
            tokens = data["tokens"]
            return tokens[0], tokens[1], float(data["teacher_ms"])

    def store(self, key: str, f_j: np.ndarray, f_k: np.ndarray, teacher_ms: float) -> None:
        path = self.entry(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.stem}.{_unique()}.tmp.npz")
        np.savez(tmp, tokens=np.stack([f_j, f_k]), teacher_ms=np.float64(teacher_ms))
        os.replace(tmp, path)

    @contextlib.contextmanager
    def locked(self, keys: Sequence[str]) -> Iterator[None]:
        """Hold the lock stripes of ``keys`` (taken in a fixed order: no deadlock)."""
        stripes = sorted({int(k[:2], 16) % LOCK_STRIPES for k in keys})
        handles = []
        try:
            for stripe in stripes:
                handle = open(self.dir / "locks" / f"{stripe:03d}.lock", "a+b")  # noqa: SIM115
                fcntl.flock(handle, fcntl.LOCK_EX)
                handles.append(handle)
            yield
        finally:
            for handle in reversed(handles):
                fcntl.flock(handle, fcntl.LOCK_UN)
                handle.close()


def teacher_tokens(
    model: FBFT,
    paths: Sequence[str],
    load_image,
    cache: FeatureCache | None,
    stats: CacheStats,
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Tokens of every image file, from the cache where present, else one teacher pass each.

    ``load_image(i)`` decodes image ``i`` (only called on a cache miss).
    """
    out: list[tuple[np.ndarray, np.ndarray]] = []
    step = model.config.batch_size
    for start in range(0, len(paths), step):
        idx = list(range(start, min(start + step, len(paths))))
        if cache is None:
            out += _compute(model, [load_image(i) for i in idx], stats)[0]
            continue
        keys = [content_hash(paths[i]) for i in idx]
        with cache.locked(keys):
            found = {i: cache.load(k) for i, k in zip(idx, keys, strict=True)}
            missing = [i for i in idx if found[i] is None]
            if missing:
                computed, per_image_ms = _compute(model, [load_image(i) for i in missing], stats)
                for i, (f_j, f_k) in zip(missing, computed, strict=True):
                    cache.store(keys[i - start], f_j, f_k, per_image_ms)
                    found[i] = (f_j, f_k, per_image_ms)
        for i in idx:
            f_j, f_k, ms = found[i]
            out.append((f_j, f_k))
            if i not in missing:
                stats.reused += 1
                stats.teacher_ms.append(ms)
    return out


def _compute(
    model: FBFT, images: list[np.ndarray], stats: CacheStats
) -> tuple[list[tuple[np.ndarray, np.ndarray]], float]:
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    start = time.perf_counter()
    tokens = [(a.numpy(), b.numpy()) for a, b in model.teacher_tokens(images)]
    per_image_ms = 1000 * (time.perf_counter() - start) / max(1, len(images))
    stats.passes += len(images)
    stats.teacher_ms += [per_image_ms] * len(images)
    return tokens, per_image_ms


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{_unique()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _unique() -> str:
    """A temporary-file tag unique across the hosts sharing a cache (NFS) and their processes."""
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
