"""Screenshots of the audit trail in the MLflow UI, taken from the demo's store (issue #12, part 3).

Writes into docs/screenshots/: model_version.png (the registered model version: source run,
alias, first tags) and model_version_tags.png (its tag table scrolled to the source tags);
realign_run.png (the realign run's overview: description, metrics, tags, registered model,
parameters), realign_run_before.png and realign_run_after.png (its metric table filtered to
`before.` and `after.`); search_trace.png (the `search/search_trace.md` artifact, which the
UI renders as Markdown) and rank_plot.png (the `plots/patch_ranks.png` artifact).

Needs a finished `lssf demo` (default work folder .state/demo; its store is
WORKDIR/state/mlflow.db) and a Debian-packaged Chromium, installed as root with

    apt-get install -y chromium        # here: Debian 12, chromium 150.0.7871.100-1~deb12u1

then, from the repository root:

    .venv/bin/python scripts/screenshots.py [--workdir .state/demo] [--out docs/screenshots]

It starts `mlflow server` on that store (127.0.0.1, a free port), waits until `/health` answers,
finds through MlflowClient the realign run, the model version made from it and the rank plot,
drives headless Chromium over the DevTools protocol (`websockets`, installed with prefect):
each page is loaded until its text shows what the screenshot is meant to show (the run name,
the alias, the metric names, the loaded image; otherwise it fails naming what is missing),
then saved as a 256-colour PNG, atomically. Then it stops the browser and the server.
"""

from __future__ import annotations

import argparse
import base64
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote

REPO_ROOT = Path(__file__).resolve().parents[1]
RANK_PLOT = "plots/patch_ranks.png"
SEARCH_TRACE = "search/search_trace.md"
logger = logging.getLogger("screenshots")


class ScreenshotError(RuntimeError):
    """The store, the server or the browser is not in the state the screenshots need."""


@dataclass(frozen=True)
class Page:
    """One screenshot: the UI route, the window, the text the page must show before it is
    taken, and optionally what to do first: type `search[1]` into the input whose placeholder
    is `search[0]`, scroll the `scroll` element to its end, clip to the section around the
    `clip[0]` element whose text starts with `clip[1]`. After that, `after` must show and
    `absent` must not."""

    name: str
    route: str
    size: tuple[int, int]
    expect: tuple[str, ...]
    image: bool = False
    search: tuple[str, str] | None = None
    scroll: str | None = None
    clip: tuple[str, str] | None = None
    after: tuple[str, ...] = ()
    absent: tuple[str, ...] = ()


@dataclass(frozen=True)
class Record:
    """What the demo recorded: the realign run and the model version made from it."""

    experiment_id: str
    run_id: str
    run_name: str
    source_key: str
    model_name: str
    version: str
    aliases: tuple[str, ...]


def find_record(tracking_uri: str) -> Record:
    """The newest finished realign run that has a registered model version and a rank plot."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        experiments,
        "tags.lssf_kind = 'realign' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        raise ScreenshotError(f"{tracking_uri}: no finished realign run (has `lssf demo` run?)")
    for run in runs:
        key = run.data.tags.get("source_key", "")
        quoted = key.replace("\\", "\\\\").replace("'", "\\'")
        versions = client.search_model_versions(f"tags.source_key = '{quoted}'")
        mine = [v for v in versions if v.run_id == run.info.run_id]
        if not mine or not _has_artifact(client, run.info.run_id, RANK_PLOT):
            continue
        version = client.get_model_version(mine[0].name, mine[0].version)  # with its aliases
        return Record(
            experiment_id=run.info.experiment_id,
            run_id=run.info.run_id,
            run_name=run.info.run_name,
            source_key=key,
            model_name=version.name,
            version=str(version.version),
            aliases=tuple(version.aliases),
        )
    statuses = sorted({r.data.tags.get("lssf_status", "?") for r in runs})
    raise ScreenshotError(
        f"{tracking_uri}: {len(runs)} finished realign run(s) (lssf_status {statuses}), none "
        f"with a registered model version and a {RANK_PLOT} artifact"
    )


def _has_artifact(client: Any, run_id: str, path: str) -> bool:
    folder = path.rsplit("/", 1)[0]
    return any(f.path == path for f in client.list_artifacts(run_id, folder))


def pages(rec: Record) -> list[Page]:
    model = quote(rec.model_name, safe="")
    version = f"#/models/{model}/versions/{rec.version}"
    run = f"#/experiments/{rec.experiment_id}/runs/{rec.run_id}"
    alias = rec.aliases[0] if rec.aliases else f"Version {rec.version}"
    shown = (f"Version {rec.version}", alias, "gate_verdict", rec.run_name, "source run:")
    tags_table = ".du-bois-light-table-body"  # MLflow 3.17's tag table scrolls inside the page
    metrics = 'input[placeholder="Search metrics"]'
    return [
        Page("model_version", version, (1280, 900), shown),
        Page(
            "model_version_tags",
            version,
            (1280, 900),
            shown,
            scroll=tags_table,
            clip=(tags_table, "Tags"),
            after=("source_key", "source_repo", "source_revision"),
        ),
        Page(
            "realign_run",
            run,
            (1280, 1450),
            (rec.run_name, "PASS (held-out gate", "Held-out (decides)", "Metrics (", "before."),
        ),
        *(
            Page(
                f"realign_run_{split}",
                run,
                (1280, 1450),
                (rec.run_name, "Metrics (", f"{split}."),
                search=("Search metrics", f"{split}."),
                clip=(metrics, "Metrics ("),
                after=(f"{split}.harmful_refusal", f"{split}.task_accuracy"),
                absent=(f"{other}.harmful_refusal",),
            )
            for split, other in (("before", "after"), ("after", "before"))
        ),
        Page(
            "search_trace",
            f"{run}/artifactPath/{SEARCH_TRACE}",
            (1280, 900),
            (SEARCH_TRACE, "PASS (held-out gate", "Held-out (decides)"),
            absent=("|---|",),  # rendered as Markdown, not shown as text
        ),
        Page("rank_plot", f"{run}/artifactPath/{RANK_PLOT}", (1280, 800), (RANK_PLOT,), True),
    ]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def mlflow_server(tracking_uri: str, port: int, timeout: float = 120.0) -> Iterator[str]:
    """`mlflow server` on `tracking_uri` in its own process group; its base URL once it answers."""
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri]
    cmd += ["--registry-store-uri", tracking_uri, "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--workers", "1"]
    env = os.environ | {"MLFLOW_DISABLE_TELEMETRY": "true"}
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            _wait_healthy(proc, url, timeout, log)
            logger.info("mlflow server at %s (pid %d)", url, proc.pid)
            yield url
        finally:
            _stop(proc)


def _wait_healthy(proc: subprocess.Popen, url: str, timeout: float, log: Any) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            log.seek(0)
            tail = log.read().decode(errors="replace")[-2000:]
            raise ScreenshotError(f"mlflow server exited with {proc.returncode}:\n{tail}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(1)
    raise ScreenshotError(f"mlflow server at {url} did not answer /health within {timeout:.0f} s")


def _stop(proc: subprocess.Popen) -> None:
    """SIGTERM to the server's own process group (the server and its uvicorn worker)."""
    if proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def chromium_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ScreenshotError(
            f"browser {name!r} not found on PATH; install it with `apt-get install -y chromium`"
        )
    return path


class Browser:
    """Headless Chromium driven over the DevTools protocol: one tab, one profile, so what
    one page sets in the UI's localStorage (the closed assistant panel) holds for the next."""

    def __init__(self, binary: str, profile: Path, timeout: float = 60.0) -> None:
        cmd = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
        cmd += ["--no-first-run", "--disable-extensions", "--disable-dev-shm-usage"]
        cmd += ["--remote-debugging-port=0", f"--user-data-dir={profile}", "about:blank"]
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
        )
        self._id = 0
        self.ws = self._connect(profile / "DevToolsActivePort", timeout)

    def _connect(self, port_file: Path, timeout: float) -> Any:
        from websockets.sync.client import connect  # installed with prefect

        deadline = time.monotonic() + timeout
        while not port_file.is_file() or not port_file.read_text().strip():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise ScreenshotError(f"chromium did not start (exit code {self.proc.poll()})")
            time.sleep(0.2)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as resp:
            tabs = [t for t in json.load(resp) if t.get("type") == "page"]
        if not tabs:
            raise ScreenshotError("chromium has no open tab to drive")
        return connect(tabs[0]["webSocketDebuggerUrl"], max_size=64 * 2**20)

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events in between are dropped)."""
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") != self._id:
                continue
            if "error" in msg:
                raise ScreenshotError(f"chromium {method}: {msg['error']}")
            return dict(msg.get("result") or {})

    def js(self, expression: str) -> Any:
        found = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in found:
            raise ScreenshotError(f"page script failed: {found['exceptionDetails']}")
        return found.get("result", {}).get("value")

    def close(self) -> None:
        self.ws.close()
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=20)


BODY_TEXT = "document.body ? document.body.innerText : ''"
# Set once on the first page, kept in the UI's localStorage for the others: the classic
# "Model training" view of experiments, and the MLflow Assistant side panel closed.
PREPARE_UI = """(() => {
  const byText = (t) => [...document.querySelectorAll('[role=button], button')]
    .find((e) => e.textContent.trim() === t);
  const training = byText('Model training');
  if (training) training.click();
  const close = document.querySelector('[data-component-id="mlflow.assistant.chat_panel.close"]');
  if (close) close.click();
  return true;
})()"""


# The section around an element: its nearest ancestor whose text starts with a heading.
CLIP_RECT = """((anchor, heading) => {
  let e = document.querySelector(anchor);
  while (e && !(e.innerText || '').trim().startsWith(heading)) e = e.parentElement;
  if (!e) return null;
  const r = e.getBoundingClientRect(), pad = 8;
  return {x: Math.max(0, r.x - pad), y: Math.max(0, r.y - pad),
          width: r.width + 2 * pad, height: r.height + 2 * pad};
})(%s, %s)"""


def _missing(
    browser: Browser, texts: tuple[str, ...], image: bool, absent: tuple[str, ...] = ()
) -> list[str]:
    """The texts not on the page yet, "a loaded image" while `image` and none is, and
    "no X" while an `absent` text X is still shown."""
    body = browser.js(BODY_TEXT) or ""
    missing = [t for t in texts if t not in body] + [f"no {t}" for t in absent if t in body]
    if image and not browser.js(
        "[...document.images].some((i) => i.complete && i.naturalWidth > 100)"
    ):
        missing.append("a loaded image")
    return missing


def _wait_for(
    browser: Browser,
    page: Page,
    texts: tuple[str, ...],
    url: str,
    wait_s: float,
    absent: tuple[str, ...] = (),
) -> None:
    deadline = time.monotonic() + wait_s
    while missing := _missing(browser, texts, page.image, absent):
        if time.monotonic() > deadline:
            raise ScreenshotError(f"{url}: after {wait_s:.0f} s the page still lacks {missing}")
        time.sleep(0.5)
    time.sleep(2.0)  # let tables and images finish laying out after the last text arrived


def _act(browser: Browser, page: Page) -> dict[str, float] | None:
    """Type, scroll as `page` asks; the clip rectangle if it asks for one."""
    if page.search is not None:
        placeholder, text = page.search
        browser.js(
            f"document.querySelector('input[placeholder={json.dumps(placeholder)}]').focus()"
        )
        browser.call("Input.insertText", text=text)
    if page.scroll is not None:
        target = f"document.querySelector({json.dumps(page.scroll)})"
        browser.js(f"(e => {{ e.scrollTop = e.scrollHeight; }})({target})")
    if page.clip is None:
        return None
    anchor, heading = (json.dumps(v) for v in page.clip)
    rect = browser.js(CLIP_RECT % (anchor, heading))
    if not rect:
        raise ScreenshotError(f"{page.name}: no section starting with {page.clip[1]!r} on the page")
    return dict(rect)


def shoot(browser: Browser, base: str, page: Page, out_dir: Path, wait_s: float) -> Path:
    """Open `page`, wait until it shows what it should, and save a PNG of it in `out_dir`."""
    width, height = page.size
    browser.call(
        "Emulation.setDeviceMetricsOverride",
        width=width,
        height=height,
        deviceScaleFactor=1,
        mobile=False,
    )
    url = f"{base}/{page.route}"
    browser.call("Page.navigate", url="about:blank")  # a fresh app: no filter typed before
    browser.call("Page.navigate", url=url)
    _wait_for(browser, page, page.expect, url, wait_s)
    clip = _act(browser, page)
    if page.after or page.absent:
        _wait_for(browser, page, page.after, url, wait_s, page.absent)
    params: dict[str, Any] = {"format": "png"}
    if clip is not None:
        params["clip"] = clip | {"scale": 1}
    shot = browser.call("Page.captureScreenshot", **params)
    out = out_dir / f"{page.name}.png"
    tmp = out_dir / f".{page.name}.tmp.png"
    tmp.write_bytes(base64.b64decode(shot["data"]))
    _shrink(tmp)
    os.replace(tmp, out)
    return out


def _shrink(path: Path) -> None:
    """A 256-colour palette: UI screenshots lose nothing visible and shrink about threefold."""
    from PIL import Image

    with Image.open(path) as img:
        small = img.convert("RGB").quantize(colors=256, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def prepare_ui(browser: Browser, base: str, wait_s: float) -> None:
    """Open the UI once and set the view every screenshot uses (see PREPARE_UI)."""
    browser.call("Page.enable")
    browser.call("Page.navigate", url=f"{base}/#/experiments")
    deadline = time.monotonic() + wait_s
    while "Model training" not in (browser.js(BODY_TEXT) or ""):
        if time.monotonic() > deadline:
            raise ScreenshotError(f"{base}: the MLflow UI did not render in {wait_s:.0f} s")
        time.sleep(0.5)
    time.sleep(1.0)
    browser.js(PREPARE_UI)
    time.sleep(1.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=REPO_ROOT / ".state" / "demo")
    parser.add_argument("--tracking-uri", help="default: sqlite:////WORKDIR/state/mlflow.db")
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "screenshots")
    parser.add_argument(
        "--browser", default="chromium", help="Chromium binary (default: %(default)s)"
    )
    parser.add_argument("--wait", type=float, default=90.0, help="seconds per page at most")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    db = args.workdir.expanduser().resolve() / "state" / "mlflow.db"
    if args.tracking_uri is None and not db.is_file():
        raise ScreenshotError(f"{db}: no MLflow store; run `lssf demo --workdir {args.workdir}`")
    uri = args.tracking_uri or f"sqlite:///{db}"
    binary = chromium_binary(args.browser)
    rec = find_record(uri)
    logger.info(
        "run %s (%s), %s version %s", rec.run_id, rec.source_key, rec.model_name, rec.version
    )
    args.out.mkdir(parents=True, exist_ok=True)
    with mlflow_server(uri, free_port()) as base, tempfile.TemporaryDirectory() as profile:
        browser = Browser(binary, Path(profile))
        try:
            prepare_ui(browser, base, args.wait)
            for page in pages(rec):
                path = shoot(browser, base, page, args.out, args.wait)
                logger.info("%s: %s (%d bytes)", page.name, path, path.stat().st_size)
        finally:
            browser.close()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ScreenshotError as exc:
        print(f"screenshots: {exc}", file=sys.stderr)
        sys.exit(1)
