"""`fbft cache info|prune` on a real cache folder; `import fbft.cli` stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

from fbft.cache.admin import info
from fbft.cache.features import FeatureCache
from fbft.cli import main

IDENTITY = {"backbone": "vit_cli", "weights": "w", "image_size": 28, "layers": [1, 2]}


def _fill(root: Path, n: int) -> FeatureCache:
    cache = FeatureCache(root / "features", IDENTITY, dtype="float16")
    for i in range(n):
        cache.store(f"{i:02x}" * 32, np.zeros((4, 3)), np.ones((4, 3)), 1.0)
    return cache


def test_info_lists_teacher_entries_and_free_disk(tmp_path: Path, capsys) -> None:
    cache = _fill(tmp_path, 3)
    assert main(["cache", "info", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert cache.teacher_id in out and "vit_cli 28px" in out and "float16: 3 entries" in out
    assert "free disk" in out


def test_prune_all_and_max_gb(tmp_path: Path, capsys) -> None:
    _fill(tmp_path, 3)
    assert main(["cache", "prune", "--cache-dir", str(tmp_path), "--max-gb", "1"]) == 0
    assert info(tmp_path / "features")["entries"] == 3
    assert main(["cache", "prune", "--cache-dir", str(tmp_path), "--max-gb", "0"]) == 0
    assert "removed 3 entries" in capsys.readouterr().out
    _fill(tmp_path, 2)
    assert main(["cache", "prune", "--cache-dir", str(tmp_path), "--all"]) == 0
    assert info(tmp_path / "features")["entries"] == 0


def test_prune_of_a_missing_cache_says_so(tmp_path: Path, capsys) -> None:
    assert main(["cache", "prune", "--cache-dir", str(tmp_path / "none"), "--all"]) == 0
    assert "no cache at" in capsys.readouterr().out


def test_importing_the_cli_does_not_import_torch() -> None:
    code = "import sys, fbft.cli; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"
