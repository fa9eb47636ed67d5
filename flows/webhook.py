"""Hugging Face Hub webhooks -> `lssf.finetune.discovered`: the receiver behind `lssf webhook`.

Prefect's open-source server has no webhook endpoint, hence this FastAPI app. Anything but a
commit on main of a watched family's fine-tune or adapter is 200 `{"ignored": reason}` (the Hub
retries only failures); a failed Hub lookup or event is 503, so that it retries. Logs never
hold the secret or the body.
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

from fastapi import FastAPI, HTTPException, Request
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


def watched_families(config: PipelineConfig) -> dict[str, tuple[str, tuple[str, ...]]]:
    """Family -> (base id the watcher filters on, lineages) of the families watching the Hub."""
    return {
        name: (bare_id(fam.watch.base_model or fam.aligned), fam.watch.lineages)
        for name, fam in config.families.items()
        if fam.watch.kind == "hub"
    }


def parse_push(body: bytes) -> tuple[str, str] | str:
    """The (repo, sha) a delivery announces, or why it is ignored; 400 if it is not the Hub's.

    The Hub's documented shape: `event` {action, scope}, `repo` {type, name, headSha, ...} and,
    on code changes, `updatedRefs` [{ref, oldSha, newSha}] (newSha null: the ref was deleted).
    A narrower scope than `repo.content` (the Hub may add some) counts as `repo.content`.
    """
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise HTTPException(400, "body is not JSON") from None
    if not isinstance(payload, dict):
        raise HTTPException(400, "not a Hub webhook payload: the body is not a JSON object")
    event, repo = payload.get("event"), payload.get("repo")
    if not isinstance(event, dict) or not isinstance(repo, dict):
        raise HTTPException(400, "not a Hub webhook payload: 'event' and 'repo' must be objects")
    scope, action = event.get("scope"), event.get("action")
    if not isinstance(scope, str) or not (scope + ".").startswith(CONTENT_SCOPE + "."):
        return f"event.scope {scope!r} is not {CONTENT_SCOPE!r}"
    if action != "update":
        return f"event.action {action!r} is not 'update'"
    if repo.get("type") != "model":
        return f"repo.type {repo.get('type')!r} is not 'model'"
    name = repo.get("name")
    if not isinstance(name, str) or not _REPO.fullmatch(name):
        raise HTTPException(400, f"repo.name {name!r} is not a Hub repo id")
    refs = payload.get("updatedRefs", [])
    if not isinstance(refs, list):
        raise HTTPException(400, "updatedRefs must be a list")
    main = next((r for r in refs if isinstance(r, dict) and r.get("ref") == MAIN_REF), None)
    if main is None:
        return f"no update of {MAIN_REF}"
    sha = main.get("newSha")
    if sha is None:
        return f"{MAIN_REF} was deleted"
    if not isinstance(sha, str) or not _SHA.fullmatch(sha):
        raise HTTPException(400, f"updatedRefs[{MAIN_REF}].newSha {sha!r} is not a commit sha")
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
    """The request body, read chunk by chunk; 413 as soon as it passes `limit`."""
    too_large = HTTPException(413, f"body larger than {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


def _ignored(reason: str, **body: Any) -> JSONResponse:
    logger.info("delivery ignored: %s", reason)
    return JSONResponse({"ignored": reason, **body})


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

    async def deliver(self, request: Request) -> JSONResponse:
        given = request.headers.get(SECRET_HEADER)
        try:
            if given is None:
                raise HTTPException(401, f"missing {SECRET_HEADER} header")
            # In constant time; the header's bytes as HTTP carries them (latin-1).
            if not hmac.compare_digest(given.encode("latin-1"), self.secret.encode("utf-8")):
                raise HTTPException(401, f"wrong {SECRET_HEADER}")
            push = parse_push(await read_bounded(request, self.max_body))
            return _ignored(push) if isinstance(push, str) else await self.announce(*push)
        except HTTPException as exc:
            logger.warning("delivery answered %d: %s", exc.status_code, exc.detail)
            return JSONResponse({"error": exc.detail}, exc.status_code)

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
                logger.warning("event for %s failed: %s: %s", cand.key, type(exc).__name__, exc)
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
