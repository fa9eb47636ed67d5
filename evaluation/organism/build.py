"""`build_organism`: train base -> aligned -> finetuned reproducibly, cached per stage.

The weights are trained in a child process whose numerics are pinned (`repro`), so the same
seed and config give the same bytes on one machine whatever its thread count and kernels (not
across machines: data/organisms/README.md); each stage is saved as soon as it is
done and keyed by a chained hash (`OrganismConfig.stage_keys`), so a killed build resumes and a
LoRA and a full organism of one seed share their first two stages. A finished organism (or a
shipped copy of one, `data/organisms/`) with the same key is reused as it is.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from evaluation.organism import data, repro
from evaluation.organism.config import ORGANISM_VERSION, OrganismConfig
from lssf import outputs
from lssf.errors import ConfigError
from lssf.outputs import atomic_write_text

logger = logging.getLogger(__name__)
MANIFEST = "organism.json"
STAGE_FILE = "organism_stage.json"
STAGES = ("base", "aligned", "finetuned")
MAX_SEED = 2**32 - 1  # torch, numpy and Python's random all take it
# Organisms shipped with the repository as versioned data (see data/organisms/README.md).
SHIPPED_DIR = Path(__file__).resolve().parents[2] / "data" / "organisms"


@dataclass(frozen=True)
class OrganismPaths:
    """Where a built organism lives. `cached` is True when the call trained nothing."""

    root: Path
    base: Path
    aligned: Path
    finetuned: Path
    eval_dir: Path
    finetuned_adapter: Path | None
    cache_key: str
    cached: bool

    @classmethod
    def at(cls, root: Path, config: OrganismConfig, key: str, cached: bool) -> OrganismPaths:
        adapter = root / "finetuned_adapter" if config.finetune == "lora" else None
        return cls(
            root=root,
            base=root / "base",
            aligned=root / "aligned",
            finetuned=root / "finetuned",
            eval_dir=root / "eval",
            finetuned_adapter=adapter,
            cache_key=key,
            cached=cached,
        )


def read_manifest(root: Path) -> dict[str, Any]:
    """The organism's manifest, or {} when there is none (not built, or incomplete)."""
    try:
        manifest = json.loads((Path(root) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return manifest if isinstance(manifest, dict) else {}


def shipped_organisms() -> list[Path]:
    """The organism folders shipped with the repository (none in a wheel install)."""
    return sorted(p for p in SHIPPED_DIR.glob("*") if (p / MANIFEST).is_file())


def build_organism(
    seed: int,
    out: Path,
    config: OrganismConfig | None = None,
    reuse: Iterable[Path] = (),
    use_shipped: bool = True,
    numerics: repro.Numerics = "pinned",
) -> OrganismPaths:
    """Build (or reuse) the seed's organism under `out`.

    `out` is returned at once when its manifest has the same key. Otherwise a finished organism
    with that key among `reuse` and the shipped ones is copied; failing that, stages whose key
    matches a stage of a `reuse` organism are copied and the rest is trained (pinned, in a child
    process) into a sibling folder that replaces `out` by a rename when complete.
    `numerics="native"` trains on this machine's own kernels instead (about 4x faster, its
    own cache key; reproducible on this machine only).
    """
    config = config or OrganismConfig()
    check_seed(seed)
    out = outputs.output_path(out)
    keys = config.stage_keys(seed, repro.versions(numerics))
    key = keys["finetuned"]
    if read_manifest(out).get("cache_key") == key:
        logger.info("organism seed %d: cache hit at %s (%s)", seed, out, key)
        _refresh_eval_sets(out, seed)
        return OrganismPaths.at(out, config, key, cached=True)
    donors = [Path(p) for p in reuse] + (shipped_organisms() if use_shipped else [])
    outputs.check_output(out, overwrite=True, inputs=reuse)  # only lssf's own folder is replaced
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{key}"  # no pid: a killed build resumes from here
    with build_lock(out.parent / f".{out.name}.lock"):
        if read_manifest(out).get("cache_key") == key:  # built while we waited
            return OrganismPaths.at(out, config, key, cached=True)
        if tmp.is_symlink() or (os.path.lexists(tmp) and not tmp.is_dir()):
            outputs.discard(tmp)  # never build through a link lssf did not make
        whole = next((d for d in donors if read_manifest(d).get("cache_key") == key), None)
        if whole is not None:
            logger.info("organism seed %d: copying %s (%s)", seed, whole, key)
            outputs.discard(tmp)
            shutil.copytree(whole, tmp)
            trained = False
        else:
            _adopt_stages(tmp, keys, donors)
            trained = _train_missing(tmp, seed, config, keys, numerics)
        data.write_eval_sets(seed, tmp / "eval")
        outputs.mark_folder(tmp, "organism")
        replace_folder(tmp, out, inputs=reuse)
    return OrganismPaths.at(out, config, key, cached=not trained)


def check_seed(seed: object) -> int:
    """A seed every random generator takes: an integer in [0, 2**32 - 1]."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        big = isinstance(seed, int) and abs(seed).bit_length() > 64
        shown = f"an integer of {abs(seed).bit_length()} bits" if big else repr(seed)[:40]
        raise ConfigError(f"seed must be an integer from 0 to {MAX_SEED}, not {shown}")
    return seed


@contextmanager
def build_lock(path: Path) -> Iterator[None]:
    """One builder per output folder at a time. A waiter re-checks the cache once it holds
    the lock; the lock file is removed by its holder, so nothing is left beside the output."""
    # O_NOFOLLOW, no O_TRUNC: a link or file someone put at that name is never written through
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "r+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _stage_key(folder: Path) -> str | None:
    try:
        return json.loads((folder / STAGE_FILE).read_text(encoding="utf-8")).get("key")
    except (OSError, ValueError, AttributeError):
        return None


def _adopt_stages(tmp: Path, keys: dict[str, str], donors: list[Path]) -> None:
    """Copy into `tmp` every missing stage that a donor organism has under the same key."""
    for stage in STAGES:
        if _stage_key(tmp / stage) == keys[stage]:
            continue
        for donor in donors:
            if _stage_key(donor / stage) == keys[stage]:
                logger.info("stage %s: reusing %s", stage, donor / stage)
                shutil.rmtree(tmp / stage, ignore_errors=True)
                shutil.copytree(donor / stage, tmp / stage)
                break


def _train_missing(
    tmp: Path, seed: int, config: OrganismConfig, keys: dict[str, str], numerics: repro.Numerics
) -> bool:
    """Train the stages `tmp` lacks in a pinned child; True when anything was trained."""
    if all(_stage_key(tmp / s) == keys[s] for s in STAGES) and (tmp / MANIFEST).is_file():
        return False
    args = ["--seed", str(seed), "--root", str(tmp), "--config", config.model_dump_json()]
    repro.run_pinned("evaluation.organism.build", [*args, "--numerics", numerics], numerics)
    return True


def _refresh_eval_sets(root: Path, seed: int) -> None:
    """Eval sets are pure functions of the seed: rewrite them if their version changed."""
    stamp = root / "eval" / data.EVAL_STAMP
    if not stamp.is_file() or stamp.read_text(encoding="utf-8").strip() != data.EVAL_VERSION:
        data.write_eval_sets(seed, root / "eval")


def replace_folder(tmp: Path, out: Path, inputs: Iterable[Path] = ()) -> None:
    """Swap a finished folder in (``lssf.outputs.replace_folder``: only a folder lssf wrote is
    replaced). A reader sees the old folder or the new one, never a part of either."""
    outputs.replace_folder(tmp, out, inputs=inputs)


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every weight file in a stage folder (the bit-identity evidence)."""
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.glob("*.safetensors"))
    }


# --- the pinned child: `python -m evaluation.organism.build --seed N --root DIR --config JSON` ---


def train_stages(
    root: Path, seed: int, config: OrganismConfig, numerics: repro.Numerics = "pinned"
) -> dict[str, float]:
    """Train every stage whose folder lacks the right key, each from the saved one before it.

    Must run in a pinned process. Returns the seconds each trained stage took.
    """
    import torch
    from transformers import LlamaForCausalLM

    from evaluation.organism import train
    from evaluation.organism.tokenizer import build_tokenizer

    keys = config.stage_keys(seed, repro.versions(numerics))
    timings: dict[str, float] = {}
    with repro.pinned_numerics(numerics):
        tok = build_tokenizer()
        for i, stage in enumerate(STAGES):
            folder = root / stage
            if _stage_key(folder) == keys[stage]:
                continue
            start = time.perf_counter()
            if stage == "base":
                model = train.new_model(config.model, tok, seed)
            else:
                previous = root / STAGES[i - 1]
                model = LlamaForCausalLM.from_pretrained(previous, dtype=torch.float32)
            shutil.rmtree(folder, ignore_errors=True)
            model = _train_stage(model, tok, stage, seed, config, root)
            _save(model, tok, folder)
            atomic_write_text(folder / STAGE_FILE, json.dumps({"stage": stage, "key": keys[stage]}))
            timings[stage] = round(time.perf_counter() - start, 1)
    return timings


def _train_stage(model, tok, stage: str, seed: int, config: OrganismConfig, root: Path):
    from evaluation.organism import train

    if stage in ("base", "aligned"):
        train.run_stage(
            model, tok, getattr(config, stage), data.stage_mix(stage, seed), seed, stage
        )
        return model
    tune = config.finetune_stage()
    if config.finetune == "lora":
        adapter = root / "finetuned_adapter"
        return train.lora_finetune(model, tok, tune, config.lora, seed, adapter)
    train.run_stage(model, tok, tune, data.stage_mix("finetune", seed), seed, "finetune-full")
    return model


def _save(model, tok, folder: Path) -> None:
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


def write_manifest(
    root: Path, seed: int, config: OrganismConfig, timings: dict, numerics: repro.Numerics
) -> None:
    """Written last: its presence marks a complete build. Records keys, versions, hashes."""
    keys = config.stage_keys(seed, repro.versions(numerics))
    manifest = {
        "cache_key": keys["finetuned"],
        "stage_keys": keys,
        "seed": seed,
        "organism_version": ORGANISM_VERSION,
        "config": config.model_dump(),
        "versions": repro.versions(numerics),
        "sha256": {stage: file_hashes(root / stage) for stage in STAGES},
        "train_seconds": timings,
    }
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2))


def _child(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="train an organism's stages (pinned child)")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--root", type=Path, required=True)
    parser.add_argument("--config", required=True, help="OrganismConfig as JSON")
    parser.add_argument("--numerics", choices=("pinned", "native"), default="pinned")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    config = OrganismConfig.model_validate_json(args.config)
    args.root.mkdir(parents=True, exist_ok=True)
    timings = train_stages(args.root, args.seed, config, args.numerics)
    write_manifest(args.root, args.seed, config, timings, args.numerics)
    return 0


if __name__ == "__main__":
    raise SystemExit(_child())
