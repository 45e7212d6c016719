"""Pre-flight: inputs that would fail every trial, or one trial after a full fit, stop the study
before Ray starts (this module never starts Ray: each case asserts it is still down)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image
from test_cache_untrusted import _subprocess
from test_study import load_study
from tiny import tiny_flags

from fbft.data.synthetic import generate
from fbft.study import preflight, tracking
from fbft.study.options import parse


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preflight")
    generate(root / "data", categories=["gravel"], image_size=80, n_train=3, n_test=4)
    return root / "data"


def _main(tmp_path: Path, data: Path, *flags: str) -> int:
    from fbft.study import main

    argv = ["--data", str(data), "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--storage", str(tmp_path / "ray_results"), "--cache-dir", str(tmp_path / "cache"),
            *tiny_flags(), "--shots", "full", *flags]  # fmt: skip
    code = main(load_study("few_shot"), argv)
    assert not ray.is_initialized()
    return code


def _copy(data: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(data, tmp_path / "data"))


def test_a_weights_file_that_does_not_load_stops_the_study_before_ray(tmp_path, data, capsys):
    bad = tmp_path / "teacher.pth"
    bad.write_bytes(b"\x80\x04 not a checkpoint")
    assert _main(tmp_path, data, "--weights", str(bad)) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "could not be loaded" in err and err.count("\n") == 1


@pytest.mark.parametrize("split", ["train", "test"])
def test_an_empty_category_split_stops_the_study(tmp_path, data, split, capsys):
    copy = _copy(data, tmp_path)
    for image in (copy / "gravel" / split).rglob("*.png"):
        image.unlink()
    assert _main(tmp_path, copy) == 2
    assert f"category 'gravel' has no {split} images" in capsys.readouterr().err


def test_a_mask_of_the_wrong_size_stops_the_study(tmp_path, data, capsys):
    copy = _copy(data, tmp_path)
    mask = sorted((copy / "gravel" / "ground_truth").rglob("*.png"))[0]
    Image.fromarray(np.zeros((40, 80), np.uint8)).save(mask)
    assert _main(tmp_path, copy) == 2
    err = capsys.readouterr().err
    assert str(mask) in err and "80x40" in err and "size of their image" in err


def test_a_cache_folder_that_cannot_exist_stops_the_study(tmp_path, data, capsys):
    (tmp_path / "cache").write_text("a file where the cache folder belongs")
    assert _main(tmp_path, data) == 2
    err = capsys.readouterr().err
    assert "--cache-dir" in err and "--no-cache" in err


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop to the user nobody")
def test_a_read_only_cache_folder_is_announced(tmp_path):
    shared = tmp_path / "shared"
    (shared / "features").mkdir(parents=True)
    for path in (tmp_path, shared, shared / "features"):
        path.chmod(0o755)
    result = _subprocess(
        f"""
        import os
        from pathlib import Path
        from fbft.study import preflight
        from fbft.study.options import parse
        from test_study import load_study
        options = parse(load_study("few_shot"), [])
        # DROP
        root = Path({str(shared)!r})
        assert preflight.cache(root, options) is False
        """,
        as_nobody=True,
    )
    assert result.returncode == 0, result.stderr
    assert f"{shared / 'features'} is read-only" in result.stdout
    assert "new ones are not stored" in result.stdout
    assert list((shared / "features").iterdir()) == []
    options = parse(load_study("few_shot"), [])
    assert preflight.cache(shared, options) is True  # root may write: no announcement


def test_a_busy_sqlite_store_is_waited_for_with_a_message(tmp_path, capsys):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)  # the schema
    holder = sqlite3.connect(tmp_path / "mlflow.db", check_same_thread=False)
    holder.execute("BEGIN IMMEDIATE")  # another process's write transaction
    holder.execute("CREATE TABLE busy (x)")
    release = threading.Timer(3.0, holder.commit)
    release.start()
    try:
        client = tracking.prepare_store(uri)
    finally:
        release.join()
        holder.close()
    out = capsys.readouterr().out
    assert "waiting for the MLflow store" in out and "holds its write lock" in out
    assert "is free after" in out
    assert client.search_experiments()  # a usable store


def test_a_store_busy_past_the_limit_is_a_clear_error(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracking.prepare_store(uri)
    holder = sqlite3.connect(tmp_path / "mlflow.db")
    holder.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(tracking.TrackingError, match=r"still busy after .* FBFT_STORE_WAIT"):
            tracking.wait_while_busy(uri, limit=1.5)
    finally:
        holder.rollback()
        holder.close()
