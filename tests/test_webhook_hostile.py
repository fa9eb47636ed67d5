"""The webhook receiver under hostile clients (issue 25): timeouts, caps, no tracebacks.

Every server listens on 127.0.0.1 with short limits (header and body timeouts of 1 s, at most 4
connections sending a head); every client loop is bounded in count and time.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.prefect_server import free_port
from tests.test_webhook import FT, SECRET, SHA, Recorder, _pipeline, _receiver, hub_payload

LIMITS = {"header_timeout": 1.0, "max_pending": 4}


class Guarded:
    """The receiver as `lssf webhook serve` runs it (`flows.webhook.server_config`), in a thread."""

    def __init__(self, tmp_path: Path, records: Records | None = None, **limits: float) -> None:
        import uvicorn

        from flows.webhook import create_app, server_config

        self.recorder = Recorder()
        receiver = _receiver(tmp_path, self.recorder, body_timeout=1.0)
        self.port = free_port()
        config = server_config(
            create_app(receiver), "127.0.0.1", self.port, log_level="info", **(LIMITS | limits)
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.records = records

    def __enter__(self) -> Guarded:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        if self.records is not None:  # after uvicorn's dictConfig, which drops other handlers
            self.records.attach()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def connect(self) -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        sock.settimeout(5)
        return sock

    def post(self, body: bytes | dict, path: str = "/webhook", secret: str = SECRET):
        import httpx

        content = json.dumps(body).encode() if isinstance(body, dict) else body
        headers = {"X-Webhook-Secret": secret, "Content-Type": "application/json"}
        url = f"http://127.0.0.1:{self.port}{path}"
        return httpx.post(url, content=content, headers=headers, timeout=10)


class Records(logging.Handler):
    """Every record of the receiver's and uvicorn's loggers, as formatted lines."""

    NAMES = ("flows.webhook", "uvicorn", "uvicorn.error", "uvicorn.access")

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        text = record.getMessage()
        if record.exc_info:
            text += "\nTraceback " + logging.Formatter().formatException(record.exc_info)
        self.lines.append(text)

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def attach(self) -> None:
        for name in self.NAMES:
            logging.getLogger(name).addHandler(self)

    def detach(self) -> None:
        for name in self.NAMES:
            logging.getLogger(name).removeHandler(self)


@pytest.fixture
def records():
    receiver = logging.getLogger("flows.webhook")
    level = receiver.level
    receiver.setLevel(logging.DEBUG)
    handler = Records()
    yield handler
    handler.detach()
    receiver.setLevel(level)


def _closed_within(sock: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """Whether the server closed `sock` within `seconds`, and what it sent before."""
    got = b""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.settimeout(max(deadline - time.monotonic(), 0.01))
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            return False, got
        except ConnectionResetError:
            return True, got
        if not chunk:
            return True, got
        got += chunk
    return False, got


# -- hostile JSON ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"event": ' + b"9" * 60000 + b"}", "integer of 60000 digits"),
        (b"[" * 30000 + b"]" * 30000, "nested deeper than"),
        (b'{"event": NaN}', "not a JSON number"),
        (b'{"event": 1e400}', "out of range"),
    ],
    ids=["huge-int", "deep", "nan", "huge-float"],
)
def test_odd_json_is_400_without_a_traceback(tmp_path: Path, records, body, expected) -> None:
    assert len(body) < 64 * 1024
    with Guarded(tmp_path, records) as server:
        response = server.post(body)
    assert response.status_code == 400, response.text
    assert expected in response.json()["error"]
    assert "Traceback" not in records.text and "Exception in ASGI" not in records.text
    assert server.recorder.sent == []


# -- timeouts and the connection cap ---------------------------------------------------------


def test_a_half_sent_head_is_closed_after_the_header_timeout(tmp_path: Path) -> None:
    with Guarded(tmp_path) as server, contextlib.closing(server.connect()) as sock:
        sock.sendall(b"POST /webhook HTTP/1.1\r\nHost: x\r\nX-Webhook-Secret: ")
        start = time.monotonic()
        closed, _ = _closed_within(sock, 4.0)
        assert closed and time.monotonic() - start < 3.0


def test_a_head_dripped_byte_by_byte_is_closed_all_the_same(tmp_path: Path) -> None:
    head = b"POST /webhook HTTP/1.1\r\nHost: x\r\n" + b"X-Pad: " + b"a" * 100
    with Guarded(tmp_path) as server, contextlib.closing(server.connect()) as sock:
        start = time.monotonic()
        closed = False
        for byte in head[:40]:  # one byte every 0.1 s: 4 s at most, the deadline is 1 s
            try:
                sock.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
                break
            closed, _ = _closed_within(sock, 0.1)
            if closed:
                break
        assert closed and time.monotonic() - start < 3.0


def test_a_slow_authenticated_body_gets_408_and_the_connection_closes(tmp_path: Path) -> None:
    head = (
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Webhook-Secret: " + SECRET.encode() + b"\r\nContent-Length: 1000\r\n\r\n{"
    )
    with Guarded(tmp_path) as server, contextlib.closing(server.connect()) as sock:
        sock.sendall(head)
        start = time.monotonic()
        closed, answer = _closed_within(sock, 4.0)
    assert answer.startswith(b"HTTP/1.1 408") and b"not received within" in answer
    assert closed and time.monotonic() - start < 3.5


def test_connections_sending_a_head_are_capped(tmp_path: Path) -> None:
    with Guarded(tmp_path, header_timeout=20.0) as server:
        socks = [server.connect() for _ in range(10)]
        try:
            for sock in socks:
                sock.sendall(b"POST /webhook HTTP/1.1\r\n")
            time.sleep(0.3)
            closed = [_closed_within(sock, 0.5)[0] for sock in socks]
        finally:
            for sock in socks:
                sock.close()
        assert closed.count(True) >= 6  # all but the first 4: at once, not after 20 s
        time.sleep(0.3)  # the server sees the clients go
        assert server.post(hub_payload(FT)).status_code == 202  # deliveries still get in


def test_a_client_hanging_up_mid_body_logs_no_traceback(tmp_path: Path, records) -> None:
    head = (
        b"POST /webhook HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"X-Webhook-Secret: " + SECRET.encode() + b'\r\nContent-Length: 1000\r\n\r\n{"a": '
    )
    with Guarded(tmp_path, records) as server:
        for _ in range(3):
            with contextlib.closing(server.connect()) as sock:
                sock.sendall(head)
                time.sleep(0.2)
        time.sleep(0.5)
        assert server.post(hub_payload(FT)).status_code == 202
    assert "Traceback" not in records.text and "Exception in ASGI" not in records.text


# -- log lines -------------------------------------------------------------------------------


def test_log_lines_are_bounded_and_hold_no_body_fields(tmp_path: Path, records) -> None:
    marker = "body-marker-" + "z" * 40000
    payloads = [
        hub_payload(FT, scope=marker),
        hub_payload(FT, repo_type=marker),
        hub_payload(FT) | {"repo": hub_payload(FT)["repo"] | {"name": f"org/{marker}"}},
        hub_payload(FT) | {"updatedRefs": [{"ref": "refs/heads/main", "newSha": marker}]},
    ]
    with Guarded(tmp_path, records) as server:
        codes = [server.post(p).status_code for p in payloads]
        codes.append(server.post(hub_payload(FT), path="/%1b[2J" * 3000).status_code)  # 404
        codes.append(server.post(hub_payload(FT)).status_code)
    assert codes == [200, 200, 400, 400, 404, 202]
    assert records.lines and max(len(line) for line in records.lines) < 1000
    assert "body-marker" not in records.text and "\x1b" not in records.text
    assert f"{FT}@{SHA}" in records.text  # the decision is logged


# -- startup ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (["--path", "webhook"], "--path 'webhook'"),
        (["--path", "/a/../b"], "--path '/a/../b'"),
        (["--port", "70000"], "--port 70000"),
        (["--port", "-1"], "--port -1"),
        (["--max-body-bytes", "-5"], "--max-body-bytes -5"),
        (["--header-timeout", "0"], "--header-timeout 0.0"),
        (["--body-timeout", "inf"], "--body-timeout inf"),
        (["--max-pending", "0"], "--max-pending 0"),
    ],
    ids=lambda v: "_".join(v) if isinstance(v, list) else None,
)
def test_serve_refuses_bad_startup_arguments_in_one_line(
    tmp_path: Path, monkeypatch, capsys, flags: list[str], expected: str
) -> None:
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from lssf.cli import main

    monkeypatch.delenv("LSSF_WEBHOOK_SECRET", raising=False)  # the old code stopped there
    with temporary_settings({PREFECT_API_URL: None}):
        code = main(["webhook", "serve", "--config", str(_pipeline(tmp_path)), *flags])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and err.count("\n") == 1


@pytest.mark.parametrize("damage", ["garbage", "other-table"])
def test_a_corrupt_seen_database_is_a_clear_error(
    tmp_path: Path, monkeypatch, capsys, damage: str
) -> None:
    import sqlite3

    from prefect.settings import PREFECT_API_URL, temporary_settings

    from lssf.cli import main

    state = tmp_path / "hook"
    state.mkdir()
    seen = state / "seen.sqlite"
    if damage == "garbage":
        seen.write_bytes(b"not a database, just bytes" * 100)
    else:
        with contextlib.closing(sqlite3.connect(seen)) as db:
            db.execute("CREATE TABLE announced (x TEXT)")
            db.commit()
    before = seen.read_bytes()
    monkeypatch.setenv("LSSF_WEBHOOK_SECRET", SECRET)
    argv = ["webhook", "serve", "--config", str(_pipeline(tmp_path)), "--state-dir", str(state)]
    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        code = main([*argv, "--port", str(free_port())])
    err = capsys.readouterr().err
    assert code == 2 and "seen-delivery store" in err and str(seen) in err
    assert "move it aside" in err and SECRET not in err
    assert seen.read_bytes() == before  # nothing lost


def test_a_seen_store_failing_at_run_time_is_503_not_a_traceback(tmp_path: Path, records) -> None:
    with Guarded(tmp_path, records) as server:
        seen = tmp_path / "state" / "webhook" / "seen.sqlite"
        seen.write_bytes(b"garbage after the start" * 100)  # damaged under a running server
        response = server.post(hub_payload(FT))
    assert response.status_code == 503 and "retry later" in response.json()["error"]
    assert "Traceback" not in records.text and "Exception in ASGI" not in records.text
