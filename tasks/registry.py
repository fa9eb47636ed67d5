"""The MLflow record, the pipeline's only memory (no Prefect here): a finished realign run
tagged with a candidate's `source_key` (repo@revision) means "processed"; a model version
tagged with it means "registered".

Tags on realign runs: `lssf_kind=realign`, `source_key`, `source_repo`, `source_revision`,
`family`, `lssf_status` (running | passed | rejected | error), `gate_verdict`, `reason`,
`patch_id`, and `mlflow.note.content` (the run page's description). Patch runs:
`lssf_kind=patch`, `patch_key`, `patch_id`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException

from lssf.models import Frozen

logger = logging.getLogger(__name__)

KIND_REALIGN = "realign"
KIND_PATCH = "patch"
FINAL_STATUSES = ("passed", "rejected")
# A candidate whose realign crashed this many times is not retried by the watcher any more
# (a broken upload must not cost a GPU slot every hour); `lssf`'s realign can still be run.
MAX_ERROR_ATTEMPTS = 3
CANDIDATE_ALIAS = "candidate"
CHAMPION_ALIAS = "champion"
# MLflow 3.17's MAX_TAG_VAL_LENGTH: the run description is a tag, cut to fit.
MAX_TAG_LENGTH = 8000
NOTE_TAG = "mlflow.note.content"


def client_for(tracking_uri: str) -> MlflowClient:
    """One URI for tracking and registry (SQLite by default: sqlite:////abs/path.db)."""
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


class RecordStore(Frozen):
    """Where the MLflow record lives: tracking (and registry) URI, experiment, artifact root."""

    tracking_uri: str
    experiment: str
    artifact_root: Path

    def client(self) -> MlflowClient:
        return client_for(self.tracking_uri)

    def open(self) -> tuple[MlflowClient, str]:
        """A client and the experiment's id (the experiment created on first use)."""
        client = self.client()
        return client, ensure_experiment(client, self.experiment, self.artifact_root)


def ensure_experiment(client: MlflowClient, name: str, artifact_root: Path) -> str:
    """The experiment's id; created with artifacts under `artifact_root`, never ./mlruns."""
    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    location = (Path(artifact_root).resolve() / name).as_uri()
    try:
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        # Another worker created it between our lookup and create.
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'")


def _search(client: MlflowClient, experiment_id: str, filter_string: str) -> Iterator[Run]:
    token: str | None = None
    while True:
        page = client.search_runs([experiment_id], filter_string, max_results=500, page_token=token)
        yield from page
        if not (token := page.token):
            return


def processed_keys(client: MlflowClient, experiment_id: str, family: str) -> set[str]:
    """source_keys realigned for `family` with a verdict (passed or rejected), or that failed
    MAX_ERROR_ATTEMPTS times for it. Another family's run of the same key does not count."""
    query = f"tags.lssf_kind = '{KIND_REALIGN}' and tags.family = '{_quote(family)}'"
    done: set[str] = set()
    errors: dict[str, int] = {}
    for run in _search(client, experiment_id, query):
        key, status = run.data.tags.get("source_key"), run.data.tags.get("lssf_status")
        if key is None:
            continue
        if status in FINAL_STATUSES and run.info.status == "FINISHED":
            done.add(key)
        elif status == "error":
            errors[key] = errors.get(key, 0) + 1
    return done | {key for key, n in errors.items() if n >= MAX_ERROR_ATTEMPTS}


def _realign_query(source_key: str, family: str | None) -> str:
    """Realign runs of `source_key` (of one `family` when given: two families of one
    experiment, e.g. LSSF and RESTA, each realign the same fine-tune)."""
    query = f"tags.lssf_kind = '{KIND_REALIGN}' and tags.source_key = '{_quote(source_key)}'"
    return query + (f" and tags.family = '{_quote(family)}'" if family else "")


def find_final_run(
    client: MlflowClient, experiment_id: str, source_key: str, family: str | None = None
) -> Run | None:
    """The finished realign run of `source_key` (for `family`) with a verdict, if any."""
    query = _realign_query(source_key, family) + " and attributes.status = 'FINISHED'"
    runs = _search(client, experiment_id, query)
    return next((r for r in runs if r.data.tags.get("lssf_status") in FINAL_STATUSES), None)


def start_run(client: MlflowClient, experiment_id: str, run_name: str, tags: dict[str, str]) -> str:
    """A new realign run; earlier runs of the same key still marked RUNNING were killed."""
    key = tags["source_key"]
    query = _realign_query(key, tags.get("family")) + " and attributes.status = 'RUNNING'"
    for stale in _search(client, experiment_id, query):
        logger.warning("run %s of %s was interrupted; marking it KILLED", stale.info.run_id, key)
        client.set_tag(stale.info.run_id, "lssf_status", "interrupted")
        client.set_terminated(stale.info.run_id, status="KILLED")
    all_tags = {"lssf_kind": KIND_REALIGN, "lssf_status": "running", **tags}
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    return run.info.run_id


def finish_run(
    client: MlflowClient, run_id: str, status: str, reason: str, description: str | None = None
) -> None:
    """Close a realign run: passed | rejected (FINISHED) or error (FAILED); `description`
    (Markdown; default `**STATUS**: <reason>`) becomes the run page's description."""
    client.set_tag(run_id, "lssf_status", status)
    client.set_tag(run_id, "reason", reason[:5000])
    note = description if description is not None else f"**{status.upper()}**: {reason}"
    client.set_tag(run_id, NOTE_TAG, note[:MAX_TAG_LENGTH])
    client.set_terminated(run_id, status="FINISHED" if status in FINAL_STATUSES else "FAILED")


def find_version(client: MlflowClient, model_name: str, source_key: str) -> ModelVersion | None:
    """The registered version made from `source_key`, if any (there is never more than one)."""
    query = f"name = '{_quote(model_name)}' and tags.source_key = '{_quote(source_key)}'"
    try:
        found = client.search_model_versions(query)
    except MlflowException:
        return None  # the registered model does not exist yet
    if not found:
        return None
    first = min(found, key=lambda v: int(v.version))
    # search results carry no aliases; a direct read does.
    return client.get_model_version(model_name, str(first.version))


def register_version(
    client: MlflowClient,
    model_name: str,
    run_id: str,
    source: str,
    tags: dict[str, str],
    aliases: tuple[str, ...] = (CANDIDATE_ALIAS,),
    description: str | None = None,
) -> ModelVersion:
    """A new version from `source` (an artifact URI of `run_id`), unless `source_key` has one:
    a realign restarted after a kill updates that version's tags and `description` (its run
    now holds the verdict) and (re)sets the aliases."""
    version = find_version(client, model_name, tags["source_key"])
    if version is None:
        try:
            about = "Fine-tunes re-aligned by lssf and passed by its gate."
            client.create_registered_model(model_name, description=about)
        except MlflowException:
            client.get_registered_model(model_name)  # it exists (maybe created concurrently)
        version = client.create_model_version(
            model_name, source, run_id=run_id, tags=tags, description=description
        )
        logger.info("registered %s version %s from %s", model_name, version.version, source)
    else:
        for name, value in tags.items():
            client.set_model_version_tag(model_name, version.version, name, value)
        if description is not None:
            client.update_model_version(model_name, version.version, description=description)
    for alias in aliases:
        client.set_registered_model_alias(model_name, alias, version.version)
    return client.get_model_version(model_name, version.version)


def promote(
    client: MlflowClient,
    model_name: str,
    version: str | None = None,
    from_alias: str = CANDIDATE_ALIAS,
    to_alias: str = CHAMPION_ALIAS,
) -> ModelVersion:
    """Point `to_alias` at `version` (default: the version `from_alias` points at)."""
    if version is None:
        version = client.get_model_version_by_alias(model_name, from_alias).version
    target = client.get_model_version(model_name, str(version))
    if target.tags.get("gate_verdict") != "pass":
        raise ValueError(
            f"{model_name} version {version} has gate_verdict "
            f"{target.tags.get('gate_verdict')!r}; only passing versions can be promoted"
        )
    client.set_registered_model_alias(model_name, to_alias, target.version)
    client.set_model_version_tag(model_name, target.version, "promoted_to", to_alias)
    return client.get_model_version(model_name, target.version)


def find_patch_run(client: MlflowClient, experiment_id: str, patch_key: str) -> Run | None:
    """The finished run that stored the patch for `patch_key`, if any worker made one."""
    query = (
        f"tags.lssf_kind = '{KIND_PATCH}' and tags.patch_key = '{_quote(patch_key)}' "
        "and attributes.status = 'FINISHED'"
    )
    return next(iter(_search(client, experiment_id, query)), None)


def store_patch(
    client: MlflowClient, experiment_id: str, patch_key: str, patch_id: str, folder: Path
) -> str:
    """Log a patch folder as artifacts of a finished `patch` run, so every worker finds it."""
    tags = {"lssf_kind": KIND_PATCH, "patch_key": patch_key, "patch_id": patch_id}
    run = client.create_run(experiment_id, run_name=f"patch-{patch_id}", tags=tags)
    try:
        client.log_artifacts(run.info.run_id, str(folder), "patch")
    except BaseException:
        client.set_terminated(run.info.run_id, status="FAILED")
        raise
    client.set_terminated(run.info.run_id, status="FINISHED")
    return run.info.run_id


def fetch_patch(client: MlflowClient, run_id: str, dst: Path) -> Path:
    """Download a stored patch into `dst` (its parent must exist); returns the patch folder."""
    return Path(client.download_artifacts(run_id, "patch", str(dst)))
