"""Hugging Face Hub webhooks -> `lssf.finetune.discovered`: the receiver behind `lssf webhook`.

Prefect's open-source server has no webhook endpoint, so this FastAPI app takes the Hub's
deliveries (https://huggingface.co/docs/hub/webhooks) and emits the polling watcher's event
(the watcher stays as the safety net). Anything but a commit on main of a watched family's
fine-tune or adapter is answered 200 `{"ignored": reason}`, as the Hub retries only failed
deliveries; a failed Hub lookup or event is 503, so that it retries. Logs name the repo,
revision and decision; never the secret or the body.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from huggingface_hub import ModelInfo
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from starlette.concurrency import run_in_threadpool

from tasks.config import PipelineConfig
from tasks.lineage import bare_id, lineage_of
from tasks.sources import Candidate

logger = logging.getLogger(__name__)

SECRET_HEADER = "X-Webhook-Secret"
MAX_BODY_BYTES = 64 * 1024  # a Hub delivery is a few KiB
MAIN_REF = "refs/heads/main"
CONTENT_SCOPE = "repo.content"
_SHA = re.compile(r"[0-9a-f]{40}")
_REPO = re.compile(r"(?:[\w.-]+/)?[\w.-]+")


class BadPayload(ValueError):
    """The body is JSON but not a Hub webhook payload."""


class BodyTooLarge(ValueError):
    """The body is longer than the receiver's bound."""


@dataclass(frozen=True)
class Watched:
    """One family as the receiver sees it: whose descendants it wants, of which lineages."""

    family: str
    base_model: str
    lineages: tuple[str, ...]


def watched_families(config: PipelineConfig) -> list[Watched]:
    """The families whose watch source is the Hub, with the base id the watcher filters on."""
    return [
        Watched(name, bare_id(fam.watch.base_model or fam.aligned), tuple(fam.watch.lineages))
        for name, fam in config.families.items()
        if fam.watch.kind == "hub"
    ]


def parse_push(payload: Any) -> tuple[str, str] | str:
    """The (repo, sha) a delivery announces, or why it is ignored; BadPayload if not the Hub's.

    The Hub's documented shape: `event` {action, scope}, `repo` {type, name, headSha, ...} and,
    on code changes, `updatedRefs` [{ref, oldSha, newSha}] (newSha null: the ref was deleted).
    A narrower scope than `repo.content` (the Hub may add some) counts as `repo.content`.
    """
    if not isinstance(payload, dict):
        raise BadPayload("not a Hub webhook payload: the body is not a JSON object")
    event, repo = payload.get("event"), payload.get("repo")
    if not isinstance(event, dict) or not isinstance(repo, dict):
        raise BadPayload("not a Hub webhook payload: 'event' and 'repo' must be objects")
    scope, action = event.get("scope"), event.get("action")
    if not isinstance(scope, str) or not (scope + ".").startswith(CONTENT_SCOPE + "."):
        return f"event.scope {scope!r} is not {CONTENT_SCOPE!r}"
    if action != "update":
        return f"event.action {action!r} is not 'update'"
    if repo.get("type") != "model":
        return f"repo.type {repo.get('type')!r} is not 'model'"
    name = repo.get("name")
    if not isinstance(name, str) or not _REPO.fullmatch(name):
        raise BadPayload(f"repo.name {name!r} is not a Hub repo id")
    refs = payload.get("updatedRefs", [])
    if not isinstance(refs, list):
        raise BadPayload("updatedRefs must be a list")
    main = next((r for r in refs if isinstance(r, dict) and r.get("ref") == MAIN_REF), None)
    if main is None:
        return f"no update of {MAIN_REF}"
    sha = main.get("newSha")
    if sha is None:
        return f"{MAIN_REF} was deleted"
    if not isinstance(sha, str) or not _SHA.fullmatch(sha):
        raise BadPayload(f"updatedRefs[{MAIN_REF}].newSha {sha!r} is not a commit sha")
    return name, sha


class SeenStore:
    """Which repo@sha were announced to which family: a SQLite file, safe across processes.

    `claim` marks a delivery pending (only one caller wins), `confirm` records it sent,
    `release` forgets a claim whose send failed so the Hub's retry can try again. A claim left
    pending by a crash is taken over after `stale_seconds`.
    """

    def __init__(self, path: Path, stale_seconds: float = 300.0) -> None:
        self.path = Path(path)
        self.stale_seconds = stale_seconds
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._execute(
            "CREATE TABLE IF NOT EXISTS announced (key TEXT NOT NULL, family TEXT NOT NULL, "
            "state TEXT NOT NULL, event_id TEXT, at REAL NOT NULL, PRIMARY KEY (key, family))"
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


async def read_bounded(request: Request, limit: int) -> bytes:
    """The request body, read chunk by chunk; BodyTooLarge as soon as it passes `limit`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"body of {declared} bytes exceeds {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise BodyTooLarge(f"body exceeds {limit} bytes")
    return bytes(body)


def _reply(status: int, **body: Any) -> JSONResponse:
    return JSONResponse(body, status_code=status)


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

    def __post_init__(self) -> None:
        self.watched = watched_families(self.config)

    async def deliver(self, request: Request) -> JSONResponse:
        given = request.headers.get(SECRET_HEADER)
        if given is None:
            logger.warning("delivery refused: no %s header", SECRET_HEADER)
            return _reply(401, error=f"missing {SECRET_HEADER} header")
        # In constant time; the header's bytes as HTTP carries them (latin-1).
        if not hmac.compare_digest(given.encode("latin-1"), self.secret.encode("utf-8")):
            logger.warning("delivery refused: wrong %s", SECRET_HEADER)
            return _reply(401, error=f"wrong {SECRET_HEADER}")
        try:
            payload = json.loads(await read_bounded(request, self.max_body))
        except BodyTooLarge as exc:
            logger.warning("delivery refused: %s", exc)
            return _reply(413, error=f"body larger than {self.max_body} bytes")
        except (UnicodeDecodeError, json.JSONDecodeError):
            logger.warning("delivery refused: body is not JSON")
            return _reply(400, error="body is not JSON")
        try:
            push = parse_push(payload)
        except BadPayload as exc:
            logger.warning("delivery refused: %s", exc)
            return _reply(400, error=str(exc))
        if isinstance(push, str):
            logger.info("delivery ignored: %s", push)
            return _reply(200, ignored=push)
        return await self.announce(*push)

    async def announce(self, name: str, sha: str) -> JSONResponse:
        try:
            info = await run_in_threadpool(self.model_info, name, sha)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            logger.info("delivery ignored: %s@%s not found on the Hub", name, sha)
            return _reply(200, ignored=f"{name}@{sha} not found on the Hub")
        except Exception as exc:  # the Hub or the network: let the Hub retry the delivery
            logger.warning("model_info(%s@%s) failed: %s", name, sha, type(exc).__name__)
            return _reply(503, error="Hub lookup failed; retry later")
        repo = info.id or name  # the Hub's spelling, as the watcher's listing has it
        matches = [
            (w, lin) for w in self.watched if (lin := lineage_of(info, w.base_model, w.lineages))
        ]
        if not matches:
            logger.info("delivery ignored: %s is no watched fine-tune or adapter", repo)
            return _reply(200, ignored=f"{repo} is not a fine-tune or adapter of a watched family")
        emitted, repeated = [], []
        for watched, lineage in matches:
            cand = Candidate(repo=repo, revision=sha, lineage=lineage)
            if not self.seen.claim(cand.key, watched.family):
                repeated.append(watched.family)
                continue
            try:
                event_id = await self.emit(cand, watched.family, self.config_ref)
            except Exception as exc:
                self.seen.release(cand.key, watched.family)
                logger.warning("event for %s failed: %s: %s", cand.key, type(exc).__name__, exc)
                return _reply(503, error="could not send the event to Prefect; retry later")
            self.seen.confirm(cand.key, watched.family, event_id)
            logger.info("announced %s (%s) to family %s", cand.key, lineage, watched.family)
            emitted.append({"family": watched.family, "lineage": lineage, "event_id": event_id})
        if not emitted:
            logger.info("delivery ignored: %s@%s already announced", repo, sha)
            return _reply(200, ignored=f"{repo}@{sha} already announced", families=repeated)
        return _reply(202, emitted=emitted, already_announced=repeated)


def create_app(receiver: Receiver, path: str = "/webhook") -> FastAPI:
    """The ASGI app: POST `path` takes deliveries, GET /health says it is up."""
    app = FastAPI(
        title="lssf Hub webhook receiver", docs_url=None, redoc_url=None, openapi_url=None
    )
    app.post(path)(receiver.deliver)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
