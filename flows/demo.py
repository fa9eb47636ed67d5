"""`lssf demo`: the whole pipeline on the model organism, offline, in one command.

The organism's fine-tune goes into a local watch folder; the watcher runs realign inline under
a temporary Prefect server, recording into a SQLite MLflow store under the work folder.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from lssf.errors import OutputError
from lssf.outputs import atomic_folder, atomic_write_text, claim_folder

if TYPE_CHECKING:
    from evaluation.organism import OrganismConfig, OrganismPaths

logger = logging.getLogger(__name__)

ORGANISM_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "organism.yaml"
FAMILY = "organism"


@dataclass(frozen=True)
class DemoResult:
    summary: dict[str, Any]
    new_runs: int
    tracking_uri: str
    config_path: Path
    seconds: float


def demo_config(workdir: Path, organism: OrganismPaths, eval_limit: int | None = None) -> Path:
    """configs/organism.yaml with every path pointing into `workdir`; written there."""
    data = yaml.safe_load(ORGANISM_CONFIG.read_text())
    fam = data["families"][FAMILY]
    fam["aligned"], fam["reference"] = str(organism.aligned), str(organism.base)
    fam["eval_data_dir"] = str(organism.eval_dir)
    if eval_limit is not None:
        fam["eval_limit"] = eval_limit
    fam["watch"] = {**fam.get("watch", {}), "kind": "local", "path": str(workdir / "watch")}
    data["state_dir"] = str(workdir / "state")
    data.pop("tracking_uri", None)  # default: sqlite:////<workdir>/state/mlflow.db
    return atomic_write_text(workdir / "lssf-demo.yaml", yaml.safe_dump(data, sort_keys=False))


def place_in_watch_folder(finetuned: Path, watch_dir: Path) -> None:
    """Copy the fine-tuned model into the watch folder once (atomically: copy, then rename)."""
    dst = watch_dir / "organism-finetuned"
    if not dst.is_dir():
        with atomic_folder(dst, inputs=[finetuned]) as tmp:
            shutil.copytree(finetuned, tmp, dirs_exist_ok=True)


def claim_workdir(workdir: Path) -> Path:
    """The demo's work folder, claimed for lssf (`lssf.outputs.claim_folder`): new, empty or
    made by lssf; never a folder of the user's, whose `organism/` a build would replace."""
    return claim_folder(Path(workdir).expanduser(), "demo")


def demo_log(workdir: Path) -> Path:
    """`workdir/demo.log`, which the library log is appended to: a regular file or none,
    never a symlink (whose target the log would be written into)."""
    log_file = Path(workdir) / "demo.log"
    if log_file.is_symlink() or (log_file.exists() and not log_file.is_file()):
        raise OutputError(f"{log_file} is not a regular file; remove it or pick another --workdir")
    return log_file


def run_demo(
    workdir: Path,
    seed: int = 0,
    organism_config: OrganismConfig | None = None,
    eval_limit: int | None = None,
) -> DemoResult:
    """Everything `lssf demo` does but print; tests pass a pico organism and an `eval_limit`."""
    start = time.perf_counter()
    workdir = claim_workdir(workdir)  # first: before anything is imported, built or written
    from evaluation.organism import build_organism
    from flows.watch import watch
    from tasks.config import load_config
    from tasks.record_tasks import lookup_outcome
    from tasks.sources import LocalFolderSource

    organism = build_organism(seed=seed, out=workdir / "organism", config=organism_config)
    logger.info("organism at %s (cached: %s)", organism.root, organism.cached)
    place_in_watch_folder(organism.finetuned, workdir / "watch")
    config_path = demo_config(workdir, organism, eval_limit)
    cfg = load_config(config_path)  # fail here, not inside the flow
    results = watch(family=FAMILY, config=str(config_path), dispatch="inline")
    fam = cfg.family(FAMILY)
    (cand,) = LocalFolderSource(workdir / "watch").list()
    summary = lookup_outcome.fn(cfg.record_store(), cand.key, fam.registered_model, FAMILY)
    if summary is None:
        reason = results[0].get("reason") if results else "no record"
        raise RuntimeError(f"the realign of {cand.key} did not finish: {reason}")
    summary["registered_model"] = fam.registered_model
    seconds = time.perf_counter() - start
    return DemoResult(summary, len(results), cfg.resolved_tracking_uri(), config_path, seconds)


def render(result: DemoResult) -> str:
    """The text `lssf demo` prints."""
    s = result.summary
    lines = [
        f"lssf demo: {s['source_key']}",
        "",
        s["table"] or "(no table recorded)",
        "",
        f"Gate verdict (held-out split): {(s['verdict'] or 'n/a').upper()}. {s['reason']}",
    ]
    model, aliases = s["registered_model"], ", ".join(s["aliases"]) or "none"
    if s["version"]:
        lines.append(f"Registered: {model} version {s['version']} (aliases: {aliases})")
    else:
        lines.append(f"Registered: nothing ({model} unchanged)")
    if result.new_runs == 0:
        lines.append("Already processed: this run registered nothing new.")
    lines += [
        f"MLflow tracking URI: {result.tracking_uri}",
        f"Open the MLflow UI: mlflow ui --backend-store-uri {result.tracking_uri}",
        f"Config used: {result.config_path}",
        f"Wall time: {result.seconds:.1f} s",
    ]
    return "\n".join(lines)
