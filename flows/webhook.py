"""Hugging Face Hub webhooks -> `lssf.finetune.discovered`: the receiver behind `lssf webhook`.

Prefect's open-source server has no webhook endpoint, hence this FastAPI app. Anything but a
commit on main of a watched family's fine-tune or adapter is 200 `{"ignored": reason}` (the Hub
retries only failures); a failed Hub lookup or event is 503, so that it retries. Logs never
hold the secret or the body: only the repo, the revision and the decision, in bounded lines.

Behind a timeout (`server_config`): a request head must arrive within `HEADER_TIMEOUT_S` and a
body within `BODY_TIMEOUT_S`, at most `MAX_PENDING` connections may be sending a head at once
(more are closed on arrival), and every refusal closes its connection. The body is parsed by
`lssf.bounded.loads_json` (depth and number sizes capped: 400, never 500).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from huggingface_hub import ModelInfo
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from lssf.bounded import BoundedInputError, loads_json, short_repr
from lssf.errors import ConfigError
from lssf.report import safe_text
from tasks.config import PipelineConfig
from tasks.lineage import bare_id, lineage_of
from tasks.sources import Candidate

logger = logging.getLogger(__name__)

SECRET_HEADER = "X-Webhook-Secret"
MAX_BODY_BYTES = 64 * 1024  # a Hub delivery is a few KiB
MAIN_REF = "refs/heads/main"
CONTENT_SCOPE = "repo.content"
_SHA = re.compile(r"[0-9a-f]{40}")
_REPO = re.compile(r"(?:[\w.-]{1,96}/)?[\w.-]{1,96}")  # the Hub caps each part at 96
HEADER_TIMEOUT_S = 10.0  # a request head (line and headers) must arrive within this
BODY_TIMEOUT_S = 10.0  # and an authenticated body within this (a Hub delivery: milliseconds)
MAX_PENDING = 64  # connections still sending their head; more are closed at once
MAX_LOG_ARG = 300  # characters of any one logged value (uvicorn's access-log path included)
CLOSE = {"Connection": "close"}  # every refusal ends its connection: no lingering client


def watched_families(config: PipelineConfig) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Family -> (base id the watcher filters on, lineages) of the families watching the Hub."""
    return {
        name: (bare_id(fam.watch.base_model or fam.aligned), fam.watch.lineages)
        for name, fam in config.families.items()
        if fam.watch.kind == "hub"
    }


@dataclass(frozen=True)
class Ignored:
    """Why a delivery is ignored: `reply` may quote the body's value (cut short) to the
    sender; `log` never holds a body field."""

    field: str
    rule: str
    value: object = None
    quote: bool = True

    @property
    def reply(self) -> str:
        return f"{self.field} {short_repr(self.value, 60)} {self.rule}" if self.quote else self.log

    @property
    def log(self) -> str:
        return f"{self.field} {self.rule}"


def parse_push(body: bytes) -> tuple[str, str] | Ignored:
    """The (repo, sha) a delivery announces, or why it is ignored; 400 if it is not the Hub's.

    The Hub's documented shape: `event` {action, scope}, `repo` {type, name, headSha, ...} and,
    on code changes, `updatedRefs` [{ref, oldSha, newSha}] (newSha null: the ref was deleted).
    A narrower scope than `repo.content` (the Hub may add some) counts as `repo.content`.
    Error messages never quote the body: they are logged.
    """
    try:
        payload = loads_json(body)
    except BoundedInputError as err:
        raise HTTPException(400, f"body is not usable JSON: {err}") from None
    if not isinstance(payload, dict):
        raise HTTPException(400, "not a Hub webhook payload: the body is not a JSON object")
    event, repo = payload.get("event"), payload.get("repo")
    if not isinstance(event, dict) or not isinstance(repo, dict):
        raise HTTPException(400, "not a Hub webhook payload: 'event' and 'repo' must be objects")
    scope, action = event.get("scope"), event.get("action")
    if not isinstance(scope, str) or not (scope + ".").startswith(CONTENT_SCOPE + "."):
        return Ignored("event.scope", f"is not {CONTENT_SCOPE!r}", scope)
    if action != "update":
        return Ignored("event.action", "is not 'update'", action)
    if repo.get("type") != "model":
        return Ignored("repo.type", "is not 'model'", repo.get("type"))
    name = repo.get("name")
    if not isinstance(name, str) or not _REPO.fullmatch(name):
        raise HTTPException(400, "repo.name is not a Hub repo id")
    refs = payload.get("updatedRefs", [])
    if not isinstance(refs, list):
        raise HTTPException(400, "updatedRefs must be a list")
    main = next((r for r in refs if isinstance(r, dict) and r.get("ref") == MAIN_REF), None)
    if main is None:
        return Ignored("updatedRefs", f"hold no update of {MAIN_REF}", quote=False)
    sha = main.get("newSha")
    if sha is None:
        return Ignored(MAIN_REF, "was deleted", quote=False)
    if not isinstance(sha, str) or not _SHA.fullmatch(sha):
        raise HTTPException(400, f"updatedRefs[{MAIN_REF}].newSha is not a commit sha")
    return name, sha


class SeenStore:
    """Which repo@sha were announced to which family: a SQLite file, safe across processes.

    `claim` marks a delivery pending (only one caller wins), `confirm` records it sent,
    `release` forgets a claim whose send failed so the Hub's retry can try again. A claim left
    pending by a crash is taken over after `stale_seconds`.
    """

    COLUMNS = ("key", "family", "state", "event_id", "at")

    def __init__(self, path: Path, stale_seconds: float = 300.0) -> None:
        self.path = Path(path)
        self.stale_seconds = stale_seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._open_checked()

    def _open_checked(self) -> None:
        """Create the table, or check the file's: a ConfigError (exit 2) names a file that is
        no SQLite database or holds another table, rather than a traceback per delivery."""
        advice = "move it aside (event ids are deterministic: a replay is stored once)"
        try:
            if self._execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise ConfigError(f"seen-delivery store {self.path} is damaged; {advice}")
            self._execute(
                "CREATE TABLE IF NOT EXISTS announced (key TEXT NOT NULL, family TEXT NOT NULL, "
                "state TEXT NOT NULL, event_id TEXT, at REAL NOT NULL, PRIMARY KEY (key, family))"
            )
            columns = tuple(r[1] for r in self._execute("PRAGMA table_info(announced)"))
        except sqlite3.Error as err:
            raise ConfigError(
                f"seen-delivery store {self.path} is not a usable SQLite database "
                f"({safe_text(err, 100, markup=False)}); {advice}"
            ) from None
        if columns != self.COLUMNS:
            raise ConfigError(
                f"seen-delivery store {self.path}: table 'announced' has columns "
                f"{short_repr(columns)}, not {self.COLUMNS}; {advice}"
            )

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Cursor:
        with sqlite3.connect(self.path, timeout=30.0, isolation_level=None) as db:
            return db.execute(sql, params)

    def claim(self, key: str, family: str) -> bool:
        now = time.time()
        cur = self._execute(
            "INSERT INTO announced (key, family, state, at) VALUES (?, ?, 'pending', ?) "
            "ON CONFLICT (key, family) DO UPDATE SET at = excluded.at "
            "WHERE state = 'pending' AND at < ?",
            (key, family, now, now - self.stale_seconds),
        )
        return cur.rowcount == 1

    def confirm(self, key: str, family: str, event_id: str) -> None:
        self._execute(
            "UPDATE announced SET state = 'sent', event_id = ?, at = ? "
            "WHERE key = ? AND family = ?",
            (event_id, time.time(), key, family),
        )

    def release(self, key: str, family: str) -> None:
        self._execute(
            "DELETE FROM announced WHERE key = ? AND family = ? AND state = 'pending'",
            (key, family),
        )

    def sent(self) -> list[tuple[str, str, str]]:
        """(key, family, event_id) of every announced delivery, oldest first."""
        sql = "SELECT key, family, event_id FROM announced WHERE state = 'sent' ORDER BY at"
        return [tuple(r) for r in self._execute(sql)]


async def read_bounded(request: Request, limit: int, timeout: float = BODY_TIMEOUT_S) -> bytes:
    """The request body, read chunk by chunk; 413 as soon as it passes `limit`, 408 when it
    has not all arrived within `timeout` seconds (a slow sender holds no connection)."""
    too_large = HTTPException(413, f"body larger than {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared[:20]) > limit:
        raise too_large
    body = bytearray()
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                body += chunk
                if len(body) > limit:
                    raise too_large
    except TimeoutError:
        raise HTTPException(408, f"body not received within {timeout:g} s") from None
    return bytes(body)


def _ignored(reason: Ignored | str, **body: Any) -> JSONResponse:
    """200 `{"ignored": ...}`; the log line holds no body field (`Ignored.log`)."""
    reply, log = (reason.reply, reason.log) if isinstance(reason, Ignored) else (reason, reason)
    logger.info("delivery ignored: %s", log)
    return JSONResponse({"ignored": reply, **body})


@dataclass
class Receiver:
    """Everything one delivery needs; `model_info` and `emit` are injectable (tests, no net)."""

    config: PipelineConfig
    config_ref: str  # the pipeline YAML as the realign workers should read it
    secret: str
    seen: SeenStore
    model_info: Callable[[str, str], ModelInfo]  # (repo, revision) -> ModelInfo
    emit: Callable[[Candidate, str, str], Awaitable[str]]  # (candidate, family, config) -> id
    max_body: int = MAX_BODY_BYTES
    body_timeout: float = BODY_TIMEOUT_S

    async def deliver(self, request: Request) -> JSONResponse:
        given = request.headers.get(SECRET_HEADER)
        try:
            if given is None:
                raise HTTPException(401, f"missing {SECRET_HEADER} header")
            # In constant time; the header's bytes as HTTP carries them (latin-1).
            if not hmac.compare_digest(given.encode("latin-1"), self.secret.encode("utf-8")):
                raise HTTPException(401, f"wrong {SECRET_HEADER}")
            push = parse_push(await read_bounded(request, self.max_body, self.body_timeout))
            return _ignored(push) if isinstance(push, Ignored) else await self.announce(*push)
        except HTTPException as exc:
            logger.warning("delivery answered %d: %s", exc.status_code, exc.detail)
            return JSONResponse({"error": exc.detail}, exc.status_code, headers=CLOSE)
        except ClientDisconnect:  # the sender hung up mid-body: nothing to answer, no traceback
            logger.info("delivery abandoned: the client disconnected before its body was read")
            return JSONResponse({"error": "client disconnected"}, 400, headers=CLOSE)
        except sqlite3.Error as exc:  # the seen store (disk full, locked): the Hub retries
            logger.warning("seen-delivery store failed: %s", type(exc).__name__)
            detail = "could not record the delivery; retry later"
            return JSONResponse({"error": detail}, 503, headers=CLOSE)

    async def announce(self, name: str, sha: str) -> JSONResponse:
        try:
            info = await run_in_threadpool(self.model_info, name, sha)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            return _ignored(f"{name}@{sha} not found on the Hub")
        except Exception as exc:  # the Hub or the network: let the Hub retry the delivery
            logger.warning("model_info(%s@%s) failed: %s", name, sha, type(exc).__name__)
            raise HTTPException(503, "Hub lookup failed; retry later") from None
        repo = info.id or name  # the Hub's spelling, as the watcher's listing has it
        emitted, repeated = [], []
        for family, (base, lineages) in watched_families(self.config).items():
            if (lineage := lineage_of(info, base, lineages)) is None:
                continue
            cand = Candidate(repo=repo, revision=sha, lineage=lineage)
            if not self.seen.claim(cand.key, family):
                repeated.append(family)
                continue
            try:
                event_id = await self.emit(cand, family, self.config_ref)
            except Exception as exc:
                self.seen.release(cand.key, family)
                why = safe_text(exc, MAX_LOG_ARG, markup=False)
                logger.warning("event for %s failed: %s: %s", cand.key, type(exc).__name__, why)
                detail = "could not send the event to Prefect; retry later"
                raise HTTPException(503, detail) from None
            self.seen.confirm(cand.key, family, event_id)
            logger.info("announced %s (%s) to family %s", cand.key, lineage, family)
            emitted.append({"family": family, "lineage": lineage, "event_id": event_id})
        if not (emitted or repeated):
            return _ignored(f"{repo} is not a fine-tune or adapter of a watched family")
        if not emitted:
            return _ignored(f"{repo}@{sha} already announced", families=repeated)
        return JSONResponse({"emitted": emitted, "already_announced": repeated}, 202)


def create_app(receiver: Receiver, path: str = "/webhook") -> FastAPI:
    """The ASGI app: POST `path` takes deliveries, GET /health says it is up."""
    app = FastAPI(docs_url=None, redoc_url=None, openapi_url=None)
    app.post(path)(receiver.deliver)
    app.get("/health")(lambda: {"status": "ok"})
    return app


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on each request head and a cap on connections
    still sending one (uvicorn has neither: a half-sent request would hold its socket forever).

    Settings are class attributes (`guarded_protocol` makes a subclass with others).
    """

    header_timeout: float = HEADER_TIMEOUT_S
    max_pending: int = MAX_PENDING
    _head_timer: asyncio.TimerHandle | None = None
    _refused, _refusal_logged = 0, -1e9  # per protocol class: see _log_refusal

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        pending = sum(1 for c in self.connections if getattr(c, "_head_timer", None))
        super().connection_made(transport)
        if pending >= self.max_pending:  # a flood of idle sockets: refuse the newcomer
            transport.close()
            self._log_refusal()
            return
        self._watch_head()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._watch_head()

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    @classmethod
    def _log_refusal(cls) -> None:
        """One warning per 10 s however many connections a flood brings (logs stay small)."""
        cls._refused += 1
        if time.monotonic() - cls._refusal_logged >= 10.0:
            logger.warning(
                "%d connection(s) closed on arrival: %d are already sending a head",
                cls._refused,
                cls.max_pending,
            )
            cls._refused, cls._refusal_logged = 0, time.monotonic()

    def _watch_head(self) -> None:
        """Arm the deadline while a head is awaited (a new connection, or the next request on a
        kept-alive one once its first bytes arrive), disarm it once the head is in."""
        waiting = self.conn.their_state is h11.IDLE and not self.transport.is_closing()
        if waiting and self._head_timer is None:
            self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)
        elif not waiting:
            self._stop_head_timer()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            logger.info("connection closed: no request head within %g s", self.header_timeout)
            self.transport.close()


def guarded_protocol(header_timeout: float, max_pending: int) -> type[GuardedH11Protocol]:
    """`GuardedH11Protocol` with these settings (a subclass: settings never leak across apps)."""
    settings = {"header_timeout": header_timeout, "max_pending": max_pending}
    return type("GuardedH11Protocol", (GuardedH11Protocol,), settings)


class BoundedLogArgs(logging.Filter):
    """Log records' string arguments cut to `MAX_LOG_ARG` characters, control characters
    escaped: uvicorn's access line quotes the request path, which the client chooses."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(
                safe_text(a, MAX_LOG_ARG, markup=False) if isinstance(a, str) else a
                for a in record.args
            )
        return True


logger.addFilter(BoundedLogArgs())


def server_config(
    app: FastAPI,
    host: str,
    port: int,
    *,
    header_timeout: float = HEADER_TIMEOUT_S,
    max_pending: int = MAX_PENDING,
    log_level: str = "info",
) -> uvicorn.Config:
    """The uvicorn settings the receiver runs with: the guarded protocol, short keep-alive,
    bounded log lines (see the module docstring)."""
    base = uvicorn.config.LOGGING_CONFIG
    log_config = base | {
        "filters": {"bounded": {"()": BoundedLogArgs}},
        "loggers": {name: cfg | {"filters": ["bounded"]} for name, cfg in base["loggers"].items()},
    }
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        http=guarded_protocol(header_timeout, max_pending),
        timeout_keep_alive=5,
        log_level=log_level,
        log_config=log_config,
    )
