"""A small few-shot sweep with and without the teacher-feature cache: passes and wall time.

2 categories × shots 2/4/8 × 2 seeds (12 trials; --quick: shots 2/4, one seed) of
studies/few_shot.py on a generated set, run twice from an empty cache: once with the cache,
once with --no-cache. Teacher passes are read back from the MLflow child runs.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import machine, parser, save, table
from mlflow.tracking import MlflowClient

from fbft.data.synthetic import generate

ROOT = Path(__file__).resolve().parents[1]


def sweep(work: Path, data: Path, grid: list[str], cache: bool, name: str) -> dict:
    argv = [
        sys.executable, str(ROOT / "studies" / "few_shot.py"), "--data", str(data),
        *grid, "--pictures", "1",
        "--experiment", name, "--cache-dir", str(work / "cache"),
        *([] if cache else ["--no-cache"]),
    ]  # fmt: skip
    start = time.perf_counter()
    result = subprocess.run(argv, cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"study failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}")
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name(name).experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return {
        "cache": "on" if cache else "off (--no-cache)",
        "trials": len(children),
        "teacher_passes": int(sum(r.data.metrics["cache/teacher_passes"] for r in children)),
        "teacher_reused": int(sum(r.data.metrics["cache/teacher_reused"] for r in children)),
        "wall_s": wall,
    }


def main() -> None:
    p = parser(__doc__.splitlines()[0])
    args = p.parse_args()
    if args.quick:  # 2 categories × shots 2/4: 4 trials per sweep
        size, n_test = 64, 6
        grid = ["--shots", "2", "4", "--seeds", "0"]
        model = ["--backbone", "vit_small_patch14_reg4_dinov2", "--weights", "random",
                 "--backbone-kwargs", json.dumps({"depth": 4, "embed_dim": 48, "num_heads": 2}),
                 "--image-size", "56", "--layers", "2,4", "--epochs", "2"]  # fmt: skip
    else:
        size, n_test = 512, 12
        grid = ["--shots", "2", "4", "8", "--seeds", "0", "1"]
        model = ["--preset", "cpu", "--weights", "random", "--image-size", "224", "--epochs", "20"]
    with tempfile.TemporaryDirectory(prefix="fbft-bench-study-") as tmp:
        work = Path(tmp)
        data = generate(
            work / "data", ["gravel", "parts"], image_size=size, n_train=8, n_test=n_test
        )
        rows = [
            sweep(work, data, grid + model, cache=True, name="with-cache"),
            sweep(work, data, grid + model, cache=False, name="without-cache"),
        ]
    distinct = 2 * (8 + n_test)
    for row in rows:
        row["passes_per_distinct_image"] = row["teacher_passes"] / distinct
    ratio = {
        "passes": rows[1]["teacher_passes"] / max(1, rows[0]["teacher_passes"]),
        "wall": rows[1]["wall_s"] / rows[0]["wall_s"],
    }
    info = machine()
    print(f"{info['gpu'] or info['cpu']} ({info['cores']} cores); {distinct} distinct images")
    print(table(rows, list(rows[0])))
    passes, wall = ratio["passes"], ratio["wall"]
    print(f"\nwithout / with cache: {passes:.1f}x teacher passes, {wall:.2f}x wall time")
    save("study", args, rows, distinct_images=distinct, ratio=ratio, model_flags=model)


if __name__ == "__main__":
    main()
