"""Watch sources: where candidate fine-tunes come from, each as repo@revision.

- `LocalFolderSource`: every sub-folder of a watch folder is one model; its revision is a hash
  of its file names and contents, so an edited model is a new candidate.
- `HubSource`: the Hub's lineage filters `base_model:finetune:<id>` and `base_model:adapter:<id>`,
  newest first, following the `Link: rel="next"` pages, backing off on 429/5xx/network errors.

No Prefect here; `tasks.watch_tasks` wraps these with retries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
from huggingface_hub import constants
from huggingface_hub.utils import build_hf_headers
from pydantic import BaseModel, ConfigDict

from lssf.sources import folder_revision
from lssf.st_io import file_sha256
from tasks.config import WatchConfig

logger = logging.getLogger(__name__)

RETRY_STATUS = (429, 500, 502, 503, 504)
MAX_WAIT_SECONDS = 60.0


class Candidate(BaseModel):
    """One fine-tuned model at one exact revision."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    repo: str  # Hub id, or the absolute path of a local folder
    revision: str  # Hub commit sha, or the content hash of a local folder
    lineage: str = "finetune"  # finetune | adapter | local
    created_at: str | None = None

    @property
    def key(self) -> str:
        """The identity the MLflow record uses: never processed or registered twice."""
        return f"{self.repo}@{self.revision}"

    @property
    def spec(self) -> str:
        """What lssf.resolve_source takes: a folder, or org/name@revision."""
        return self.repo if self.lineage == "local" else self.key


class HubUnavailableError(RuntimeError):
    """The Hub kept failing (429, 5xx or network) after every retry."""


def content_hash(folder: Path) -> str:
    """A local folder's revision: lssf's hash over its files' names and SHA-256s.

    Hidden files (caches, locks) are not part of the model.
    """
    files = {
        rel: file_sha256(path)
        for path in sorted(p for p in folder.rglob("*") if p.is_file())
        if not ((rel := path.relative_to(folder).as_posix()).startswith(".") or "/." in rel)
    }
    return folder_revision(files)


class LocalFolderSource:
    """Sub-folders of a watch folder that hold a config.json, newest (mtime) first."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser().resolve()

    def list(self, max_candidates: int = 20) -> list[Candidate]:
        if not self.path.is_dir():
            logger.warning("watch folder %s does not exist; no candidates", self.path)
            return []
        folders = [p for p in self.path.iterdir() if (p / "config.json").is_file()]
        folders.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        return [
            Candidate(repo=str(p), revision=content_hash(p), lineage="local")
            for p in folders[:max_candidates]
        ]


class HubSource:
    """Fine-tunes and adapters of `base_model` on the Hub (or HF_ENDPOINT), newest first."""

    def __init__(
        self,
        base_model: str,
        config: WatchConfig,
        endpoint: str | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.base_model = base_model.split("@", 1)[0]
        self.config = config
        self.endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
        self.sleep = sleep

    def list(self) -> list[Candidate]:
        if constants.is_offline_mode():
            raise HubUnavailableError("HF_HUB_OFFLINE is set: the Hub watch source cannot list")
        seen: dict[str, Candidate] = {}
        for lineage in self.config.lineages:
            for item in self._models(f"base_model:{lineage}:{self.base_model}"):
                cand = _candidate(item, lineage)
                if cand is not None and cand.key not in seen:
                    seen[cand.key] = cand
        # Each lineage comes newest first; merge them the same way.
        return sorted(seen.values(), key=lambda c: c.created_at or "", reverse=True)

    def _models(self, filter_tag: str) -> Iterator[dict[str, Any]]:
        params: dict[str, Any] | None = {
            "filter": filter_tag,
            "sort": "createdAt",
            "direction": -1,
            "limit": min(self.config.page_size, self.config.max_candidates),
            "expand": ["sha", "createdAt", "lastModified", "tags"],
        }
        url: str | None = f"{self.endpoint}/api/models"
        count = 0
        with httpx.Client(headers=build_hf_headers(), timeout=30.0) as client:
            while url is not None and count < self.config.max_candidates:
                response = self._get(client, url, params)
                for item in response.json():
                    if count >= self.config.max_candidates:
                        break
                    count += 1
                    yield item
                url = response.links.get("next", {}).get("url")
                params = None  # the next link carries the query

    def _get(self, client: httpx.Client, url: str, params: dict[str, Any] | None) -> httpx.Response:
        """GET with exponential backoff on 429/5xx/network errors (honours Retry-After)."""
        wait = self.config.backoff_seconds
        for attempt in range(self.config.max_retries + 1):
            try:
                response = client.get(url, params=params)
            except httpx.TransportError as exc:
                reason, retry_after = f"{type(exc).__name__}", None
            else:
                if response.status_code not in RETRY_STATUS:
                    response.raise_for_status()
                    return response
                reason = f"HTTP {response.status_code}"
                retry_after = _retry_after(response)
            if attempt == self.config.max_retries:
                break
            delay = min(retry_after if retry_after is not None else wait, MAX_WAIT_SECONDS)
            logger.warning("Hub listing: %s; retry %d in %.1f s", reason, attempt + 1, delay)
            self.sleep(delay)
            wait *= 2
        raise HubUnavailableError(
            f"Hub listing at {self.endpoint} failed after {self.config.max_retries + 1} "
            f"attempts ({reason})"
        )


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff


def _candidate(item: dict[str, Any], lineage: str) -> Candidate | None:
    repo, sha = item.get("id") or item.get("modelId"), item.get("sha")
    if not repo or not sha:
        logger.warning("Hub listing item without id or sha skipped: %r", item.get("id"))
        return None
    return Candidate(repo=repo, revision=sha, lineage=lineage, created_at=item.get("createdAt"))


def list_candidates(watch: WatchConfig, aligned: str) -> list[Candidate]:
    """Candidates of one family's watch source, newest first."""
    if watch.kind == "local":
        assert watch.path is not None  # guaranteed by WatchConfig's validator
        return LocalFolderSource(watch.path).list(watch.max_candidates)
    return HubSource(watch.base_model or aligned, watch).list()
