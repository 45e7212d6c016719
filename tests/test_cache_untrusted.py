"""The teacher-token cache treats what it finds as untrusted: links, FIFOs and folders planted in
a shared cache folder are refused (named, recomputed), never followed, never block; a read-only
cache serves its hits; a full disk is a named error that leaves no temporary file."""

from __future__ import annotations

import errno
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path

import pytest
from test_features import IDENTITY, Teacher, check, make_samples

from fbft.cache import features, files
from fbft.cache.admin import info, prune
from fbft.cache.features import CacheFullError, FeatureCache, teacher_tokens

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def fresh_process_state() -> None:
    features._verified.clear()


def _filled(tmp_path: Path, values: list[int]) -> tuple[FeatureCache, list, Teacher]:
    samples = make_samples(tmp_path / "img", values)
    cache, teacher = FeatureCache(tmp_path / "c", IDENTITY), Teacher()
    teacher_tokens(samples, teacher, cache, batch_size=len(values))
    features._verified.clear()
    return cache, samples, teacher


def _paths(cache: FeatureCache, sample) -> tuple[Path, Path]:
    return cache.paths(features.content_hash(sample.path))


def _tree(folder: Path) -> dict[str, tuple[int, bytes]]:
    """Every file under ``folder`` with its mtime and bytes: proof that nothing changed there."""
    return {
        str(p): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _run_guarded(call) -> object:
    """Run ``call`` in a thread; a blocked reader (the FIFO defect) fails instead of hanging."""
    out: list = []
    worker = threading.Thread(target=lambda: out.append(call()), daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "the cache blocked on a planted file"
    return out[0]


@pytest.mark.parametrize("which", [0, 1], ids=["entry", "sidecar"])
@pytest.mark.parametrize("plant", ["symlink", "fifo", "folder"])
def test_planted_non_regular_files_are_named_replaced_and_recomputed(tmp_path, which, plant):
    cache, samples, _ = _filled(tmp_path, [1, 2])
    outside = tmp_path / "outside"
    outside.mkdir()
    target = outside / "secret"
    target.write_bytes(b"do not touch")
    os.utime(target, ns=(1, 1))
    before = _tree(outside)
    victim = _paths(cache, samples[1])[which]
    victim.unlink()
    if plant == "symlink":
        victim.symlink_to(target)
    elif plant == "fifo":
        os.mkfifo(victim)
    else:
        victim.mkdir()
        (victim / "x").write_bytes(b"x")
    teacher = Teacher()
    with pytest.warns(UserWarning, match=f"{victim.name}.*{files.describe(victim)}"):
        tokens, report = _run_guarded(lambda: teacher_tokens(samples, teacher, cache, 2))
    check(tokens, [1, 2])
    assert (report.passes, report.reused, report.recomputed_corrupt) == (1, 1, 1)
    assert stat.S_ISREG(victim.lstat().st_mode) and _tree(outside) == before
    features._verified.clear()
    assert teacher_tokens(samples, teacher, cache, 2)[1].reused == 2  # healed


def test_a_linked_entry_folder_is_never_read_nor_written_through(tmp_path):
    cache, samples, _ = _filled(tmp_path, [1])
    npy, _ = _paths(cache, samples[0])
    outside = tmp_path / "outside"
    shutil.copytree(npy.parent, outside)  # a complete, valid-looking entry out of the cache
    shutil.rmtree(npy.parent)
    npy.parent.symlink_to(outside, target_is_directory=True)
    before = _tree(outside)
    with pytest.warns(UserWarning, match=f"{npy.parent.name} is a symbolic link"):
        tokens, report = teacher_tokens(samples, Teacher(), cache, 1)
    check(tokens, [1])
    assert report.passes == 1 and _tree(outside) == before
    assert npy.parent.is_dir() and not npy.parent.is_symlink() and npy.exists()


@pytest.mark.parametrize("plant", ["dangling", "existing", "fifo"])
def test_lock_files_are_created_without_following_links(tmp_path, plant):
    samples = make_samples(tmp_path / "img", [1])
    cache = FeatureCache(tmp_path / "c", IDENTITY)
    key = features.content_hash(samples[0].path)
    lock = cache.dir / "locks" / f"{int(key[:2], 16) % features.LOCK_STRIPES:03d}.lock"
    elsewhere = tmp_path / "elsewhere"
    if plant == "fifo":
        os.mkfifo(lock)
    else:
        if plant == "existing":
            elsewhere.write_bytes(b"keep")
        lock.symlink_to(elsewhere)
    with pytest.warns(UserWarning, match=f"lock {lock}"):
        tokens, _ = _run_guarded(lambda: teacher_tokens(samples, Teacher(), cache, 1))
    check(tokens, [1])
    assert stat.S_ISREG(lock.lstat().st_mode)
    assert (elsewhere.read_bytes() == b"keep") if plant == "existing" else not elsewhere.exists()


def test_prune_never_follows_links_out_of_the_cache(tmp_path):
    cache = _filled(tmp_path, [1, 2])[0]
    outside = tmp_path / "outside"
    (outside / "entries" / "cd").mkdir(parents=True)
    for name in ("k.json", "k.npy", ".k.x.tmp.npy"):
        (outside / "entries" / "cd" / name).write_bytes(b"mine")
    (outside / "teacher.json").write_text('{"cache_version": 0}')
    before = _tree(outside)
    (cache.dir / "entries" / "cd").symlink_to(outside / "entries" / "cd")
    (cache.root / "linked_teacher").symlink_to(outside)
    (cache.dir / "entries" / "ab").mkdir(exist_ok=True)
    os.mkfifo(cache.dir / "entries" / "ab" / ".x.tmp.npy")
    assert info(cache.root)["entries"] == 2
    result = prune(cache.root, everything=True)
    assert result.removed == 2 and _tree(outside) == before
    assert not (cache.dir / "entries" / "cd").is_symlink()
    assert not (cache.root / "linked_teacher").is_symlink()
    assert not (cache.dir / "entries" / "ab" / ".x.tmp.npy").exists()


def test_free_space_is_measured_where_a_new_cache_folder_will_be(tmp_path):
    new = tmp_path / "not" / "yet" / "there"
    assert (
        files.free_bytes(new) == shutil.disk_usage(tmp_path).free
        or abs(files.free_bytes(new) - shutil.disk_usage(tmp_path).free) < 1 << 20
    )  # the same filesystem (a little may be written meanwhile)


def test_enospc_is_not_retried_by_a_trial():
    from fbft.study.trial import _infrastructure

    assert not _infrastructure(CacheFullError("full"))
    assert not _infrastructure(OSError(errno.ENOSPC, "No space left on device"))
    assert _infrastructure(OSError(errno.EIO, "I/O error"))


def _subprocess(script: str, *, as_nobody: bool = False, namespace: bool = False):
    """Run ``script`` with this interpreter, in a private mount namespace (where it may mount a
    small tmpfs) or as the user nobody (it drops to nobody after its imports, since this
    interpreter may live where nobody cannot read)."""
    if as_nobody:
        script = textwrap.dedent(script).replace(
            "# DROP\n", "os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        )
    command = [sys.executable, "-c", textwrap.dedent(script)]
    if namespace:
        command = ["unshare", "--mount", "--propagation", "private", *command]
    env = {**os.environ, "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=300, cwd="/")


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to the user nobody")
def test_a_read_only_cache_serves_hits_without_locks_and_says_once_it_stores_nothing():
    shared = Path(tempfile.mkdtemp(prefix="fbft-ro-", dir="/tmp"))
    try:
        shared.chmod(0o755)
        cache = _filled(shared, [1, 2])[0]
        shutil.rmtree(cache.dir / "locks")  # no lock file to borrow: reading must not need one
        for path in [shared, *shared.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        before = _tree(shared / "c")
        result = _subprocess(
            f"""
            import mmap, os, warnings  # mmap: imported lazily by numpy
            import numpy.testing
            from pathlib import Path
            from test_features import IDENTITY, Teacher, check, Sample
            from fbft.cache.features import FeatureCache, teacher_tokens
            # DROP
            root = Path({str(shared)!r})
            try:
                (root / "c" / "probe").write_bytes(b"")
            except PermissionError:
                pass
            else:
                raise SystemExit(77)  # permissions are not enforced here
            samples = [Sample(str(root / "img" / f"img{{v}}.png"), v, []) for v in (1, 2)]
            new = Sample(str(root / "img" / "img1.png"), 1, [])
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                cache = FeatureCache(root / "c", IDENTITY)
                FeatureCache(root / "c", IDENTITY)
                tokens, report = teacher_tokens(samples, Teacher(), cache, 2)
            check(tokens, [1, 2])
            assert (report.passes, report.reused) == (0, 2), report
            said = [str(w.message) for w in seen]
            assert len(said) == 1 and "read-only" in said[0] and "not stored" in said[0], said
            teacher = Teacher()
            fresh = type(cache)(root / "c", {{**IDENTITY, "backbone": "other"}})
            tokens, report = teacher_tokens(samples, teacher, fresh, 2)
            check(tokens, [1, 2])
            assert report.passes == 2 and fresh.read_only
            print("ok")
            """,
            as_nobody=True,
        )
        if result.returncode == 77:
            pytest.skip("file permissions are not enforced for the user nobody here")
        assert result.returncode == 0 and "ok" in result.stdout, result.stderr
        assert _tree(shared / "c") == before
    finally:
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="needs root and unshare to mount a small filesystem",
)
def test_a_full_disk_is_a_named_error_that_leaves_no_temporary_file(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    result = _subprocess(
        f"""
        import subprocess, sys
        from pathlib import Path
        import numpy as np
        from fbft.cache import files
        from fbft.cache.features import CacheFullError, FeatureCache
        mount = Path({str(mount)!r})
        small = ["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)]
        if subprocess.run(small).returncode:
            raise SystemExit(77)
        free = files.free_bytes(mount / "new" / "cache")
        assert 0 < free <= 256 * 1024, free
        cache = FeatureCache(mount / "new" / "cache", {{"backbone": "b"}})
        big = np.ones((400, 100), np.float32)  # 2 x 160 kB: does not fit
        try:
            cache.store("ab" + "0" * 62, big, big, 1.0)
        except CacheFullError as error:
            message = str(error)
        else:
            raise AssertionError("no error")
        assert "no space left" in message and str(cache.dir / "entries" / "ab") in message
        assert "0.3 MB" in message, message
        leftovers = [p for p in mount.rglob("*") if ".tmp" in p.name]
        assert not leftovers, leftovers
        print("ok")
        """,
        namespace=True,
    )
    if result.returncode == 77 or "unshare" in result.stderr[:200]:
        pytest.skip(f"cannot mount a small tmpfs here: {result.stderr.strip()[:200]}")
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr
