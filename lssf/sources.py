"""Resolve a model reference (local folder or Hub id with optional ``@revision``) to a folder.

Hub downloads are limited to safetensors, JSON configs and tokenizer files, at a revision pinned
to the exact commit so the provenance records what was really used.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from lssf.checkpoint import INDEX_NAME, folder_file, weight_files
from lssf.errors import CheckpointError
from lssf.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, is_adapter
from lssf.models import Frozen, SourceRecord
from lssf.st_io import file_sha256

__all__ = ["SIDE_FILES", "ModelRef", "SourceRecord", "local_revision", "resolve_source"]

log = logging.getLogger(__name__)

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
COMMIT_SHA = re.compile(r"^[0-9a-f]{40}$")
# What a model folder needs besides weights; never pickles, never code.
HUB_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "*.json", "*.jinja", "tokenizer*")
HUB_PATTERNS += ("*.model", "*.tiktoken", "vocab.txt", "merges.txt")
# Besides the weights, what a model folder's revision covers and a fused output copies (the
# index too: it decides which tensors a loader reads from which shard).
SIDE_FILES = (
    INDEX_NAME,
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
)
SIDE_FILES += ("special_tokens_map.json", "added_tokens.json", "chat_template.jinja")
SIDE_FILES += ("chat_template.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt")


class ModelRef(Frozen):
    """A model reference, parsed once: a Hub id with an optional revision, or a local folder."""

    repo: str  # the Hub id (org/name), or the folder's absolute path
    revision: str | None = None  # Hub branch, tag or commit; a folder's local_revision once pinned
    kind: Literal["hub", "local"]

    @classmethod
    def parse(cls, ref: str | Path | ModelRef) -> ModelRef:
        """``org/name[@rev]`` or an existing path (which never splits on ``@``)."""
        if isinstance(ref, ModelRef):
            return ref
        text = str(ref)
        if not text.strip():
            raise CheckpointError("empty model reference; name a folder or a Hub id org/name")
        if _exists(text):
            return cls(repo=str(Path(text).expanduser().resolve()), kind="local")
        name, _, rev = text.rpartition("@") if "@" in text else (text, "", "")
        if "@" in text and _exists(name):
            raise CheckpointError(
                f"{text!r}: {name} is a local folder, which has no revisions; drop @{rev} "
                "(or name a Hub id org/name@revision)"
            )
        if not HUB_ID.match(name):
            raise CheckpointError(
                f"{text!r} is neither an existing folder nor a Hub id 'org/name[@rev]'"
            )
        return cls(repo=name, revision=rev or None, kind="hub")

    @property
    def is_local(self) -> bool:
        """A folder on this machine, not a Hub repo."""
        return self.kind == "local"

    @property
    def pinned(self) -> bool:
        """The exact revision is known: a Hub commit sha, or a local folder's content hash."""
        if self.revision is None:
            return False
        return self.is_local or bool(COMMIT_SHA.match(self.revision))

    def pin(self) -> ModelRef:
        """At its exact revision: a Hub commit (API, nothing downloaded), or ``local_revision``."""
        if self.is_local:
            return self.model_copy(update={"revision": local_revision(Path(self.repo))})
        if self.pinned:
            return self
        from huggingface_hub import HfApi

        with _hub_errors(self.repo, self.revision):
            sha = HfApi().model_info(self.repo, revision=self.revision or "main").sha
        if not sha:
            raise CheckpointError(f"Hub did not report a commit for {self.repo}@{self.revision}")
        return self.model_copy(update={"revision": sha})

    def __str__(self) -> str:
        if self.is_local or self.revision is None:
            return self.repo
        return f"{self.repo}@{self.revision}"


def _exists(path: str | Path) -> bool:
    try:
        return Path(path).expanduser().exists()
    except (OSError, ValueError):  # a name too long, or with a NUL: not a folder
        return False


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


def content_files(folder: Path) -> dict[str, str]:
    """What a local folder's revision covers, name -> sha256: weights and side files."""
    if is_adapter(folder):
        return hash_files(folder, [ADAPTER_CONFIG, ADAPTER_WEIGHTS])
    files = {p.name: file_sha256(p) for p in weight_files(folder)}
    return files | hash_files(folder, list(SIDE_FILES))


def local_revision(folder: Path) -> str:
    """THE revision of a local folder; ``with_hashes`` gives the same from streamed hashes."""
    return folder_revision(content_files(Path(folder)))


@contextlib.contextmanager
def _hub_errors(repo_id: str, revision: str | None) -> Iterator[None]:
    """Whatever the Hub client raises, as a ``CheckpointError`` naming the repo."""
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    where = f"{repo_id}@{revision or 'main'}"
    try:
        yield
    except RepositoryNotFoundError as exc:
        raise CheckpointError(f"Hub model {repo_id!r} not found (or not accessible)") from exc
    except HfHubHTTPError as exc:
        raise CheckpointError(f"Hub download of {where} failed: {exc}") from exc
    except Exception as exc:  # offline mode, DNS, TLS, disk: whatever the client raises
        raise CheckpointError(
            f"Hub download of {where} failed ({type(exc).__name__}: {exc}); check the "
            "network and HF_HUB_OFFLINE, or pass a local folder"
        ) from exc


def resolve_source(
    ref: str | Path | ModelRef, *, cache_dir: Path | None = None
) -> tuple[Path, SourceRecord]:
    """Local folder or Hub id -> (folder, record), a Hub revision pinned to its commit.

    File hashes are left empty: callers that stream the weights fill them in as they read.
    """
    given = str(ref)
    ref = ModelRef.parse(ref)
    if ref.is_local:
        folder = Path(ref.repo)
        if not folder.is_dir():
            raise CheckpointError(f"{folder} is a file; expected a model folder")
        return folder, SourceRecord(ref=given, kind="local", revision="", path=str(folder))
    from huggingface_hub import snapshot_download

    sha = ref.pin().revision or ""
    with _hub_errors(ref.repo, ref.revision):
        path = snapshot_download(
            ref.repo, revision=sha, allow_patterns=list(HUB_PATTERNS), cache_dir=cache_dir
        )
    folder = Path(path)
    log.info("resolved %s to %s@%s", ref, ref.repo, sha)
    return folder, SourceRecord(
        ref=given, kind="hub", repo_id=ref.repo, revision=sha, path=str(folder)
    )


def with_hashes(record: SourceRecord, files: dict[str, str]) -> SourceRecord:
    """Attach file hashes; a local folder's revision becomes the hash of its content."""
    update: dict[str, object] = {"files": dict(sorted(files.items()))}
    if record.kind == "local":
        update["revision"] = folder_revision(files)
    return record.model_copy(update=update)
