"""Look at a study in the MLflow UI as a person does: headless Chromium screenshots of the runs
page, the parent run's overview (its description holds the table) and a child run's artifacts.

    python benchmarks/ui_check.py --tracking-uri sqlite:///$PWD/mlflow.db --experiment fbft-few-shot

Needs Debian's ``chromium``. Screenshots go to ``--out`` (default: a temporary folder, never the
repository); the script prints which texts each page shows and exits 1 when one is missing.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--hide-scrollbars",
    "--window-size=1600,1000", "--virtual-time-budget=15000",
]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, seconds: float = 60) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"the MLflow UI at {url} did not answer within {seconds:.0f} s")


def _chromium(url: str, png: Path, profile: Path) -> str:
    """Screenshot ``url`` to ``png``; return the rendered page's DOM."""
    base = ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}"]
    subprocess.run([*base, f"--screenshot={png}", url], capture_output=True, timeout=120)
    dom = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    return dom.stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tracking-uri", required=True)
    p.add_argument("--experiment", required=True)
    p.add_argument("--out", type=Path, default=Path(tempfile.mkdtemp(prefix="fbft-ui-")))
    args = p.parse_args()
    from mlflow.tracking import MlflowClient

    from fbft.study import tracking

    client = MlflowClient(args.tracking_uri)
    exp = client.get_experiment_by_name(args.experiment)
    if exp is None:
        print(f"no experiment {args.experiment!r} in {args.tracking_uri}", file=sys.stderr)
        return 2
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    child = next(r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id)
    port = _free_port()
    command = ["mlflow", "ui", "--backend-store-uri", args.tracking_uri,
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    root = tracking.artifact_root(args.tracking_uri)
    if root:
        command += ["--default-artifact-root", root]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    args.out.mkdir(parents=True, exist_ok=True)
    missing = []
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(f"{base}/health")
        pages = {
            "runs": (f"{base}/#/experiments/{exp.experiment_id}/runs", [parent.info.run_name]),
            "parent": (f"{base}/#/experiments/{exp.experiment_id}/runs/{parent.info.run_id}",
                       [child.info.run_name, "trials"]),
            "artifacts": (f"{base}/#/experiments/{exp.experiment_id}/runs/"
                          f"{child.info.run_id}/artifacts", ["pro_curve.png", "maps"]),
        }  # fmt: skip
        with tempfile.TemporaryDirectory() as profile:
            for name, (url, texts) in pages.items():
                dom = _chromium(url, args.out / f"{name}.png", Path(profile))
                found = {t: t in dom for t in texts}
                missing += [f"{name}: {t!r}" for t, ok in found.items() if not ok]
                print(f"{name:10s} {args.out / (name + '.png')}  shows {found}")
    finally:
        server.terminate()
        server.wait(timeout=30)
    if missing:
        print("missing: " + "; ".join(missing), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
