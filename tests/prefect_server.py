"""A real local `prefect server start` for tests, and small helpers around its API.

`tests/conftest.py` starts one per test session (`prefect_api`), shared by every test that
needs a Prefect server: each start costs this machine 20-60 s. Tests that share it name
their deployments and work pools so that they cannot see each other's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(api: str, server: Any, timeout: float = 180.0) -> None:
    """Until `api`/health answers 200; fails when `server` (a Popen) exits or time runs out."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError("prefect server exited early")
        try:
            if httpx.get(f"{api}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise TimeoutError("prefect server did not become healthy")


@contextlib.contextmanager
def prefect_server(home: Path) -> Iterator[tuple[str, dict[str, str]]]:
    """A real `prefect server start` on a free local port, healthy, stopped on exit; yields its
    API URL and the environment (PREFECT_HOME=`home`) that points the CLI and workers at it."""
    import os
    import signal
    import subprocess
    import sys

    prefect = str(Path(sys.executable).with_name("prefect"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env |= {"PREFECT_HOME": str(home), "PREFECT_API_URL": api}
    server = subprocess.Popen(
        [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_healthy(api, server)
        yield api, env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


def flow_runs(api: str, deployment: str) -> list[dict[str, Any]]:
    """The flow runs of the deployment named `deployment`."""
    import httpx

    body = {"deployments": {"name": {"any_": [deployment]}}}
    return httpx.post(f"{api}/flow_runs/filter", json=body, timeout=10).json()
