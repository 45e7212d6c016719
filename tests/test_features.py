"""Teacher-token cache on real files: hits, memmaps, dtypes, healing, eviction, concurrency."""

from __future__ import annotations

import fcntl
import gc
import json
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from fbft.cache import features
from fbft.cache.admin import info, prune
from fbft.cache.features import CacheReport, FeatureCache, teacher_tokens

N, D = 6, 5
IDENTITY = {"backbone": "vit_test", "weights": "w1", "image_size": 28, "layers": [1, 2]}


@dataclass
class Sample:
    """An image file whose pixels are decoded lazily (counted, to prove hits never decode)."""

    path: str
    value: int
    decodes: list[int]

    @property
    def image(self) -> np.ndarray:
        self.decodes.append(self.value)
        return np.full((4, 4, 3), self.value, np.uint8)


class Teacher:
    """Test double of the teacher: deterministic tokens from the pixels; counts images seen."""

    def __init__(self) -> None:
        self.seen = 0
        self.lock = threading.Lock()

    def __call__(self, images: list[np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
        with self.lock:
            self.seen += len(images)
        time.sleep(0.01)
        return [expected(int(im[0, 0, 0])) for im in images]


def expected(value: int) -> tuple[np.ndarray, np.ndarray]:
    base = np.arange(N * D, dtype=np.float32).reshape(N, D) / 7
    return base + value, base - value


def make_samples(folder: Path, values: list[int]) -> list[Sample]:
    decodes: list[int] = []
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for v in values:
        path = folder / f"img{v}.png"
        path.write_bytes(f"image-{v}".encode())
        out.append(Sample(str(path), v, decodes))
    return out


def check(tokens: list[tuple[np.ndarray, np.ndarray]], values: list[int], atol: float = 0) -> None:
    for (f_j, f_k), v in zip(tokens, values, strict=True):
        want_j, want_k = expected(v)
        np.testing.assert_allclose(f_j, want_j, atol=atol)
        np.testing.assert_allclose(f_k, want_k, atol=atol)


@pytest.fixture(autouse=True)
def fresh_process_state() -> None:
    """Each test starts like a new process: no entry verified yet."""
    features._verified.clear()


def test_miss_then_hit_returns_read_only_memmaps_without_decoding(tmp_path: Path) -> None:
    samples = make_samples(tmp_path / "img", [1, 2, 3, 2])
    cache, teacher = FeatureCache(tmp_path / "c", IDENTITY), Teacher()
    tokens, first = teacher_tokens(samples, teacher, cache, batch_size=3)
    check(tokens, [1, 2, 3, 2])
    assert (first.passes, first.reused, teacher.seen) == (3, 1, 3)
    samples[0].decodes.clear()
    tokens, second = teacher_tokens(samples, teacher, cache, batch_size=3)
    check(tokens, [1, 2, 3, 2])
    assert (second.passes, second.reused, teacher.seen, samples[0].decodes) == (0, 4, 3, [])
    assert all(isinstance(t.base, np.memmap) and not t.flags.writeable for t, _ in tokens)
    assert len(second.teacher_ms) == 4


def test_without_cache_gives_float32_arrays_in_memory(tmp_path: Path) -> None:
    samples = make_samples(tmp_path, [4, 5])
    tokens, report = teacher_tokens(samples, Teacher(), None, batch_size=1)
    check(tokens, [4, 5])
    assert report.passes == 2 and all(type(t) is np.ndarray for pair in tokens for t in pair)
    assert all(t.dtype == np.float32 for pair in tokens for t in pair)


def test_float16_entries_are_half_the_size_and_come_back_as_float16(tmp_path: Path) -> None:
    samples = make_samples(tmp_path / "img", [7])
    sizes = {}
    for dtype in ("float32", "float16"):
        cache = FeatureCache(tmp_path / "c", IDENTITY, dtype=dtype)
        teacher_tokens(samples, Teacher(), cache, 1)
        tokens, report = teacher_tokens(samples, Teacher(), cache, 1)
        assert report.reused == 1 and tokens[0][0].dtype == np.dtype(dtype)
        check(tokens, [7], atol=0.02)
        sizes[dtype] = cache.paths(features.content_hash(samples[0].path))[0].stat().st_size
    assert sizes["float16"] - 128 == (sizes["float32"] - 128) // 2  # 128 = .npy header
    with pytest.raises(ValueError, match="float16"):
        FeatureCache(tmp_path / "c", IDENTITY, dtype="int8")


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size - 7)


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (_truncate, r"bytes, expected \d+ \(truncated"),
        (_empty, "unreadable .npy header"),
        (_flip, "checksum mismatch"),
    ],
)
def test_corrupt_entry_is_named_deleted_and_recomputed(tmp_path: Path, damage, reason) -> None:
    samples = make_samples(tmp_path / "img", [1, 2])
    cache, teacher = FeatureCache(tmp_path / "c", IDENTITY), Teacher()
    teacher_tokens(samples, teacher, cache, 2)
    npy = cache.paths(features.content_hash(samples[1].path))[0]
    damage(npy)
    features._verified.clear()  # as a new process would
    with pytest.warns(UserWarning, match=f"{re.escape(str(npy))}: .*{reason}"):
        tokens, report = teacher_tokens(samples, teacher, cache, 2)
    check(tokens, [1, 2])
    assert (report.recomputed_corrupt, report.passes, report.reused, teacher.seen) == (1, 1, 1, 3)
    _, report = teacher_tokens(samples, teacher, cache, 2)
    assert (report.reused, report.recomputed_corrupt) == (2, 0)


@pytest.mark.parametrize("text", ["{not json", '{"shape": [2, 6, 5]}', "[]"])
def test_unreadable_sidecar_is_corruption_too(tmp_path: Path, text: str) -> None:
    samples = make_samples(tmp_path / "img", [1])
    cache = FeatureCache(tmp_path / "c", IDENTITY)
    teacher_tokens(samples, Teacher(), cache, 1)
    side = cache.paths(features.content_hash(samples[0].path))[1]
    side.write_text(text)
    with pytest.warns(UserWarning, match="unreadable sidecar"):
        tokens, report = teacher_tokens(samples, Teacher(), cache, 1)
    check(tokens, [1])
    assert report.recomputed_corrupt == 1


def test_data_without_sidecar_is_an_unfinished_write_and_a_miss(tmp_path: Path) -> None:
    samples = make_samples(tmp_path / "img", [1])
    cache = FeatureCache(tmp_path / "c", IDENTITY)
    teacher_tokens(samples, Teacher(), cache, 1)
    cache.paths(features.content_hash(samples[0].path))[1].unlink()
    tokens, report = teacher_tokens(samples, Teacher(), cache, 1)
    check(tokens, [1])
    assert (report.passes, report.recomputed_corrupt) == (1, 0)


def test_lru_eviction_skips_entries_being_read(tmp_path: Path) -> None:
    samples = make_samples(tmp_path / "img", [1, 2, 3])
    entry_gb = (128 + 2 * N * D * 4 + 200) / 1e9
    cache = FeatureCache(tmp_path / "c", IDENTITY, max_gb=2.2 * entry_gb)
    held, report = teacher_tokens(samples, Teacher(), cache, 1)
    assert report.evicted == 0 and info(cache.root)["entries"] == 3  # all three are in use
    del held
    gc.collect()
    sides = [cache.paths(features.content_hash(s.path))[1] for s in samples]
    for age, side in zip([30, 10, 20], sides, strict=True):
        os.utime(side, (time.time() - age, time.time() - age))
    result = prune(cache.root, max_gb=2.2 * entry_gb)
    assert (result.removed, result.busy) == (1, 0)
    assert [s.exists() for s in sides] == [False, True, True]  # least recently used went
    _, report = teacher_tokens(samples[1:], Teacher(), cache, 2)
    assert report.reused == 2  # a read touches the entry: now the most recently used


def test_prune_by_age_teacher_and_all(tmp_path: Path) -> None:
    samples = make_samples(tmp_path / "img", [1, 2])
    a = FeatureCache(tmp_path / "c", IDENTITY)
    b = FeatureCache(tmp_path / "c", {**IDENTITY, "backbone": "other"})
    for cache in (a, b):
        teacher_tokens(samples, Teacher(), cache, 2)
    old = a.paths(features.content_hash(samples[0].path))[1]
    os.utime(old, (time.time() - 5 * 86400,) * 2)
    assert prune(tmp_path / "c", older_than_days=3).removed == 1 and not old.exists()
    kept, _ = teacher_tokens(samples[1:], Teacher(), b, 1)
    result = prune(tmp_path / "c", teacher="other", everything=True)
    assert (result.removed, result.busy) == (1, 1)  # the entry held by `kept` is busy
    del kept
    gc.collect()
    assert prune(tmp_path / "c", everything=True).removed == 2
    assert info(tmp_path / "c")["entries"] == 0


def test_old_version_entries_are_never_read_and_pruned(tmp_path: Path) -> None:
    root = tmp_path / "c"
    old = root / "0123456789abcdef0123"
    (old / "ab").mkdir(parents=True)
    (old / "teacher.json").write_text(json.dumps({**IDENTITY, "cache_version": 1}))
    np.savez(old / "ab" / "abcd.npz", tokens=np.zeros((2, N, D)), teacher_ms=np.float64(1))
    cache = FeatureCache(root, IDENTITY)
    assert cache.dir != old
    summary = info(root)
    assert [t["current"] for t in summary["teachers"] if t["id"] == old.name] == [False]
    assert summary["free_bytes"] > 0 and summary["bytes"] > 0
    prune(root)
    assert not old.exists() and cache.dir.exists()


def test_parallel_callers_wait_for_one_teacher_pass(tmp_path: Path) -> None:
    samples = make_samples(tmp_path / "img", list(range(8)))
    teacher, results = Teacher(), []

    def trial() -> None:
        cache = FeatureCache(tmp_path / "c", IDENTITY)
        results.append(teacher_tokens(samples, teacher, cache, 3))

    threads = [threading.Thread(target=trial) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert teacher.seen == 8
    total = sum(report for _, report in results)
    assert (total.passes, total.reused, len(total.teacher_ms)) == (8, 24, 32)
    for tokens, _ in results:
        check(tokens, list(range(8)))


def test_reports_add_up() -> None:
    a = CacheReport(passes=1, teacher_ms=[2.0], evicted=1)
    b = CacheReport(reused=3, teacher_ms=[1.0], recomputed_corrupt=1)
    assert a + b == CacheReport(1, 3, [2.0, 1.0], 1, 1, 0.0)
    assert sum([a, b]) == a + b


def test_prune_sweeps_temporary_files_of_dead_writers_whatever_their_age(tmp_path: Path) -> None:
    cache = FeatureCache(tmp_path / "c", IDENTITY)
    folder = cache.dir / "entries" / "ab"
    folder.mkdir(parents=True)
    dead, live = folder / ".abab.host-1-x.tmp.npy", folder / ".abab.host-2-y.tmp.npy"
    for path in (dead, live):
        path.write_bytes(b"partial")
    with live.open("rb") as writer:  # a writer holds a shared lock on its file while it writes
        fcntl.flock(writer, fcntl.LOCK_SH)
        assert prune(tmp_path / "c").freed_bytes == 7
        assert (dead.exists(), live.exists()) == (False, True)
    assert prune(tmp_path / "c", everything=True).freed_bytes == 7 and not live.exists()
