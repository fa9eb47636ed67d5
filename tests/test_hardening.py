"""Issue #9: untrusted model folders, outputs that never destroy data, integrity-checked patches,
finite outputs only, and one clear line (exit 2) for every malformed input.

Each test names the attack it covers; all run on a pico trio built here in well under a second.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lssf import PatchConfig, SafetyPatch, export_patch_adapter, extract, fuse, outputs
from lssf.checkpoint import INDEX_NAME, Checkpoint
from lssf.cli import main
from lssf.config import load_yaml_model
from lssf.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteError,
    OutputError,
    OutputExistsError,
    PatchIntegrityError,
    ShapeMismatchError,
)
from lssf.outputs import PROVENANCE, atomic_folder
from lssf.sources import local_revision, resolve_source
from lssf.st_io import AppendingWriter, PlannedWriter, TensorSpec, file_sha256
from lssf.synthetic import LlamaShape

SHAPE = LlamaShape(hidden=16, intermediate=32, layers=1, heads=2, kv_heads=2, vocab=32)
TRIO = {"shape": SHAPE, "seed": 5, "shard_bytes": 6_000}  # the `trio` fixture (tests/conftest.py)
Q = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def patch_dir(trio: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hp") / "patch"
    extract(trio["aligned"], trio["reference"], out, progress=False)
    return out


def copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def raw_safetensors(path: Path, header: object, data: bytes = b"") -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return path


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---------------------------------------------------------------- data loss


def test_overwrite_refuses_a_folder_lssf_did_not_write(trio, patch_dir, tmp_path, monkeypatch):
    """`--out . --overwrite` (the working directory) is refused; nothing is deleted."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(work)
    with pytest.raises(OutputError, match="is the current folder"):
        fuse(trio["finetuned"], patch_dir, ".", overwrite=True, progress=False)
    assert listing(work) == ["thesis.tex"]


@pytest.mark.parametrize("where", ["parent", "same", "patch", "inside"])
def test_overwrite_never_touches_the_inputs(trio, patch_dir, tmp_path, where):
    """`--out` = the parent of `--finetuned` (or the input itself, or inside it) is refused."""
    ft = copy(trio["finetuned"], tmp_path / "models" / "ft")
    (ft.parent / PROVENANCE).write_text(json.dumps({"tool": "lssf"}))  # even if it looks ours
    out = {
        "parent": ft.parent,
        "same": ft,
        "patch": patch_dir,
        "inside": ft / "sub",
    }[where]
    before = {p: p.stat().st_mtime_ns for p in [*ft.iterdir(), *patch_dir.iterdir()]}
    with pytest.raises(OutputError, match=r"(is|contains|lies inside) the input"):
        fuse(ft, patch_dir, out, overwrite=True, progress=False)
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert not (ft / "sub").exists()


def test_extract_shares_the_output_rules(trio, tmp_path):
    al = copy(trio["aligned"], tmp_path / "m" / "aligned")
    with pytest.raises(OutputError, match="contains the input"):
        extract(al, trio["reference"], tmp_path / "m", overwrite=True, progress=False)
    assert (al / "config.json").is_file()


def test_a_folder_appearing_meanwhile_is_never_deleted(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while"), atomic_folder(out) as tmp:
        (tmp / "new.txt").write_text("new")
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
    assert listing(out) == ["theirs.txt"]
    assert listing(tmp_path) == ["out"]


def test_overwrite_rechecks_before_the_final_rename(tmp_path):
    """An lssf output swapped for someone's folder during the run is not replaced."""
    out = tmp_path / "out"
    out.mkdir()
    (out / PROVENANCE).write_text(json.dumps({"tool": "lssf"}))
    swapped = pytest.raises(OutputError, match="not written by lssf")
    with swapped, atomic_folder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        shutil.rmtree(out)
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
    assert listing(out) == ["theirs.txt"]


def test_the_final_rename_never_replaces(tmp_path):
    """renameat2(RENAME_NOREPLACE) on Linux; even an empty folder at the target is kept."""
    if sys.platform.startswith("linux"):
        assert outputs._RENAMEAT2 is not None
    (tmp_path / "src").mkdir()
    (tmp_path / "dst").mkdir()
    with pytest.raises(FileExistsError):
        outputs.rename_noreplace(tmp_path / "src", tmp_path / "dst")
    assert listing(tmp_path) == ["dst", "src"]


def test_two_concurrent_runs_to_one_out_one_fails(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(OutputExistsError, match="appeared while"), atomic_folder(out) as first:
        (first / "who").write_text("first")
        with atomic_folder(out) as second:
            (second / "who").write_text("second")
    assert (out / "who").read_text() == "second"
    assert listing(tmp_path) == ["out"]


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_temp_folders_of_dead_runs_are_cleaned_by_the_next_run(tmp_path):
    host, dead = socket.gethostname(), _dead_pid()
    stale = tmp_path / f".out.tmp-{dead}-0a0b-{host}"
    live = tmp_path / f".out.tmp-{os.getpid()}-0c0d-{host}"
    remote = tmp_path / f".out.tmp-{dead}-0e0f-another-host"
    for folder in (stale, live, remote):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"\0" * 64)
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "x").write_text("x")
    assert not stale.exists()
    assert live.exists() and remote.exists()  # a running process's, another machine's


def test_a_previous_output_moved_aside_by_a_killed_run_is_restored(tmp_path):
    old = tmp_path / f".out.old-{_dead_pid()}-0a0b-{socket.gethostname()}"
    old.mkdir()
    (old / PROVENANCE).write_text(json.dumps({"tool": "lssf"}))
    with pytest.raises(OutputExistsError), atomic_folder(tmp_path / "out"):
        pass
    assert listing(tmp_path / "out") == [PROVENANCE]


def test_outputs_get_normal_permissions(trio, patch_dir, tmp_path):
    previous = os.umask(0o022)
    try:
        fuse(trio["finetuned"], patch_dir, tmp_path / "out", progress=False)
    finally:
        os.umask(previous)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    modes = {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == {0o644}


def test_an_impossible_out_is_a_clear_error(trio, patch_dir, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="cannot create output"):
        fuse(trio["finetuned"], patch_dir, tmp_path / "file" / "out", progress=False)


# ---------------------------------------------------------------- untrusted folders


def _set_shard(folder: Path, name: object) -> None:
    index = json.loads((folder / INDEX_NAME).read_text())
    index["weight_map"][Q] = name
    (folder / INDEX_NAME).write_text(json.dumps(index))


@pytest.mark.parametrize(
    ("shard", "message"),
    [
        ("ABS", "no paths"),
        ("../outside.safetensors", "no paths"),
        ("sub/model.safetensors", "no paths"),
        ("config.json", "no paths"),
        (7, "strings"),
    ],
    ids=["absolute", "dotdot", "subfolder", "not-safetensors", "not-a-string"],
)
def test_index_naming_files_outside_the_folder_is_refused(
    trio, patch_dir, tmp_path, shard, message
):
    outside = copy(trio["finetuned"], tmp_path / "elsewhere")
    ft = copy(trio["finetuned"], tmp_path / "ft")
    target = next(outside.glob("*.safetensors"))
    _set_shard(ft, str(target) if shard == "ABS" else shard)
    with pytest.raises(CheckpointError, match=message):
        fuse(ft, patch_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_index_entry_must_be_in_its_shard(trio, patch_dir, tmp_path):
    ft = copy(trio["finetuned"], tmp_path / "ft")
    index = json.loads((ft / INDEX_NAME).read_text())
    other = next(
        n for n in sorted(set(index["weight_map"].values())) if n != index["weight_map"][Q]
    )
    _set_shard(ft, other)
    with pytest.raises(CheckpointError, match="does not hold it"):
        fuse(ft, patch_dir, tmp_path / "out", progress=False)


def test_a_file_that_is_not_safetensors_is_never_echoed(tmp_path):
    secret = b"hunter2-password-do-not-print\n" * 3
    (tmp_path / "model.safetensors").write_bytes(secret)
    with pytest.raises(CheckpointError) as info:
        Checkpoint(tmp_path)
    msg = str(info.value)
    assert "hunter2" not in msg and str(len(secret)) not in msg
    assert str(struct.unpack("<Q", secret[:8])[0]) not in msg


@pytest.mark.parametrize("name", ["tokenizer.json", "README.md", "model.safetensors"])
def test_symlinks_leaving_the_folder_are_refused(trio, patch_dir, tmp_path, name):
    secret = tmp_path / "secret.txt"
    secret.write_text("---\nbase_model: s3cret\n---\n")
    ft = copy(trio["finetuned"], tmp_path / "ft")
    if name == "model.safetensors":  # an index-less folder whose only shard is elsewhere
        (ft / INDEX_NAME).unlink()
        for f in ft.glob("*.safetensors"):
            f.unlink()
        secret = next(trio["finetuned"].glob("*.safetensors"))
    (ft / name).unlink(missing_ok=True)
    (ft / name).symlink_to(secret)
    with pytest.raises(CheckpointError, match="leads outside the model folder"):
        fuse(ft, patch_dir, tmp_path / "out", force=True, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_symlink_inside_the_folder_is_fine(trio, patch_dir, tmp_path):
    ft = copy(trio["finetuned"], tmp_path / "ft")
    (ft / "tokenizer_config.json").write_text('{"model_max_length": 8}')
    (ft / "tokenizer.json").symlink_to(ft / "tokenizer_config.json")
    fuse(ft, patch_dir, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "tokenizer.json").is_symlink()


def test_revision_on_a_local_folder_is_an_error(trio):
    with pytest.raises(CheckpointError, match="local folder, which has no revisions"):
        resolve_source(f"{trio['aligned']}@main")


def test_relative_base_model_is_resolved_against_the_model_folder(
    trio, patch_dir, tmp_path, monkeypatch
):
    ft = copy(trio["finetuned"], trio["finetuned"].parent / "ft-relative")
    (ft / "README.md").write_text("---\nbase_model: ../aligned\n---\n")
    monkeypatch.chdir(tmp_path)  # where ../aligned is something else (nothing)
    fuse(ft, patch_dir, tmp_path / "out", progress=False)  # no PatchMismatchError
    assert (tmp_path / "out" / PROVENANCE).is_file()


# ---------------------------------------------------------------- patch integrity


def _tampered(patch_dir: Path, dst: Path, edit=None, manifest_edit=None, rehash=False) -> Path:
    bad = copy(patch_dir, dst)
    if edit is not None:
        factors = load_file(bad / "factors.safetensors")
        edit(factors)
        save_file(factors, bad / "factors.safetensors")
    manifest = json.loads((bad / "manifest.json").read_text())
    if manifest_edit is not None:
        manifest_edit(manifest)
    if rehash and "factors_sha256" in manifest:
        manifest["factors_sha256"] = file_sha256(bad / "factors.safetensors")
    (bad / "manifest.json").write_text(json.dumps(manifest))
    return bad


def _set(d: dict, key: str, fn) -> None:
    d[key] = fn(d[key])


FACTOR_EDITS = {
    "value": lambda f: f[f"{Q}.C"].view(-1)[0].add_(1e-3),
    "negate-U": lambda f: _set(f, f"{Q}.U", lambda t: -t),
    "scale-U": lambda f: _set(f, f"{Q}.U", lambda t: 2 * t),
}


@pytest.mark.parametrize("edit", sorted(FACTOR_EDITS))
def test_edited_factors_are_refused_or_change_the_patch_id(trio, patch_dir, tmp_path, edit):
    bad = _tampered(patch_dir, tmp_path / "bad", FACTOR_EDITS[edit])
    with pytest.raises(PatchIntegrityError, match="changed after extraction"):
        fuse(trio["finetuned"], bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    rehashed = _tampered(patch_dir, tmp_path / "rehashed", FACTOR_EDITS[edit], rehash=True)
    assert SafetyPatch.load(rehashed).patch_id != SafetyPatch.load(patch_dir).patch_id


def _bump_rank(m: dict) -> None:
    m["tensors"][Q]["rank"] += 1


MANIFEST_EDITS = {
    "rank": (_bump_rank, "implies F32"),
    "dropped": (lambda m: m["tensors"].pop(Q), "does not list"),
    "no-hash": (lambda m: m.pop("factors_sha256"), "records no factors_sha256"),
}


@pytest.mark.parametrize("edit", sorted(MANIFEST_EDITS))
def test_edited_manifests_are_refused(trio, patch_dir, tmp_path, edit):
    fn, message = MANIFEST_EDITS[edit]
    bad = _tampered(patch_dir, tmp_path / "bad", manifest_edit=fn)
    with pytest.raises(PatchIntegrityError, match=message):
        fuse(trio["finetuned"], bad, tmp_path / "out", progress=False)


def test_a_factor_of_the_wrong_shape_is_refused_even_when_rehashed(trio, patch_dir, tmp_path):
    bad = _tampered(
        patch_dir,
        tmp_path / "bad",
        lambda f: _set(f, f"{Q}.C", lambda t: t[:, :-1].contiguous()),
        rehash=True,
    )
    with pytest.raises(PatchIntegrityError, match=rf"factor '{Q}\.C'"):
        fuse(trio["finetuned"], bad, tmp_path / "out", progress=False)


def test_fuse_reverifies_a_loaded_patch(trio, patch_dir, tmp_path):
    bad = copy(patch_dir, tmp_path / "p")
    loaded = SafetyPatch.load(bad)
    _tampered(patch_dir, tmp_path / "t", FACTOR_EDITS["value"])
    shutil.copyfile(tmp_path / "t" / "factors.safetensors", bad / "factors.safetensors")
    with pytest.raises(PatchIntegrityError):
        fuse(trio["finetuned"], loaded, tmp_path / "out", progress=False)
    with pytest.raises(PatchIntegrityError):
        export_patch_adapter(loaded, tmp_path / "adapter", progress=False)


# ---------------------------------------------------------------- finite, typed, loadable


@pytest.mark.parametrize("alpha", [float("inf"), float("nan"), 1e300, True])
def test_alpha_must_be_finite_everywhere(trio, patch_dir, tmp_path, alpha):
    with pytest.raises(ConfigError, match="alpha"):
        fuse(trio["finetuned"], patch_dir, tmp_path / "out", alpha=alpha, progress=False)
    with pytest.raises(ConfigError, match="alpha"):
        export_patch_adapter(patch_dir, tmp_path / "adapter", alpha=alpha, progress=False)
    assert listing(tmp_path) == []


def test_adapter_writers_refuse_non_finite_values(patch_dir, tmp_path):
    with pytest.raises(NonFiniteError, match="NaN/Inf"):  # alpha * U' overflows float16
        export_patch_adapter(
            patch_dir, tmp_path / "adapter", alpha=1e6, dtype=torch.float16, progress=False
        )
    assert listing(tmp_path) == []
    nan = _tampered(
        patch_dir,
        tmp_path / "nan",
        lambda f: f[f"{Q}.U"].view(-1)[0].fill_(float("nan")),
        rehash=True,
    )
    with pytest.raises(NonFiniteError, match=r"q_proj\.lora_B"):
        export_patch_adapter(nan, tmp_path / "adapter", progress=False)
    assert listing(tmp_path) == ["nan"]


@pytest.mark.parametrize("writer", ["planned", "appending"])
def test_every_writer_checks_finiteness_and_metadata(tmp_path, writer):
    bad = torch.tensor([1.0, float("inf")])
    path = tmp_path / "x.safetensors"
    w = (
        PlannedWriter(path, [TensorSpec("w", torch.float32, (2,))])
        if writer == "planned"
        else AppendingWriter(path)
    )
    with pytest.raises(NonFiniteError, match="'w'"):
        w.write("w", bad)
    with pytest.raises(CheckpointError, match="metadata"):
        AppendingWriter(tmp_path / "y.safetensors", {"format": 1})  # type: ignore[dict-item]


def test_weight_top_must_be_finite(trio, tmp_path):
    with pytest.raises(ValueError, match="finite"):
        PatchConfig(weight_top=float("inf"))
    cfg = tmp_path / "patch.yaml"
    cfg.write_text("weight_top: .inf\n")
    with pytest.raises(ConfigError, match="weight_top"):
        load_yaml_model(cfg, PatchConfig)
    with pytest.raises(NonFiniteError, match="weight_top=1e\\+300"):
        extract(
            trio["aligned"],
            trio["reference"],
            tmp_path / "p",
            PatchConfig(weight_top=1e300),
            progress=False,
        )
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    "metadata", [{"format": "pt", "n": 1}, ["format", "pt"], "pt"], ids=["int", "list", "str"]
)
def test_metadata_that_safetensors_refuses_is_refused(tmp_path, metadata):
    header = {"__metadata__": metadata, "w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * 4)
    with pytest.raises(CheckpointError, match="__metadata__"):
        Checkpoint(tmp_path)


def test_integer_weights_are_refused_by_name_when_fused(trio, patch_dir, tmp_path):
    ft = copy(trio["finetuned"], tmp_path / "ft")
    for f in ft.glob("*.safetensors"):
        tensors = load_file(f)
        if Q in tensors:
            tensors[Q] = tensors[Q].round().to(torch.int32)
            save_file(tensors, f, metadata={"format": "pt"})
    with pytest.raises(ShapeMismatchError, match=rf"{Q}.*I32.*floating-point"):
        fuse(ft, patch_dir, tmp_path / "out", progress=False)


def test_integer_tensors_are_never_targets(trio, tmp_path, caplog):
    al, ref = copy(trio["aligned"], tmp_path / "al"), copy(trio["reference"], tmp_path / "ref")
    for folder in (al, ref):
        for f in folder.glob("*.safetensors"):
            tensors = load_file(f)
            if Q in tensors:
                tensors[Q] = (tensors[Q] * 100).round().to(torch.int32)
                save_file(tensors, f, metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="lssf.extract"):
        patch = extract(al, ref, tmp_path / "p", progress=False)
    assert Q not in patch.manifest.tensors and len(patch.manifest.tensors) == 6
    assert Q in caplog.text and "not floating-point" in caplog.text


def test_every_output_kind_round_trips(trio, patch_dir, tmp_path):
    """Patch, fused model, fused LoRA model, combined adapter, patch adapter: each opens with the
    safetensors library and loads with transformers or peft."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    aligned = transformers.LlamaForCausalLM.from_pretrained(str(trio["aligned"]))
    config = peft.LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    peft.get_peft_model(aligned, config).save_pretrained(tmp_path / "lora")
    outputs = {
        "model": fuse(trio["finetuned"], patch_dir, tmp_path / "model", progress=False).out,
        "lora-model": fuse(tmp_path / "lora", patch_dir, tmp_path / "lm", progress=False).out,
        "combined": fuse(
            tmp_path / "lora", patch_dir, tmp_path / "ca", output_format="adapter", progress=False
        ).out,
        "patch-adapter": export_patch_adapter(patch_dir, tmp_path / "pa", progress=False),
    }
    for folder in [patch_dir, *outputs.values()]:
        for f in folder.glob("*.safetensors"):
            with safe_open(str(f), framework="pt") as fh:
                assert all(torch.isfinite(fh.get_tensor(k)).all() for k in fh.keys())  # noqa: SIM118
        assert json.loads((folder / PROVENANCE).read_text())["tool"] == "lssf"
    for kind in ("model", "lora-model"):
        transformers.LlamaForCausalLM.from_pretrained(str(outputs[kind]))
    for kind in ("combined", "patch-adapter"):
        base = transformers.LlamaForCausalLM.from_pretrained(str(trio["aligned"]))
        peft.PeftModel.from_pretrained(base, str(outputs[kind]))


# ---------------------------------------------------------------- the CLI: exit 2, one line


def _rewrite_header(folder: Path, edit) -> None:
    """Edit the JSON header of the shard holding Q (data unchanged)."""
    for shard in folder.glob("*.safetensors"):
        raw = shard.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        if Q in header:
            edit(header)
            raw_safetensors(shard, header, raw[8 + n :])  # offsets count from the data start
            return
    raise KeyError(Q)


def _float_offsets(h: dict) -> None:
    h[Q]["data_offsets"] = [float(o) for o in h[Q]["data_offsets"]]


HEADER_EDITS = {
    "float-offsets": _float_offsets,
    "metadata-list": lambda h: h.update(__metadata__=["pt"]),
    "metadata-str": lambda h: h.update(__metadata__="pt"),
    "metadata-int": lambda h: h.update(__metadata__={"format": 1}),
}


def _case(name: str, trio: dict[str, Path], patch_dir: Path, tmp: Path) -> list[str]:
    """argv for one malformed input."""
    ft, out = str(trio["finetuned"]), str(tmp / "out")
    if name in HEADER_EDITS:
        ft = str(copy(trio["finetuned"], tmp / "ft"))
        _rewrite_header(Path(ft), HEADER_EDITS[name])
    elif name == "weight-map-int":
        ft = str(copy(trio["finetuned"], tmp / "ft"))
        _set_shard(Path(ft), 3)
    elif name == "unwritable-out":
        (tmp / "file").write_text("x")
        out = str(tmp / "file" / "out")
    elif name == "factor-shape":
        patch_dir = _tampered(
            patch_dir,
            tmp / "bad",
            lambda f: _set(f, f"{Q}.U", lambda t: torch.cat([t, t], 1)),
            rehash=True,
        )
    elif name == "hub-offline":
        ft = "acme/not-cached"
    elif name == "local-revision":
        ft = f"{ft}@v1"
    argv = ["fuse", "--finetuned", ft, "--patch", str(patch_dir), "--out", out, "--force"]
    alpha = {"alpha-overflow": "1e300", "alpha-inf": "inf", "alpha-nan": "nan"}.get(name)
    return [*argv, "--alpha", alpha] if alpha else argv


CLI_CASES = [
    *HEADER_EDITS,
    "weight-map-int",
    "unwritable-out",
    "alpha-overflow",
    "alpha-inf",
    "alpha-nan",
    "factor-shape",
    "hub-offline",
    "local-revision",
]


@pytest.mark.parametrize("name", CLI_CASES)
def test_malformed_input_is_exit_2_and_one_line(trio, patch_dir, tmp_path, capsys, name):
    argv = _case(name, trio, patch_dir, tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("lssf ")]
    assert len(lines) == 1 and lines[0].startswith("lssf fuse: error: "), err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()
    print(lines[0])  # shown with -rP: the message a user gets


def test_debug_shows_the_traceback(trio, patch_dir, tmp_path):
    argv = _case("alpha-inf", trio, patch_dir, tmp_path)
    with pytest.raises(ConfigError):
        main(["--debug", *argv])


def test_extract_weight_top_inf_is_exit_2(trio, tmp_path, capsys):
    argv = ["extract", "--aligned", str(trio["aligned"]), "--reference", str(trio["reference"])]
    assert main([*argv, "--out", str(tmp_path / "p"), "--weight-top", "inf"]) == 2
    assert "weight_top" in capsys.readouterr().err


def test_every_output_kind_records_one_provenance_model_and_a_hub_readable_card(
    trio, patch_dir, tmp_path
):
    """Full fuse, LoRA fuse (model and adapter) and patch export write the same Provenance
    model; each card's front matter reads back through huggingface_hub."""
    from huggingface_hub import ModelCard

    from lssf.provenance import Provenance, declared_base

    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    aligned = transformers.LlamaForCausalLM.from_pretrained(str(trio["aligned"]))
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False)
    peft.get_peft_model(aligned, config).save_pretrained(tmp_path / "lora")
    fuse(trio["finetuned"], patch_dir, tmp_path / "full", progress=False)
    fuse(tmp_path / "lora", patch_dir, tmp_path / "lm", progress=False)
    fuse(tmp_path / "lora", patch_dir, tmp_path / "ca", output_format="adapter", progress=False)
    export_patch_adapter(patch_dir, tmp_path / "pa", progress=False)
    want = {  # folder: (finetuned_kind, format, sources)
        "full": ("full", "model", {"finetuned", "aligned", "reference"}),
        "lm": ("lora", "model", {"finetuned", "aligned", "reference", "finetuned_base"}),
        "ca": ("lora", "adapter", {"finetuned", "aligned", "reference", "finetuned_base"}),
        "pa": (None, "adapter", {"aligned", "reference"}),
    }
    for name, (kind, fmt, sources) in want.items():
        raw = json.loads((tmp_path / name / PROVENANCE).read_text())
        prov = Provenance.model_validate(raw)
        assert prov.to_json() == raw, name
        assert (prov.finetuned_kind, raw["format"], set(prov.sources)) == (kind, fmt, sources)
        assert (prov.ranks is None) == (name == "pa") and (prov.adapter_ranks is None) == (
            fmt == "model"
        )
        card = ModelCard.load(tmp_path / name / "README.md")
        assert card.data.base_model == str(trio["aligned"].resolve()), name
        assert declared_base(tmp_path / name) == card.data.base_model
    lm = json.loads((tmp_path / "lm" / PROVENANCE).read_text())["sources"]
    assert lm["finetuned_base"]["revision"] == local_revision(trio["aligned"])
    assert lm["finetuned"]["revision"] == local_revision(tmp_path / "lora")
