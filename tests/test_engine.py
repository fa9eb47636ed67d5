"""extract + fuse end to end on generated pico Llamas, and every bad-input refusal."""

from __future__ import annotations

import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import lssf
from lssf import SafetyPatch, extract, fuse
from lssf.errors import (
    CheckpointError,
    ConfigError,
    NonFiniteError,
    OutputError,
    OutputExistsError,
    PatchIntegrityError,
    PatchMismatchError,
    PickleRefusedError,
    ShapeMismatchError,
)
from lssf.synthetic import LlamaShape, make_trio

engine = importlib.import_module("lssf.extract")  # the module; lssf.extract is the function

SHAPE = LlamaShape(hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=64)
TRIO = {"shape": SHAPE, "seed": 1, "shard_bytes": 40_000}  # the `trio` fixture (tests/conftest.py)


@pytest.fixture(scope="module")
def patch(trio, tmp_path_factory):
    return extract(trio["aligned"], trio["reference"], tmp_path_factory.mktemp("p") / "patch")


def all_tensors(folder):
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def test_patch_manifest_records_sources_ranks_and_hashes(patch, trio):
    m = patch.manifest
    assert m.format_version == 1 and m.lssf_version == lssf.__version__
    assert len(m.tensors) == 7 * SHAPE.layers
    assert all(name.startswith("model.layers.") for name in m.tensors)
    assert all(0 < rec.rank <= 8 for rec in m.tensors.values())
    assert all(rec.entropy_ratio >= 0.85 for rec in m.tensors.values())
    assert m.aligned.revision.startswith("sha256:") and m.aligned.files
    assert m.reference.path == str(trio["reference"].resolve())
    assert SafetyPatch.load(patch.folder).patch_id == patch.patch_id


def test_fuse_adds_projected_delta_and_copies_the_rest_bit_for_bit(patch, trio, tmp_path):
    out = tmp_path / "out"
    result = fuse(trio["finetuned"], patch, out, alpha=0.7)
    assert result.n_fused == len(patch.manifest.tensors)
    ft, al, ref, got = (
        all_tensors(p) for p in (trio["finetuned"], trio["aligned"], trio["reference"], out)
    )
    assert got.keys() == ft.keys()
    for name, w in ft.items():
        if name not in patch.manifest.tensors:
            assert torch.equal(got[name], w), f"{name} must be untouched"
            continue
        delta = (al[name] - ref[name]).double()
        u64, _s, _ = torch.linalg.svd(delta, full_matrices=False)
        r = patch.manifest.tensors[name].rank
        expected = w.double() + 0.7 * u64[:, :r] @ (u64[:, :r].T @ delta)
        rel = torch.linalg.norm(got[name].double() - expected) / torch.linalg.norm(expected)
        assert rel < 1e-5, name
    # The output mirrors the input's sharding and index.
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(
        p.name for p in trio["finetuned"].glob("*.safetensors")
    )
    assert (out / "model.safetensors.index.json").read_text() == (
        trio["finetuned"] / "model.safetensors.index.json"
    ).read_text()


def test_output_is_a_complete_transformers_model_that_generates(patch, trio, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    fuse(trio["finetuned"], patch, out)
    prov = json.loads((out / "lssf_provenance.json").read_text())
    assert prov["patch_id"] == patch.patch_id and prov["alpha"] == 1.0
    assert prov["sources"]["finetuned"]["revision"].startswith("sha256:")
    card = (out / "README.md").read_text()
    assert "base_model:" in card and patch.patch_id in card
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = model.generate(torch.tensor([[1, 5, 9]]), max_new_tokens=6, do_sample=False)
    assert ids.shape == (1, 9)
    # And the weights really are the fused ones.
    sd = model.state_dict()
    name = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(sd[name], all_tensors(out)[name])


def test_bf16_checkpoint_in_bf16_out(tmp_path):
    folders = make_trio(tmp_path, SHAPE, seed=2, dtype=torch.bfloat16)
    patch = extract(folders["aligned"], folders["reference"], tmp_path / "patch")
    fuse(folders["finetuned"], patch, tmp_path / "out")
    got = all_tensors(tmp_path / "out")
    assert got["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert got["model.embed_tokens.weight"].dtype == torch.bfloat16


def test_zero_delta_patch_is_refused_by_fuse(trio, tmp_path):
    """A patch of rank 0 everywhere would fuse "0 tensors" and exit 0 (#25): refused instead."""
    patch = extract(trio["aligned"], trio["aligned"], tmp_path / "patch")
    assert all(rec.rank == 0 for rec in patch.manifest.tensors.values())
    with pytest.raises(PatchIntegrityError, match="rank 0 for all of its 14 tensor"):
        fuse(trio["finetuned"], patch, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def copy_model(src, dst):
    shutil.copytree(src, dst)
    return dst


def edit_tensor(folder, name, fn):
    for f in folder.glob("*.safetensors"):
        tensors = load_file(f)
        if name in tensors:
            tensors[name] = fn(tensors[name])
            save_file(tensors, f, metadata={"format": "pt"})
            return
    raise KeyError(name)


def assert_nothing_written(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


def test_shape_mismatch_names_tensor_and_both_shapes(trio, tmp_path):
    ref = copy_model(trio["reference"], tmp_path / "ref")
    name = "model.layers.1.self_attn.o_proj.weight"
    edit_tensor(ref, name, lambda t: t[:, :-1].contiguous())
    out = tmp_path / "patch"
    with pytest.raises(ShapeMismatchError, match=r"o_proj.weight.*\[32, 32\].*\[32, 31\]"):
        extract(trio["aligned"], ref, out)
    assert_nothing_written(out)


def test_finetune_with_other_shapes_is_refused(patch, tmp_path):
    other = make_trio(
        tmp_path / "other", LlamaShape(hidden=32, intermediate=48, layers=2, vocab=64)
    )
    out = tmp_path / "out"
    with pytest.raises(ShapeMismatchError, match=r"gate_proj.weight.*\[48, 32\].*\[64, 32\]"):
        fuse(other["finetuned"], patch, out, force=True)
    assert_nothing_written(out)


def test_missing_tensor_in_reference_is_named(trio, tmp_path):
    ref = copy_model(trio["reference"], tmp_path / "ref")
    name = "model.layers.0.mlp.up_proj.weight"
    for f in ref.glob("*.safetensors"):
        tensors = load_file(f)
        if tensors.pop(name, None) is not None:
            save_file(tensors, f)
    index = json.loads((ref / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    (ref / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ShapeMismatchError, match=r"up_proj\.weight.*not in the reference"):
        extract(trio["aligned"], ref, tmp_path / "patch")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(trio, tmp_path, bad):
    al = copy_model(trio["aligned"], tmp_path / "al")
    name = "model.layers.0.self_attn.v_proj.weight"
    edit_tensor(al, name, lambda t: t.index_fill(0, torch.tensor([0]), bad))
    out = tmp_path / "patch"
    with pytest.raises(NonFiniteError, match=r"v_proj\.weight.*aligned.*NaN/Inf"):
        extract(al, trio["reference"], out)
    assert_nothing_written(out)


def test_pickle_only_model_is_refused(trio, tmp_path):
    ft = tmp_path / "ft"
    ft.mkdir()
    (ft / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    (ft / "config.json").write_text("{}")
    patch_dir = tmp_path / "p"
    with pytest.raises(PickleRefusedError, match="safetensors"):
        extract(trio["aligned"], ft, patch_dir)
    assert_nothing_written(patch_dir)


def test_truncated_finetune_is_refused_and_nothing_written(patch, trio, tmp_path):
    ft = copy_model(trio["finetuned"], tmp_path / "ft")
    shard = sorted(ft.glob("*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=f"corrupt or truncated.*{shard.name}"):
        fuse(ft, patch, out)
    assert_nothing_written(out)


def test_patch_from_another_aligned_model_is_refused_unless_forced(patch, trio, tmp_path):
    ft = copy_model(trio["finetuned"], tmp_path / "ft")
    (ft / "README.md").write_text("---\nbase_model: someone/other-model\n---\n")
    with pytest.raises(PatchMismatchError, match="someone/other-model"):
        fuse(ft, patch, tmp_path / "out")
    assert_nothing_written(tmp_path / "out")
    fuse(ft, patch, tmp_path / "out", force=True)
    assert (tmp_path / "out" / "config.json").exists()


def test_existing_output_is_kept_unless_overwrite(patch, trio, tmp_path):
    # --overwrite replaces only a folder lssf wrote (issue #9): the existing `out` is an earlier
    # lssf output with a file of the user's added; a foreign folder is never replaced.
    out = tmp_path / "out"
    fuse(trio["finetuned"], patch, out, alpha=0.5)
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputExistsError):
        fuse(trio["finetuned"], patch, out)
    assert (out / "keep.txt").read_text() == "mine"
    fuse(trio["finetuned"], patch, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="not written by lssf"):
        fuse(trio["finetuned"], patch, foreign, overwrite=True)
    assert (foreign / "keep.txt").read_text() == "mine"


def test_killed_fuse_leaves_no_output(patch, trio, tmp_path):
    # A fuse killed mid-write must not leave `out`; only a hidden temp folder may remain.
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import importlib, time
        f = importlib.import_module("lssf.fuse")
        real = f.MappedWriter.done
        def slow(self, name):
            real(self, name)
            print("wrote", name, flush=True)
            time.sleep(30)
        f.MappedWriter.done = slow
        f.fuse({str(trio["finetuned"])!r}, {str(patch.folder)!r}, {str(out)!r}, progress=False)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("wrote")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    # The next run removes the killed run's temp folder (issue #9).
    assert [p for p in out.parent.iterdir() if p.name.startswith(".out.tmp-")]
    fuse(trio["finetuned"], patch, out, progress=False)
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.tmp-")]


def test_non_finite_finetune_is_refused_when_fusing(patch, trio, tmp_path):
    ft = copy_model(trio["finetuned"], tmp_path / "ft")
    name = "model.layers.1.mlp.up_proj.weight"
    edit_tensor(ft, name, lambda t: t.index_fill(1, torch.tensor([3]), float("nan")))
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=r"fused tensor 'model\.layers\.1\.mlp\.up_proj"):
        fuse(ft, patch, out)
    assert_nothing_written(out)


def test_patch_is_the_same_for_any_worker_count_and_read_ahead(trio, tmp_path, monkeypatch):
    threads = torch.get_num_threads()
    runs = {}
    for workers, budget in ((1, engine.READ_AHEAD_BYTES), (2, 1), (3, 10**9)):
        monkeypatch.setattr(engine, "READ_AHEAD_BYTES", budget)
        out = tmp_path / f"patch-{workers}"
        runs[workers] = extract(trio["aligned"], trio["reference"], out, workers=workers)
        assert torch.get_num_threads() == threads  # the caller's setting is restored
    first = runs[1]
    assert (first.folder / "factors.safetensors").stat().st_size > 0
    for p in runs.values():
        assert p.patch_id == first.patch_id
        assert (p.folder / "factors.safetensors").read_bytes() == (
            first.folder / "factors.safetensors"
        ).read_bytes()
        assert p.manifest.tensors == first.manifest.tensors


def test_a_failing_matrix_stops_every_worker_and_writes_nothing(trio, tmp_path):
    al = copy_model(trio["aligned"], tmp_path / "al")
    name = "model.layers.1.mlp.down_proj.weight"
    edit_tensor(al, name, lambda t: t.index_fill(0, torch.tensor([0]), float("nan")))
    out = tmp_path / "patch"
    with pytest.raises(NonFiniteError, match=r"down_proj\.weight.*aligned.*NaN/Inf"):
        extract(al, trio["reference"], out, workers=2)
    assert_nothing_written(out)


def test_worker_count_from_the_environment(trio, tmp_path, monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv(engine.WORKERS_ENV, "3")
    assert engine.default_workers(cpu) == 3
    monkeypatch.delenv(engine.WORKERS_ENV)
    assert 1 <= engine.default_workers(cpu) <= engine.MAX_WORKERS
    monkeypatch.setenv(engine.WORKERS_ENV, "two")
    with pytest.raises(ConfigError, match=r"LSSF_EXTRACT_WORKERS.*'two'"):
        extract(trio["aligned"], trio["reference"], tmp_path / "patch")
    with pytest.raises(ConfigError, match="workers must be at least 1, not 0"):
        extract(trio["aligned"], trio["reference"], tmp_path / "patch", workers=0)
