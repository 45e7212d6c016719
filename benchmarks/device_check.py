"""One prepared command for a GPU's first minutes: every CUDA branch checked against the CPU,
the paper's setting timed, the study platform on a shared GPU, PatchCore at 1 M tokens.

    python benchmarks/device_check.py                       # on CUDA: ~8 min
    python benchmarks/device_check.py --device cpu --quick  # CI: every step tiny, < 60 s

Results: benchmarks/results/device_check.json (``-quick.json`` in --quick, not committed).

Steps, in order, each in its own process with its own time budget: ``correctness``
(device_correctness.py), ``paper`` and ``bank`` (device_paper.py), ``study`` (device_study.py).
A step that runs past its budget (or hangs, or poisons its CUDA context) is killed and recorded
with the checks it finished; the next step still runs; within a step, a check that no longer
fits is named as skipped. The JSON and the table are written after every step. It exits 0
naming what it skipped; 1 only when a check failed with an error.
"""

from __future__ import annotations

import os

# torch.cuda.is_available() through NVML: the driver process never creates a CUDA context.
os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")

import argparse
import importlib
import json
import multiprocessing as mp
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import parser, save, table

# (step, module, function, budget seconds on a GPU, budget in --quick). Full budgets sum to
# 420 s; with 10 s of grace per step and the start-up they stay within the 480 s total (the
# reasoning per step: BENCHMARKS.md, "GPU").
STEPS = (
    ("correctness", "device_correctness", "run", 100, 14),
    ("paper", "device_paper", "run_paper", 140, 8),
    ("study", "device_study", "run", 110, 28),
    ("bank", "device_paper", "run_bank", 70, 4),
)
GRACE_S = 10  # after a step's deadline, before it is killed
COLUMNS = ("check", "status", "seconds", "ok", "peak_cuda_gb", "peak_rss_gb")


def main() -> int:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--device", default="auto", help="auto (CUDA when present) | cuda | cpu")
    p.add_argument(
        "--budget", type=float, help="total seconds (480; --quick: 55); each step's share scales"
    )
    p.add_argument("--steps", nargs="+", choices=[s[0] for s in STEPS], help="default: all")
    args = p.parse_args()
    started = time.time()
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {device}: no CUDA device is visible; use --device cpu")
    default = 55.0 if args.quick else 480.0
    budget = args.budget or default  # every step's budget scales with it
    info = device_info(device)
    print("device: " + ", ".join(f"{k}={v}" for k, v in info.items()), flush=True)
    work = Path(tempfile.mkdtemp(prefix="fbft-device-check-"))
    # CUDA wants fresh processes (spawn); on a CPU, fork reuses this process's imports.
    context = mp.get_context("spawn" if device.startswith("cuda") else "fork")
    if context.get_start_method() == "fork":
        for module in {s[1] for s in STEPS}:
            importlib.import_module(module)
    ctx = {"device": device, "quick": args.quick, "work": str(work)}
    steps: dict[str, dict[str, Any]] = {}
    try:
        for name, module, function, full_s, quick_s in STEPS:
            if args.steps and name not in args.steps:
                continue
            planned = (quick_s if args.quick else full_s) * budget / default
            left = started + budget - time.time()
            if left < 0.5 * planned:
                steps[name] = {"status": f"skipped: out of time ({left:.0f} s of the total left, "
                               f"planned {planned:.0f} s)", "checks": []}  # fmt: skip
            else:
                steps[name] = run_step(context, name, module, function, min(planned, left), ctx)
            report(args, info, steps, budget, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    skipped = [n for n, s in steps.items() if s["status"].startswith("skipped")]
    skipped += [f"{n}: {c['check']}" for n, s in steps.items() for c in s["checks"]
                if c["status"].startswith("skipped")]  # fmt: skip
    print(f"\ndone in {time.time() - started:.0f} s; skipped: {', '.join(skipped) or 'nothing'}")
    errors = [n for n, s in steps.items() if s["status"].startswith("error")]
    errors += [n for n, s in steps.items() for c in s["checks"] if c["status"].startswith("error")]
    return 1 if errors else 0


def run_step(
    context: Any, name: str, module: str, function: str, budget: float, ctx: dict[str, Any]
) -> dict[str, Any]:
    """One step in its own process; its checks come back through a JSON file it rewrites."""
    print(f"\n== {name} (budget {budget:.0f} s)", flush=True)
    start = time.time()
    partial = Path(ctx["work"]) / f"{name}.json"
    deadline = start + budget
    proc = context.Process(
        target=_child, args=(name, module, function, str(partial), deadline, ctx), daemon=False
    )
    proc.start()
    proc.join(budget + GRACE_S)
    if proc.is_alive():
        proc.kill()
        proc.join()
        status = f"skipped: out of time (killed {budget + GRACE_S:.0f} s after its start)"
    elif proc.exitcode != 0:
        status = f"error: the step's process exited with {proc.exitcode}"
    else:
        status = "done"
    checks = json.loads(partial.read_text()) if partial.exists() else []
    return {"status": status, "budget_s": budget, "seconds": time.time() - start, "checks": checks}


def _child(
    name: str, module: str, function: str, partial: str, deadline: float, ctx: dict[str, Any]
) -> None:
    from device_record import SIZES, Recorder

    torch.set_flush_denormal(True)  # random-init teachers make denormals; real weights do not
    ctx = {**ctx, "sizes": SIZES["quick" if ctx["quick"] else "full"]}
    rec = Recorder(name, Path(partial), deadline - 3, ctx["device"])
    step = getattr(importlib.import_module(module), function)
    rec.check("step", lambda: step(rec, ctx) or {"checks": len(rec.rows)})


def device_info(device: str) -> dict[str, Any]:
    """Name, memory, driver, CUDA and torch, without creating a CUDA context here."""
    info: dict[str, Any] = {"device": device, "torch": torch.__version__}
    if not device.startswith("cuda"):
        from common import machine

        m = machine()
        return info | {"cpu": m["cpu"], "cores": m["cores"], "memory_gib": m["memory_gib"]}
    info |= {"cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    query = "name,memory.total,driver_version"
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
        name, memory, driver = (x.strip() for x in out.stdout.splitlines()[0].split(","))
        info |= {"name": name, "memory": memory, "driver": driver}
    except (OSError, subprocess.SubprocessError, ValueError, IndexError) as err:
        info["nvidia_smi"] = f"unavailable ({err})"
    return info


def report(
    args: argparse.Namespace, info: dict, steps: dict, budget: float, started: float
) -> None:
    """Print the last step's table and (re)write the JSON with everything so far."""
    name, step = next(reversed(steps.items()))
    print(f"{name}: {step['status']}")
    if step["checks"]:
        print(table(step["checks"], [c for c in COLUMNS if any(c in r for r in step["checks"])]))
        for check in step["checks"]:
            extra = {k: v for k, v in check.items() if k not in COLUMNS and k != "traceback"}
            if extra:
                print(f"  {check['check']}: {json.dumps(extra, default=str)}")
    rows = [{"step": n, **c} for n, s in steps.items() for c in s["checks"]]
    save("device_check", args, rows, device=info, budget_s=budget,
         wall_s=time.time() - started, steps=steps)  # fmt: skip


if __name__ == "__main__":
    raise SystemExit(main())
