"""Every benchmark runs in its --quick form and writes its JSON record."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.mark.parametrize(
    ("name", "keys"),
    [
        ("metrics", {"np_sort_s", "exact_s", "official_s", "peak_extra_rss_MB"}),
        ("inference", {"teacher_ms", "students_ms", "maps_ms", "end_to_end_ms", "MFU_%"}),
        ("training", {"students_tokens_per_s", "speedup", "teacher_passes_cached"}),
        ("study", {"teacher_passes", "wall_s", "passes_per_distinct_image"}),
        ("main_job", {"stage", "where", "seconds"}),
        ("scale", {"fit_peak_rss_gb", "predict_peak_rss_gb", "tier", "epoch_s"}),
    ],
)
def test_quick_benchmark_writes_results(tmp_path, name, keys):
    out = tmp_path / f"{name}.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / f"{name}.py"), "--quick", "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    record = json.loads(out.read_text())
    assert record["quick"] and record["machine"]["cores"] >= 1
    assert keys <= set(record["rows"][0])
    if name == "study":  # the cache: one teacher pass per distinct image, none repeated
        with_cache, without = record["rows"]
        assert with_cache["passes_per_distinct_image"] == 1.0
        assert without["teacher_passes"] > with_cache["teacher_passes"]
    if name == "training":
        row = record["rows"][0]
        assert row["teacher_passes_per_epoch"] > row["teacher_passes_cached"]


def test_device_check_quick_runs_every_step(tmp_path):
    """The GPU device check in its CPU form: every step done or named as skipped, and every
    CPU-vs-CPU self-check exact (a comparison that passes here compares equal results)."""
    out = tmp_path / "device_check.json"
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / "device_check.py"), "--device", "cpu", "--quick",
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "device: device=cpu" in result.stdout  # printed first, before any step
    record = json.loads(out.read_text())
    assert record["quick"] and record["device"]["device"] == "cpu"
    assert list(record["steps"]) == ["correctness", "paper", "study", "bank"]
    for name, step in record["steps"].items():
        assert step["status"] == "done" or step["status"].startswith("skipped"), (name, step)
        for check in step["checks"]:
            assert check["status"] == "done" or check["status"].startswith("skipped"), check
            if check["status"] == "done" and "ok" in check:
                assert check["ok"], check
    assert len(record["rows"]) == sum(len(s["checks"]) for s in record["steps"].values())
