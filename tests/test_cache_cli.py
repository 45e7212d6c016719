"""`fbft cache info|prune` on a real cache folder; `import fbft.cli` stays light."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fbft.cache.admin import info
from fbft.cache.common import human_bytes
from fbft.cache.features import FeatureCache
from fbft.cli import main
from fbft.data.synthetic import generate

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


@pytest.mark.parametrize(
    ("n", "shown"),
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (3_100_000, "3.1 MB"), (999_600, "1.0 MB"),
     (142_000, "142 kB"), (12_300_000_000, "12.3 GB"), (4_500_000_000_000, "4500 GB")],
)  # fmt: skip
def test_sizes_read_in_human_units(n: int, shown: str) -> None:
    assert human_bytes(n) == shown


def _tree_bytes(root: Path) -> int:
    """Bytes of the regular files under ``root``, links not followed (the oracle)."""
    return sum(
        (Path(d) / f).lstat().st_size
        for d, _, names in os.walk(root)
        for f in names
        if (Path(d) / f).is_file() and not (Path(d) / f).is_symlink()
    )


def test_info_counts_the_synthetic_set_under_the_cache_root(tmp_path: Path, capsys) -> None:
    _fill(tmp_path, 2)
    # the layout a study leaves (fbft/study/plan.py): each category generated under .categories/
    # and then named by a link; a category still being made has no link yet
    made = tmp_path / "synthetic" / "v1-seed0"
    part = generate(made / ".categories" / "gravel", categories=["gravel"], image_size=64,
                    n_train=2, n_test=2)  # fmt: skip
    (made / "gravel").symlink_to(part / "gravel", target_is_directory=True)
    (made / ".categories" / "parts").mkdir()
    assert main(["cache", "info", "--cache-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    size = _tree_bytes(made)
    assert 10_000 < size < 1_000_000  # kB: the units must not read "0.00 GB"
    assert f"synthetic/v1-seed0  generated data: gravel; {human_bytes(size)}" in out
    assert f"synthetic data {human_bytes(size)}" in out
    features = _tree_bytes(tmp_path / "features")
    assert f"total 2 entries, {human_bytes(features)}" in out and "0.00 GB" not in out
