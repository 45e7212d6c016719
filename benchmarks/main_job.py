"""The README's main job end to end, with a stage profile and the floor it is compared with.

Runs ``python studies/few_shot.py --shots 5 10 50`` as a new user does: a fresh working folder
and an empty HOME (so the synthetic set is generated and the cache is empty). The stages come
from the MLflow runs the study leaves: the parent's phases (store, data generation, Ray start,
checks, trials, summary) and each trial's stages summed over trials (teacher passes, training,
evaluation, metrics, figures, MLflow logging). The floor: the teacher's cost per image from one
batch timed here, and the students' arithmetic at this machine's single-thread GEMM rate.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import machine, parser, save, table
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--backbone", "vit_small_patch14_reg4_dinov2", "--weights", "random",
        "--backbone-kwargs", json.dumps({"depth": 4, "embed_dim": 48, "num_heads": 2}),
        "--image-size", "56", "--layers", "2,4", "--epochs", "2",
        "--categories", "gravel"]  # fmt: skip
TRIAL_STAGES = {
    "teacher (cache misses)": None,  # passes × teacher_ms
    "training": "time/fit_seconds",
    "evaluation (predict + metrics)": "time/evaluate_seconds",
    "  of which metrics": "time/metrics_seconds",
    "figures": "time/figures_seconds",
    "MLflow logging": "time/logging_seconds",
}


def gemm_rate(dim: int) -> float:
    """Single-thread float32 GFLOP/s of the students' matrix shape (4096 tokens × dim²)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    a, w = torch.randn(4096, dim), torch.randn(dim, dim)
    for _ in range(3):
        a @ w
    start, n = time.perf_counter(), 30
    for _ in range(n):
        a @ w
    rate = 2 * 4096 * dim * dim * n / (time.perf_counter() - start) / 1e9
    torch.set_num_threads(threads)
    return rate


def main() -> None:
    args = parser(__doc__.splitlines()[0]).parse_args()
    flags = TINY if args.quick else []
    with tempfile.TemporaryDirectory(prefix="fbft-main-job-") as tmp:
        work = Path(tmp)
        env = {**os.environ, "HOME": str(work / "home")}
        env.pop("FBFT_CACHE_DIR", None)
        env.pop("XDG_CACHE_HOME", None)
        argv = [sys.executable, str(ROOT / "studies" / "few_shot.py"), "--shots", "5", "10", "50",
                *flags]  # fmt: skip
        if args.quick:
            argv[argv.index("50")] = "3"
            argv[argv.index("10")] = "2"
            argv[argv.index("5")] = "1"
        start = time.perf_counter()
        done = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"main job failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
        runs = client.search_runs([client.get_experiment_by_name("fbft-few-shot").experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags).data.metrics
    children = [r.data.metrics for r in runs if "mlflow.parentRunId" in r.data.tags]
    rows = [{"stage": k[5:-8].replace("_", " "), "seconds": v, "where": "driver"}
            for k, v in parent.items() if k.startswith("time/") and k.endswith("_seconds")
            and k != "time/wall_seconds"]  # fmt: skip
    for name, key in TRIAL_STAGES.items():
        if key is None:
            value = sum(c["cache/teacher_passes"] * c["time/teacher_ms"] / 1000 for c in children)
        else:
            value = sum(c.get(key, 0.0) for c in children)
        rows.append({"stage": name, "seconds": value, "where": "trials (sum)"})
    rows.append({"stage": "end to end", "seconds": wall, "where": "wall clock"})
    table_lines = [line for line in done.stdout.splitlines() if line.startswith("|")]
    print(f"{machine()['cpu']}: main job {wall:.0f} s end to end, {len(children)} trials")
    print(table(rows, ["stage", "where", "seconds"]))
    print("\n".join(table_lines))
    dim = 48 if args.quick else 384
    save("main_job", args, rows, wall_s=wall, table=table_lines, argv=argv[1:],
         gemm_gflops_1thread=gemm_rate(dim), trials=len(children),
         teacher_passes=parent.get("teacher_passes"))  # fmt: skip


if __name__ == "__main__":
    main()
