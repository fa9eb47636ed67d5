"""Watch sources: where candidate fine-tunes come from, each as repo@revision (no Prefect here).

A local folder's revision is its content hash, so an edited model is a new candidate.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx2
from huggingface_hub import HfApi, ModelInfo, constants
from huggingface_hub.errors import HfHubHTTPError

from lssf.errors import CheckpointError
from lssf.models import Frozen
from lssf.sources import ModelRef
from tasks.config import WatchConfig
from tasks.lineage import lineage_of

logger = logging.getLogger(__name__)


class Candidate(Frozen):
    """One fine-tuned model at one exact revision."""

    repo: str  # Hub id, or the absolute path of a local folder
    revision: str  # Hub commit sha, or the content revision of a local folder
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

    @classmethod
    def of(cls, ref: ModelRef) -> Candidate:
        """A pinned model reference as a candidate (a local folder's lineage is `local`)."""
        lineage = "local" if ref.is_local else "finetune"
        return cls(repo=ref.repo, revision=str(ref.revision), lineage=lineage)

    @property
    def ref(self) -> ModelRef:
        """The candidate as a pinned model reference."""
        kind = "local" if self.lineage == "local" else "hub"
        return ModelRef(repo=self.repo, revision=self.revision, kind=kind)


class HubUnavailableError(RuntimeError):
    """The Hub kept failing (429, 5xx or network) after the client's retries."""


class LocalFolderSource:
    """Sub-folders of a watch folder that hold a config.json, newest (mtime) first."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path).expanduser().resolve()

    def list(self, max_candidates: int = 20) -> list[Candidate]:
        if not self.path.is_dir():
            logger.warning("watch folder %s does not exist; no candidates", self.path)
            return []
        # A hidden folder is an unfinished copy (atomic_folder's temporary), never a model.
        folders = [p for p in self.path.iterdir() if not p.name.startswith(".")]
        folders = [p for p in folders if (p / "config.json").is_file()]
        folders.sort(key=lambda p: p.stat().st_mtime, reverse=True)
        found = []
        for folder in folders[:max_candidates]:
            try:
                found.append(Candidate.of(ModelRef.parse(folder).pin()))
            except CheckpointError as exc:  # one broken folder must not hide the others
                logger.warning("watch folder %s skipped: %s", folder, exc)
        return found


class HubSource:
    """Fine-tunes and adapters of `base_model` on the Hub (or HF_ENDPOINT), newest first, by
    the lineage filters; the Hub client's backoff (429/5xx/network) is the one retry layer."""

    def __init__(self, base_model: str, config: WatchConfig) -> None:
        self.base_model = ModelRef.parse(base_model).repo
        self.config = config
        self.api = HfApi()

    def list(self) -> list[Candidate]:
        if constants.is_offline_mode():
            raise HubUnavailableError("HF_HUB_OFFLINE is set: the Hub watch source cannot list")
        seen: dict[str, Candidate] = {}
        for lineage in self.config.lineages:
            for info in self._models(f"base_model:{lineage}:{self.base_model}"):
                if (cand := self._candidate(info)) is not None:
                    seen.setdefault(cand.key, cand)
        # Each lineage comes newest first; merge them the same way.
        return sorted(seen.values(), key=lambda c: c.created_at or "", reverse=True)

    def _models(self, filter_tag: str) -> list[ModelInfo]:
        expand = ["sha", "createdAt", "lastModified", "tags", "cardData"]
        listing = self.api.list_models(
            filter=filter_tag, sort="created_at", limit=self.config.max_candidates, expand=expand
        )
        try:
            return list(listing)
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status not in (429, 500, 502, 503, 504):  # not an outage: a real error
                raise
            raise HubUnavailableError(f"Hub listing of {filter_tag} failed: {exc}") from exc
        except httpx2.TransportError as exc:  # network errors, after the client's retries
            raise HubUnavailableError(f"Hub listing of {filter_tag} failed: {exc}") from exc

    def _candidate(self, info: ModelInfo) -> Candidate | None:
        lineage = lineage_of(info, self.base_model, self.config.lineages)
        if lineage is None or not info.sha:
            logger.warning("Hub item %s skipped (lineage %s, sha %s)", info.id, lineage, info.sha)
            return None
        created = info.created_at.isoformat() if info.created_at else None
        return Candidate(repo=info.id, revision=info.sha, lineage=lineage, created_at=created)


def list_candidates(watch: WatchConfig, aligned: str) -> list[Candidate]:
    """Candidates of one family's watch source, newest first."""
    if watch.kind == "local":
        assert watch.path is not None  # guaranteed by WatchConfig's validator
        return LocalFolderSource(watch.path).list(watch.max_candidates)
    return HubSource(watch.base_model or aligned, watch).list()
