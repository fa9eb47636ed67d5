"""Hugging Face Hub webhooks -> `lssf.finetune.discovered`: the receiver behind `lssf webhook`.

Prefect's open-source server has no webhook endpoint, so this small FastAPI app takes the Hub's
deliveries (https://huggingface.co/docs/hub/webhooks) and emits the same event as the polling
watcher; the realign deployment's trigger does the rest. The watcher stays as the safety net.

One delivery, in order:
1. `X-Webhook-Secret` equals the shared secret (constant time), else 401;
2. the body is at most `max_body` bytes (read in chunks, stopped past the bound), else 413;
   JSON in the Hub's shape, else 400;
3. a commit on `refs/heads/main` of a model repo (`event.scope` `repo.content`), else 200
   `{"ignored": reason}`: the Hub retries only failed deliveries;
4. `model_info(repo, sha)` and `tasks.lineage.lineage_of` against every family that watches
   the Hub: the watcher's rule. An unknown repo or revision is ignored; a Hub failure is 503,
   so the Hub retries;
5. per matching family, once per repo@sha: claim it in the seen store, send the event (its id
   is a uuid5 of repo@sha and family), record it; 202 with what was emitted.

Logs name the repo, revision and decision; never the secret or the body.
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

ModelInfoFn = Callable[[str, str], ModelInfo]  # (repo, revision) -> ModelInfo
Emitter = Callable[[Candidate, str, str], Awaitable[str]]  # (candidate, family, config) -> id


class BadPayload(ValueError):
    """The body is JSON but not a Hub webhook payload."""


class BodyTooLarge(ValueError):
    """The body is longer than the receiver's bound."""


@dataclass(frozen=True)
class Push:
    """A new commit on the main branch of a Hub model repo."""

    repo: str
    sha: str


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


def parse_push(payload: Any) -> Push | str:
    """The commit a delivery announces, or why it is ignored; BadPayload if not the Hub's shape.

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
    return Push(repo=name, sha=sha)


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
        with self._connect() as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS announced (key TEXT NOT NULL, family TEXT NOT NULL, "
                "state TEXT NOT NULL, event_id TEXT, at REAL NOT NULL, PRIMARY KEY (key, family))"
            )

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30.0, isolation_level=None)

    def claim(self, key: str, family: str) -> bool:
        now = time.time()
        with self._connect() as db:
            cur = db.execute(
                "INSERT INTO announced (key, family, state, at) VALUES (?, ?, 'pending', ?) "
                "ON CONFLICT (key, family) DO UPDATE SET at = excluded.at "
                "WHERE state = 'pending' AND at < ?",
                (key, family, now, now - self.stale_seconds),
            )
            return cur.rowcount == 1

    def confirm(self, key: str, family: str, event_id: str) -> None:
        with self._connect() as db:
            db.execute(
                "UPDATE announced SET state = 'sent', event_id = ?, at = ? "
                "WHERE key = ? AND family = ?",
                (event_id, time.time(), key, family),
            )

    def release(self, key: str, family: str) -> None:
        with self._connect() as db:
            db.execute(
                "DELETE FROM announced WHERE key = ? AND family = ? AND state = 'pending'",
                (key, family),
            )

    def sent(self) -> list[tuple[str, str, str]]:
        """(key, family, event_id) of every announced delivery, oldest first."""
        with self._connect() as db:
            rows = db.execute(
                "SELECT key, family, event_id FROM announced WHERE state = 'sent' ORDER BY at"
            )
            return [tuple(r) for r in rows]


def secret_matches(given: str | None, secret: str) -> bool:
    """Constant-time comparison of the header (latin-1, as HTTP carries it) with the secret."""
    if given is None:
        return False
    return hmac.compare_digest(given.encode("latin-1"), secret.encode("utf-8"))


async def read_bounded(request: Request, limit: int) -> bytes:
    """The request body, read chunk by chunk; BodyTooLarge as soon as it passes `limit`."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(f"body of {declared} bytes exceeds {limit}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _reply(status: int, **body: Any) -> JSONResponse:
    return JSONResponse(body, status_code=status)


@dataclass
class Receiver:
    """Everything one delivery needs; `model_info` and `emit` are injectable (tests, no net)."""

    config: PipelineConfig
    config_ref: str  # the pipeline YAML as the realign workers should read it
    secret: str
    seen: SeenStore
    model_info: ModelInfoFn
    emit: Emitter
    max_body: int = MAX_BODY_BYTES

    def __post_init__(self) -> None:
        self.watched = watched_families(self.config)

    async def deliver(self, request: Request) -> JSONResponse:
        if request.headers.get(SECRET_HEADER) is None:
            logger.warning("delivery refused: no %s header", SECRET_HEADER)
            return _reply(401, error=f"missing {SECRET_HEADER} header")
        if not secret_matches(request.headers.get(SECRET_HEADER), self.secret):
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
        return await self.announce(push)

    async def announce(self, push: Push) -> JSONResponse:
        try:
            info = await run_in_threadpool(self.model_info, push.repo, push.sha)
        except (RepositoryNotFoundError, RevisionNotFoundError):
            logger.info("delivery ignored: %s@%s not found on the Hub", push.repo, push.sha)
            return _reply(200, ignored=f"{push.repo}@{push.sha} not found on the Hub")
        except Exception as exc:  # the Hub or the network: let the Hub retry the delivery
            logger.warning("model_info(%s@%s) failed: %s", push.repo, push.sha, type(exc).__name__)
            return _reply(503, error="Hub lookup failed; retry later")
        repo = info.id or push.repo  # the Hub's spelling, as the watcher's listing has it
        matches = [
            (w, lin) for w in self.watched if (lin := lineage_of(info, w.base_model, w.lineages))
        ]
        if not matches:
            logger.info("delivery ignored: %s is no watched fine-tune or adapter", repo)
            return _reply(200, ignored=f"{repo} is not a fine-tune or adapter of a watched family")
        emitted, repeated = [], []
        for watched, lineage in matches:
            cand = Candidate(repo=repo, revision=push.sha, lineage=lineage)
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
            logger.info("delivery ignored: %s@%s already announced", repo, push.sha)
            return _reply(200, ignored=f"{repo}@{push.sha} already announced", families=repeated)
        return _reply(202, emitted=emitted, already_announced=repeated)


def create_app(receiver: Receiver, path: str = "/webhook") -> FastAPI:
    """The ASGI app: POST `path` takes deliveries, GET /health says it is up."""
    app = FastAPI(
        title="lssf Hub webhook receiver", docs_url=None, redoc_url=None, openapi_url=None
    )

    @app.post(path)
    async def webhook(request: Request) -> JSONResponse:
        return await receiver.deliver(request)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app
