"""Offline Hub for tests: recorded listings replayed with respx, a local server for downloads.

`replay_hub(monkeypatch)` replays `tests/data/hub_list_models.json` (recorded `GET /api/models`
answers, pages linked by `Link: rel="next"`) through respx's httpcore2 mocker, the transport
under huggingface_hub's httpx2 client; `fail=[...]` answers the first requests with those
responses or errors (an outage, a 429) before the recording.

`FakeHub` is a small server on 127.0.0.1, for where a real download is exercised: it serves
the endpoints `huggingface_hub.snapshot_download` uses, for repos added with `add_repo`, and
lists them (tag filters, newest first, linked pages):

- `GET /api/models`, `GET /api/models/{org}/{name}[/revision/{rev}]` (model info),
  `GET /api/models/{org}/{name}/tree/{rev}` (files),
  `HEAD|GET /{org}/{name}/resolve/{rev}/{file}` (the file, with `X-Repo-Commit` and `ETag`).

Every request's path and Authorization header are kept in `requests`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlencode, urlsplit

import httpx
import pytest_httpx2  # noqa: F401  (registers respx's httpcore2 mocker)
import respx

RECORDED = Path(__file__).parent / "data" / "hub_list_models.json"
REPLAY_ENDPOINT = "https://huggingface.co"


@contextlib.contextmanager
def replay_hub(monkeypatch: Any, fail: list[Any] = ()) -> Iterator[respx.Route]:
    """The recorded Hub listing behind huggingface_hub (offline mode lifted for the test); the
    route's `calls` are the requests seen. Anything not recorded is refused, never sent."""
    from huggingface_hub import constants

    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", REPLAY_ENDPOINT)
    answers = {}
    for item in json.loads(RECORDED.read_text())["interactions"]:
        req, resp = item["request"], item["response"]
        key = (req["params"].get("filter"), req["params"].get("cursor"))
        answers[key] = httpx.Response(resp["status"], headers=resp["headers"], json=resp["json"])
    pending = list(fail)

    def answer(request: httpx.Request) -> httpx.Response:
        if pending:
            failure = pending.pop(0)
            if isinstance(failure, Exception):
                raise failure
            return failure
        key = (request.url.params.get("filter"), request.url.params.get("cursor"))
        return answers.get(key, httpx.Response(404, json={"error": "not recorded"}))

    with respx.mock(using="httpcore2", base_url=REPLAY_ENDPOINT) as router:
        yield router.get("/api/models").mock(side_effect=answer)


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    repo: str
    sha: str
    folder: Path
    files: dict[str, bytes] = field(default_factory=dict)


@dataclass
class SeenRequest:
    method: str
    path: str
    authorization: str | None


class FakeHub:
    """The server; a context manager that starts and stops it in a thread."""

    def __init__(self, models: list[dict[str, Any]] | None = None, page_size: int = 2) -> None:
        self.models = list(models or [])
        self.page_size = page_size
        self.repos: dict[str, FakeRepo] = {}
        self.requests: list[SeenRequest] = []
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._server.hub = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def use(self, monkeypatch: Any) -> None:
        """Point huggingface_hub at this server and lift offline mode, for one test."""
        from huggingface_hub import constants

        monkeypatch.setenv("HF_ENDPOINT", self.url)
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(name, raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", self.url)
        monkeypatch.setattr(
            constants,
            "HUGGINGFACE_CO_URL_TEMPLATE",
            self.url + "/{repo_id}/resolve/{revision}/{filename}",
        )
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def add_repo(
        self, repo: str, folder: Path, tags: tuple[str, ...] = (), created_at: str | None = None
    ) -> str:
        """Serve `folder` as `repo`; list it too if `tags` are given. Returns its commit sha."""
        files = {
            p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(Path(folder).rglob("*"))
            if p.is_file()
        }
        digest = hashlib.sha1()
        for name, data in files.items():
            digest.update(name.encode() + git_blob_sha(data).encode())
        sha = digest.hexdigest()
        self.repos[repo] = FakeRepo(repo=repo, sha=sha, folder=Path(folder), files=files)
        if tags:
            item = {"_id": sha[:24], "id": repo, "sha": sha, "tags": list(tags)}
            item["createdAt"] = created_at or "2026-01-01T00:00:00.000Z"
            self.models.append(item)
        return sha

    # -- routes -------------------------------------------------------------------------------

    def list_models(self, query: dict[str, list[str]]) -> tuple[list[dict[str, Any]], str | None]:
        wanted = query.get("filter", [])
        items = [m for m in self.models if all(tag in m.get("tags", []) for tag in wanted)]
        if query.get("sort", [""])[0] == "createdAt":
            items.sort(key=lambda m: m.get("createdAt", ""), reverse=True)
        limit = min(int(query.get("limit", [self.page_size])[0]), self.page_size)
        offset = int(query.get("offset", ["0"])[0])
        page = items[offset : offset + limit]
        next_url = None
        if offset + limit < len(items):
            rest = {k: v for k, v in query.items() if k != "offset"}
            rest["offset"] = [str(offset + limit)]
            next_url = f"{self.url}/api/models?{urlencode(rest, doseq=True)}"
        return page, next_url

    def find(self, repo: str, rev: str) -> FakeRepo | None:
        found = self.repos.get(repo)
        if found is None or rev not in (found.sha, "main"):
            return None
        return found


def _split_repo(rest: str, marker: str) -> tuple[str, str, str] | None:
    """'org/name/<marker>/rev/file...' -> (repo, rev, remainder)."""
    parts = rest.split("/")
    if len(parts) < 4 or parts[2] != marker:
        return None
    return f"{parts[0]}/{parts[1]}", unquote(parts[3]), "/".join(parts[4:])


class _Handler(BaseHTTPRequestHandler):
    """Routes one request to the FakeHub that owns the server."""

    @property
    def hub(self) -> FakeHub:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: Any) -> None:  # quiet test output
        return

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    def _route(self, head: bool) -> None:
        url = urlsplit(self.path)
        self.hub.requests.append(
            SeenRequest(self.command, url.path, self.headers.get("Authorization"))
        )
        if url.path == "/api/models":
            page, next_url = self.hub.list_models(parse_qs(url.query))
            headers = {"Link": f'<{next_url}>; rel="next"'} if next_url else {}
            return self._json(page, headers)
        if url.path.startswith("/api/models/"):
            return self._api_repo(url.path[len("/api/models/") :])
        return self._resolve(url.path.lstrip("/"), head)

    def _api_repo(self, rest: str) -> None:
        if rest.count("/") == 1:  # /api/models/{org}/{name}: the main revision
            rest = f"{rest}/revision/main"
        for marker in ("revision", "tree"):
            parsed = _split_repo(rest, marker)
            if parsed and (repo := self.hub.find(parsed[0], parsed[1])):
                if marker == "revision":
                    siblings = [{"rfilename": name} for name in repo.files]
                    info = {"id": repo.repo, "sha": repo.sha, "siblings": siblings}
                    return self._json({**info, "private": False, "tags": []})
                tree = [
                    {"type": "file", "oid": git_blob_sha(d), "size": len(d), "path": n}
                    for n, d in repo.files.items()
                ]
                return self._json(tree)
        self._send(404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"})

    def _resolve(self, rest: str, head: bool) -> None:
        parsed = _split_repo(rest, "resolve")
        repo = self.hub.find(parsed[0], parsed[1]) if parsed else None
        data = repo.files.get(parsed[2]) if repo and parsed else None
        if repo is None or data is None:
            return self._send(404, b"not found", {"X-Error-Code": "EntryNotFound"})
        headers = {"X-Repo-Commit": repo.sha, "ETag": f'"{git_blob_sha(data)}"'}
        self._send(200, b"" if head else data, headers, length=len(data))

    def _json(self, obj: Any, headers: dict[str, str] | None = None) -> None:
        body = json.dumps(obj).encode()
        self._send(200, body, {"Content-Type": "application/json", **(headers or {})})

    def _send(
        self, status: int, body: bytes, headers: dict[str, str], length: int | None = None
    ) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body) if length is None else length))
        self.end_headers()
        if body:
            self.wfile.write(body)
