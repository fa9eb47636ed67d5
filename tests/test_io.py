"""Streaming safetensors I/O: round trips against the reference library, and refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lssf.checkpoint import Checkpoint, weight_files
from lssf.errors import CheckpointError, PickleRefusedError
from lssf.st_io import AppendingWriter, PlannedWriter, TensorSpec, file_sha256, read_header

TENSORS = {
    "a": torch.randn(3, 5),
    "b": torch.randn(7).bfloat16(),
    "c": torch.arange(6, dtype=torch.int64).reshape(2, 3),
    "empty": torch.zeros(0, 4),
    "h": torch.randn(2, 2).half(),
}


def test_reader_matches_safetensors_library(tmp_path):
    save_file(TENSORS, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with Checkpoint(tmp_path) as ckpt:
        assert sorted(ckpt.names()) == sorted(TENSORS)
        for name, t in TENSORS.items():
            got = ckpt.get(name)
            assert got.dtype == t.dtype and torch.equal(got, t), name


@pytest.mark.parametrize("writer_kind", ["planned", "appending"])
def test_writers_produce_files_the_library_reads(tmp_path, writer_kind):
    path = tmp_path / "out.safetensors"
    if writer_kind == "planned":
        specs = [TensorSpec(n, t.dtype, tuple(t.shape)) for n, t in TENSORS.items()]
        writer = PlannedWriter(path, specs)
    else:
        writer = AppendingWriter(path)
    for name, t in TENSORS.items():
        writer.write(name, t)
    writer.close()
    loaded = load_file(path)
    for name, t in TENSORS.items():
        assert torch.equal(loaded[name], t), name
    assert not (tmp_path / "out.safetensors.body").exists()


def test_planned_writer_rejects_out_of_plan_tensor(tmp_path):
    writer = PlannedWriter(tmp_path / "x.safetensors", [TensorSpec("a", torch.float32, (2,))])
    with pytest.raises(CheckpointError, match="expected 'a'"):
        writer.write("a", torch.zeros(3))


def test_iter_file_hashes_the_whole_file(tmp_path):
    save_file(TENSORS, tmp_path / "model.safetensors")
    with Checkpoint(tmp_path) as ckpt:
        names = [info.name for info, _ in ckpt.iter_file(ckpt.headers[0])]
        assert sorted(names) == sorted(TENSORS)
        assert ckpt.sha256["model.safetensors"] == file_sha256(tmp_path / "model.safetensors")


def test_truncated_file_is_refused_before_reading(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file(TENSORS, path)
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(CheckpointError, match=r"corrupt or truncated .*model.safetensors"):
        Checkpoint(tmp_path)


@pytest.mark.parametrize(
    "payload",
    [b"\x01\x00", b"\xff" * 8 + b"{}", b"\x05\x00\x00\x00\x00\x00\x00\x00{oops"],
    ids=["short", "huge-header", "bad-json"],
)
def test_corrupt_header_is_refused(tmp_path, payload):
    (tmp_path / "model.safetensors").write_bytes(payload)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Checkpoint(tmp_path)


def test_inconsistent_offsets_are_refused(tmp_path):
    header = json.dumps({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}).encode()
    (tmp_path / "model.safetensors").write_bytes(
        len(header).to_bytes(8, "little") + header + b"\0" * 4
    )
    with pytest.raises(CheckpointError, match="'w' spans"):
        read_header(tmp_path / "model.safetensors")


def test_pickle_only_checkpoint_is_refused_without_unpickling(tmp_path, monkeypatch):
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")

    def boom(*a, **k):
        raise AssertionError("torch.load must never be called")

    monkeypatch.setattr(torch, "load", boom)
    with pytest.raises(PickleRefusedError, match="requires safetensors"):
        weight_files(tmp_path)


def test_index_naming_a_missing_shard_is_refused(tmp_path):
    index = {"weight_map": {"w": "model-00001-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="missing shard"):
        weight_files(tmp_path)


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        weight_files(tmp_path / "nope")


def test_atomic_write_replaces_whole_or_leaves_the_old_file(tmp_path, monkeypatch):
    from lssf.outputs import atomic_write_bytes, atomic_write_text, write_json

    path = tmp_path / "f.json"
    write_json(path, {"a": 1})
    assert path.read_text() == '{\n  "a": 1\n}\n'

    def broken_fsync(fd: int) -> None:
        raise OSError(5, "disk gone")

    monkeypatch.setattr("lssf.outputs.os.fsync", broken_fsync)
    with pytest.raises(OSError, match="disk gone"):
        atomic_write_text(path, "new")
    assert path.read_text() == '{\n  "a": 1\n}\n'  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]  # no temp file left
    monkeypatch.undo()
    atomic_write_bytes(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"


def test_pick_device_and_yaml_models(tmp_path):
    import torch

    from lssf.config import PatchConfig, load_yaml_model
    from lssf.devices import pick_device
    from lssf.errors import ConfigError

    assert pick_device(None) == pick_device("auto")
    assert pick_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        pick_device("tpu")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("eta: 0.5\nmax_rank: 3\n")
    assert load_yaml_model(cfg, PatchConfig) == PatchConfig(eta=0.5, max_rank=3)
    cfg.write_text("eta: 2\nbogus: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: 2 invalid field\(s\)(.|\n)*eta(.|\n)*bogus"):
        load_yaml_model(cfg, PatchConfig)
