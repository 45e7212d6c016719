"""Look at a study in the MLflow UI as a person does, in a fresh headless Chromium: the link the
study prints (must open the model-training view), the runs table with every parent expanded
(are the run names whole?), the parent run's overview (its description holds the table), a
child run's metric charts (the key metrics first) and its artifacts.

    python benchmarks/ui_check.py --tracking-uri sqlite:///$PWD/mlflow.db --experiment fbft-few-shot

Needs Debian's ``chromium`` (driven over the DevTools protocol with aiohttp, which MLflow
installs). Screenshots go to ``--out`` (default: a temporary folder, never the repository); the
script prints what each page shows and exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import itertools
import json
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--hide-scrollbars",
    "--window-size=1600,1000", "--remote-debugging-port=0",
]  # fmt: skip

# In the page: the run-name cells whose text the table cuts (CSS ellipsis), and the names shown.
CUT_NAMES = """(() => {
  const names = [...document.querySelectorAll('.ag-row [col-id*="Run Name"] a span')];
  return {shown: names.map(e => e.textContent.trim()),
          cut: names.filter(e => e.scrollWidth > e.clientWidth + 1).map(e => e.textContent.trim())};
})()"""
EXPAND = """(() => {
  const b = [...document.querySelectorAll('.ag-row [col-id*="Run Name"] button')];
  b.forEach(e => e.click()); return b.length; })()"""
CLOSE_ASSISTANT = """(() => { const b = [...document.querySelectorAll('button')].find(
  e => (e.getAttribute('aria-label') || '').match(/close/i)); if (b) b.click(); return !!b; })()"""
SECTIONS = """[...document.querySelectorAll('div, span, h3, h4')].filter(e =>
  e.children.length === 0 && e.parentElement && !/^\\(\\d+\\)$/.test(e.textContent.trim())
  && /^[^()]{1,60}\\s*\\(\\d+\\)$/.test(e.parentElement.textContent.trim()))
  .map(e => e.textContent.trim()).filter((t, i, a) => t && a.indexOf(t) === i)"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(url: str, seconds: float = 90) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {seconds:.0f} s")


class Browser:
    """One Chromium page over the DevTools protocol: navigate, run JavaScript, screenshot."""

    def __init__(self, profile: Path) -> None:
        self.process = subprocess.Popen(
            ["chromium", *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        port_file = profile / "DevToolsActivePort"
        deadline = time.time() + 60
        while not port_file.exists() or not port_file.read_text().strip():
            if time.time() > deadline or self.process.poll() is not None:
                raise RuntimeError("chromium did not start (is Debian's chromium installed?)")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        self.ws_url, self.ids = page["webSocketDebuggerUrl"], itertools.count(1)

    async def __aenter__(self) -> Browser:
        import aiohttp

        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(self.ws_url, max_msg_size=0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.ws.close()
        await self.session.close()
        self.process.terminate()
        self.process.wait(timeout=30)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self.ids)
        await self.ws.send_json({"id": ident, "method": method, "params": params})
        while True:
            message = await self.ws.receive_json(timeout=120)
            if message.get("id") == ident:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def js(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def open(self, url: str, until: str, seconds: float = 60) -> str:
        """Go to ``url``; wait until the page's text holds ``until`` (then a moment for the
        rest to render); the page's text."""
        await self.call("Page.navigate", url=url)
        deadline, text = time.time() + seconds, ""
        while time.time() < deadline:
            text = await self.js("document.body ? document.body.innerText : ''") or ""
            if until in text:
                break
            await asyncio.sleep(0.5)
        await asyncio.sleep(2)
        return await self.js("document.body.innerText") or text

    async def shot(self, path: Path) -> None:
        data = await self.call("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(data["data"]))


async def _look(base: str, link: str, exp: Any, parent: Any, child: Any, out: Path) -> list[str]:
    """Visit the pages; the failed checks."""
    from fbft.study import tracking

    failed: list[str] = []

    def check(ok: bool, what: str) -> None:
        print(f"  {'ok  ' if ok else 'FAIL'} {what}")
        if not ok:
            failed.append(what)

    run_page = f"{base}/#/experiments/{exp.experiment_id}/runs"
    view = "?" + tracking.MODEL_TRAINING_VIEW  # run pages as after a click on "Model training"
    with tempfile.TemporaryDirectory(
        prefix="fbft-chromium-", ignore_cleanup_errors=True
    ) as profile:
        async with Browser(Path(profile)) as page:
            print(f"link       {link}")
            text = await page.open(link, parent.info.run_name)
            await page.js(CLOSE_ASSISTANT)
            await page.shot(out / "link.png")
            check("Evaluation runs" not in text and "Runs" in text,
                  "the printed link opens the model-training view (no GenAI panels)")  # fmt: skip
            print(f"runs       {out / 'runs.png'}")
            await page.js(EXPAND)
            await asyncio.sleep(3)
            await page.shot(out / "runs.png")
            names = await page.js(CUT_NAMES) or {"shown": [], "cut": []}
            print(f"           names shown: {names['shown']}")
            check(child.info.run_name in names["shown"], "child runs listed under the parent")
            check(not names["cut"], f"run names shown whole (cut: {names['cut']})")
            print(f"parent     {out / 'parent.png'}")
            text = await page.open(f"{run_page}/{parent.info.run_id}{view}", "Description")
            await page.shot(out / "parent.png")
            check("| " in text or "trials" in text, "the parent's description holds the table")
            print(f"metrics    {out / 'metrics.png'}")
            await page.open(f"{run_page}/{child.info.run_id}/model-metrics{view}", "Key metrics")
            await asyncio.sleep(3)
            await page.shot(out / "metrics.png")
            sections = await page.js(SECTIONS) or []
            print(f"           sections: {sections}")
            check(bool(sections) and sections[0].startswith("Key metrics"),
                  "the metric charts open on the key metrics")  # fmt: skip
            print(f"artifacts  {out / 'artifacts.png'}")
            text = await page.open(
                f"{run_page}/{child.info.run_id}/artifacts{view}", "pro_curve.png"
            )
            await page.shot(out / "artifacts.png")
            check("pro_curve.png" in text and "maps" in text, "artifacts: figures and maps")
    return failed


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
    parent = next(r for r in runs if tracking.PARENT_TAG not in r.data.tags)
    child = next(r for r in runs if r.data.tags.get(tracking.PARENT_TAG) == parent.info.run_id)
    port = _free_port()
    command = ["mlflow", "ui", "--backend-store-uri", args.tracking_uri,
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    root = tracking.artifact_root(args.tracking_uri)
    if root:
        command += ["--default-artifact-root", root]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    args.out.mkdir(parents=True, exist_ok=True)
    try:
        base = f"http://127.0.0.1:{port}"
        _wait(f"{base}/health")
        # the link a study prints, pointed at this server's port
        link = tracking.experiment_link(args.tracking_uri, exp.experiment_id)
        link = link.replace(f":{tracking.UI_PORT}/", f":{port}/", 1)
        failed = asyncio.run(_look(base, link, exp, parent, child, args.out))
    finally:
        server.terminate()
        server.wait(timeout=30)
    if failed:
        print("failed: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
