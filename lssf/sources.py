"""Resolve a model reference (local folder or Hub id with optional ``@revision``) to a folder.

Hub downloads are limited to safetensors, JSON configs and tokenizer files, at a revision pinned
to the exact commit so the provenance records what was really used.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from lssf.checkpoint import folder_file
from lssf.errors import CheckpointError
from lssf.st_io import file_sha256

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# What a model folder needs besides weights; never pickles, never code.
HUB_PATTERNS = (
    "*.safetensors",
    "*.safetensors.index.json",
    "*.json",
    "*.jinja",
    "tokenizer*",
    "*.model",
    "*.tiktoken",
    "vocab.txt",
    "merges.txt",
)
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)


class SourceRecord(BaseModel):
    """What a model reference resolved to, for provenance."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    ref: str
    kind: str  # "local" or "hub"
    repo_id: str | None = None
    revision: str
    path: str
    files: dict[str, str] = {}  # file name -> sha256

    @property
    def name(self) -> str:
        return self.repo_id or self.path


def _exists(path: str | Path) -> bool:
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError):  # a name too long, or with a NUL: not a folder
        return False


def split_ref(ref: str) -> tuple[str, str | None]:
    """``"org/name@rev"`` -> ``("org/name", "rev")``; a local path never splits."""
    if "@" in ref and not _exists(ref):
        name, _, rev = ref.rpartition("@")
        return name, rev or None
    return ref, None


def folder_revision(files: dict[str, str]) -> str:
    """A local folder's revision: a hash over its files' names and content hashes."""
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]}\n".encode())
    return "sha256:" + h.hexdigest()[:16]


def hash_files(folder: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of each named file present; names leaving the folder are refused."""
    found = {n: folder_file(folder, n) for n in names}
    return {n: file_sha256(p) for n, p in found.items() if p is not None}


def _download(repo_id: str, revision: str | None, cache_dir: Path | None) -> tuple[Path, str]:
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    try:
        sha = HfApi().model_info(repo_id, revision=revision or "main").sha
        path = snapshot_download(
            repo_id,
            revision=sha,
            allow_patterns=list(HUB_PATTERNS),
            cache_dir=cache_dir,
        )
    except RepositoryNotFoundError as exc:
        raise CheckpointError(f"Hub model {repo_id!r} not found (or not accessible)") from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(
            f"Hub download of {repo_id}@{revision or 'main'} failed: {exc}"
        ) from exc
    except Exception as exc:  # offline mode, DNS, TLS, disk: whatever the client raises
        raise CheckpointError(
            f"Hub download of {repo_id}@{revision or 'main'} failed ({type(exc).__name__}: "
            f"{exc}); check the network and HF_HUB_OFFLINE, or pass a local folder"
        ) from exc
    if not sha:
        raise CheckpointError(f"Hub did not report a commit for {repo_id}@{revision}")
    return Path(path), sha


def resolve_source(ref: str | Path, *, cache_dir: Path | None = None) -> tuple[Path, SourceRecord]:
    """Local folder or Hub id -> (folder, record). Hub revisions are pinned to a commit sha.

    File hashes are left empty here; callers that stream the weights fill them in as they read.
    """
    ref = str(ref)
    name, revision = split_ref(ref)
    local = Path(name).expanduser()
    if _exists(local):
        if not local.is_dir():
            raise CheckpointError(f"{local} is a file; expected a model folder")
        if revision is not None:
            raise CheckpointError(
                f"{ref!r}: {local} is a local folder, which has no revisions; drop @{revision} "
                "(or name a Hub id org/name@revision)"
            )
        folder = local.resolve()
        return folder, SourceRecord(ref=ref, kind="local", revision="", path=str(folder))
    if not HUB_ID.match(name):
        raise CheckpointError(
            f"{ref!r} is neither an existing folder nor a Hub id 'org/name[@rev]'"
        )
    folder, sha = _download(name, revision, cache_dir)
    log.info("resolved %s to %s@%s", ref, name, sha)
    return folder, SourceRecord(ref=ref, kind="hub", repo_id=name, revision=sha, path=str(folder))


def with_hashes(record: SourceRecord, files: dict[str, str]) -> SourceRecord:
    """Attach file hashes; a local folder's revision becomes the hash of its content."""
    update: dict[str, object] = {"files": dict(sorted(files.items()))}
    if record.kind == "local":
        update["revision"] = folder_revision(files)
    return record.model_copy(update=update)
