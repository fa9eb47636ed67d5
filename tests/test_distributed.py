"""Distributed extraction: shards, their assembly, the sharded patch format, the Dask flow.

The claim: a patch assembled from shards holds the same factors, bit for bit, as the patch one
process extracts (each matrix is decomposed by the same single-threaded code), and the
consolidated assembly is that very patch folder (same bytes, same id).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lssf import PatchConfig, SafetyPatch, extract, fuse
from lssf.errors import CheckpointError, ConfigError, OutputExistsError, PatchIntegrityError
from lssf.extract import list_targets
from lssf.outputs import PROVENANCE
from lssf.patch import FACTORS, MANIFEST, SHARDED_FORMAT_VERSION
from lssf.shards import assemble_patch, extract_shard, group_by_layer
from lssf.st_io import file_sha256
from lssf.synthetic import LlamaShape, make_trio
from tasks.extract_tasks import extract_group, plan_shards, worker_device, worker_rank

SHAPE = LlamaShape(hidden=32, intermediate=64, layers=3, heads=4, kv_heads=2, vocab=64)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Both sides on one torch thread: the precondition of the bit-identity claim."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    return make_trio(tmp_path_factory.mktemp("trio"), SHAPE, seed=4, shard_bytes=40_000)


@pytest.fixture(scope="module")
def single(trio, tmp_path_factory) -> SafetyPatch:
    out = tmp_path_factory.mktemp("single") / "patch"
    return extract(trio["aligned"], trio["reference"], out, progress=False)


@pytest.fixture(scope="module")
def shards(trio, tmp_path_factory) -> list[Path]:
    """One shard per decoder layer, extracted in reverse order (order must not matter)."""
    stage = tmp_path_factory.mktemp("stage")
    groups = group_by_layer(list_targets(trio["aligned"], trio["reference"]))
    assert len(groups) == SHAPE.layers
    paths = []
    for k, names in reversed(list(enumerate(groups))):
        path = stage / f"layer-{k}.safetensors"
        extract_shard(trio["aligned"], trio["reference"], path, names[::-1])
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def sharded(trio, shards, tmp_path_factory) -> SafetyPatch:
    out = tmp_path_factory.mktemp("sharded") / "patch"
    return assemble_patch(shards, trio["aligned"], trio["reference"], out)


def assert_same_factors(a: SafetyPatch, b: SafetyPatch) -> None:
    assert list(a.manifest.tensors) == list(b.manifest.tensors)
    assert a.manifest.tensors == b.manifest.tensors  # ranks, entropies, norms
    for name in a.manifest.tensors:
        for x, y in zip(a.factors(name), b.factors(name), strict=True):
            assert x.dtype == y.dtype == torch.float32 and x.shape == y.shape
            assert torch.equal(x.view(torch.int32), y.view(torch.int32)), name  # same bits


def test_sharded_patch_has_the_single_process_factors_bit_for_bit(single, sharded):
    m = sharded.manifest
    assert m.format_version == SHARDED_FORMAT_VERSION and m.factors_sha256 is None
    assert not (sharded.folder / FACTORS).exists()
    assert [s.file for s in m.shards] == [
        f"factors-{k:05d}-of-{SHAPE.layers:05d}.safetensors" for k in range(1, SHAPE.layers + 1)
    ]
    listed = [t for s in m.shards for t in s.tensors]
    assert sorted(listed) == sorted(m.tensors) and len(listed) == len(set(listed))
    for s in m.shards:
        assert file_sha256(sharded.folder / s.file) == s.sha256
    assert (m.config, m.aligned, m.reference) == (
        single.manifest.config,
        single.manifest.aligned,
        single.manifest.reference,
    )
    assert_same_factors(single, sharded)
    reloaded = SafetyPatch.load(sharded.folder)
    assert reloaded.patch_id == sharded.patch_id != single.patch_id
    prov = json.loads((sharded.folder / PROVENANCE).read_text())
    assert prov["patch_id"] == sharded.patch_id
    assert prov["shards"] == {s.file: s.sha256 for s in m.shards}


def test_consolidated_assembly_is_the_single_process_patch_byte_for_byte(
    trio, shards, single, tmp_path
):
    patch = assemble_patch(
        shards, trio["aligned"], trio["reference"], tmp_path / "p", consolidate=True
    )
    assert patch.patch_id == single.patch_id
    for name in (MANIFEST, FACTORS, PROVENANCE):
        assert (patch.folder / name).read_bytes() == (single.folder / name).read_bytes(), name


def test_an_unsharded_manifest_round_trips_unchanged(single):
    """The sharded variant's optional fields leave a format-1 manifest's bytes as they were."""
    text = (single.folder / MANIFEST).read_text()
    loaded = SafetyPatch.load(single.folder).manifest
    assert json.dumps(loaded.model_dump(mode="json"), indent=2) + "\n" == text
    assert "shards" not in json.loads(text) and loaded.format_version == 1


def _edit_shard(path: Path) -> None:
    tensors = load_file(path)
    key = next(k for k in tensors if k.endswith(".C"))
    tensors[key].view(-1)[0] += 1e-3
    save_file(tensors, path)


def test_a_tampered_shard_is_refused_by_assembly(trio, shards, tmp_path):
    copies = []
    for p in shards:
        copies.append(tmp_path / p.name)
        shutil.copyfile(p, copies[-1])
        shutil.copyfile(p.with_name(p.name + ".json"), tmp_path / (p.name + ".json"))
    _edit_shard(copies[1])
    with pytest.raises(PatchIntegrityError, match=r"layer-1\.safetensors was changed after"):
        assemble_patch(copies, trio["aligned"], trio["reference"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_tampered_shard_in_a_patch_is_refused_and_a_rehash_changes_the_id(
    trio, sharded, tmp_path
):
    bad = Path(shutil.copytree(sharded.folder, tmp_path / "bad"))
    shard = sharded.manifest.shards[1]
    _edit_shard(bad / shard.file)
    with pytest.raises(PatchIntegrityError, match="changed after extraction"):
        SafetyPatch.load(bad)
    with pytest.raises(PatchIntegrityError, match="changed after extraction"):
        fuse(trio["finetuned"], bad, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    manifest = json.loads((bad / MANIFEST).read_text())
    manifest["shards"][1]["sha256"] = file_sha256(bad / shard.file)
    (bad / MANIFEST).write_text(json.dumps(manifest))
    assert SafetyPatch.load(bad).patch_id != sharded.patch_id


def test_a_missing_or_duplicated_target_is_refused_by_assembly(trio, shards, tmp_path):
    args = trio["aligned"], trio["reference"]
    with pytest.raises(PatchIntegrityError, match=r"missing \['model\.layers\.2\."):
        assemble_patch(shards[1:], *args, tmp_path / "a")  # shards[0] holds layer 2
    names = list_targets(*args)
    extra = tmp_path / "extra.safetensors"
    extract_shard(*args, extra, [names[0]])
    with pytest.raises(PatchIntegrityError, match=rf"{names[0]}' is in both"):
        assemble_patch([*shards, extra], *args, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def _manifest_edit(folder: Path, dst: Path, edit) -> Path:
    bad = Path(shutil.copytree(folder, dst))
    manifest = json.loads((bad / MANIFEST).read_text())
    edit(manifest)
    (bad / MANIFEST).write_text(json.dumps(manifest))
    return bad


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["shards"][0]["tensors"].pop(), "no shard holds"),
        (
            lambda m: m["shards"][0]["tensors"].append(m["shards"][1]["tensors"][0]),
            "exactly one",
        ),
        (lambda m: m.pop("shards"), "records no shards"),
        (lambda m: m.update(factors_sha256="0" * 64), "not factors_sha256"),
        (lambda m: m["shards"][0].update(file="../x.safetensors"), "no path"),
    ],
    ids=["dropped", "duplicated", "no-shards", "both-variants", "path"],
)
def test_an_edited_sharded_manifest_is_refused(sharded, tmp_path, edit, message):
    bad = _manifest_edit(sharded.folder, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=message):
        SafetyPatch.load(bad)


def test_shards_of_another_config_are_refused(trio, shards, tmp_path):
    args = trio["aligned"], trio["reference"]
    other = tmp_path / "other.safetensors"
    first = json.loads(shards[-1].with_name(shards[-1].name + ".json").read_text())["tensors"]
    extract_shard(*args, other, list(first), PatchConfig(eta=0.5))
    with pytest.raises(PatchIntegrityError, match=r"differs from this assembly in \['config'\]"):
        assemble_patch([*shards[:-1], other], *args, tmp_path / "out")


def test_extract_shard_refuses_bad_requests(trio, tmp_path):
    args = trio["aligned"], trio["reference"]
    names = list_targets(*args)
    with pytest.raises(ConfigError, match="not targets of"):
        extract_shard(*args, tmp_path / "s.safetensors", ["model.norm.weight"])
    with pytest.raises(ConfigError, match="duplicated"):
        extract_shard(*args, tmp_path / "s.safetensors", [names[0], names[0]])
    activation = PatchConfig(basis="activation", calibration=tmp_path / "c.jsonl")
    with pytest.raises(ConfigError, match="cannot be extracted in shards"):
        extract_shard(*args, tmp_path / "s.safetensors", names[:1], activation)
    assert not list(tmp_path.iterdir())


def test_fuse_of_a_sharded_patch_writes_the_same_model_bytes(trio, single, sharded, tmp_path):
    a = fuse(trio["finetuned"], single, tmp_path / "a", progress=False)
    b = fuse(trio["finetuned"], sharded, tmp_path / "b", progress=False)
    assert a.n_fused == b.n_fused > 0
    files = sorted(p.name for p in (tmp_path / "a").glob("*.safetensors"))
    assert files and files == sorted(p.name for p in (tmp_path / "b").glob("*.safetensors"))
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


def test_each_worker_pins_its_own_device():
    assert [worker_device(r, 2) for r in range(4)] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert worker_device(3, 0) == worker_device(None, 0) == "cpu"
    assert worker_device(None, 1) == "cuda:0"
    assert worker_rank() is None  # not inside a Dask worker


def test_group_by_layer_keeps_order_and_puts_the_rest_last():
    names = ["lm_head.weight", "model.layers.10.a", "model.layers.2.a", "model.layers.3.b"]
    assert group_by_layer(names, 2) == [
        ["model.layers.2.a", "model.layers.3.b"],
        ["model.layers.10.a"],
        ["lm_head.weight"],
    ]
    with pytest.raises(ConfigError, match="at least 1"):
        group_by_layer(names, 0)


def test_a_retried_group_reuses_its_intact_shard_and_redoes_a_damaged_one(trio, tmp_path):
    args = str(trio["aligned"]), str(trio["reference"])
    (names, *_) = plan_shards.fn(*args, str(tmp_path / "out"), PatchConfig())
    shard = tmp_path / "g.safetensors"
    extract_group.fn(*args, str(shard), names, PatchConfig())
    first = shard.stat().st_mtime_ns
    extract_group.fn(*args, str(shard), names, PatchConfig())
    assert shard.stat().st_mtime_ns == first  # reused, not recomputed
    good = shard.read_bytes()
    _edit_shard(shard)
    extract_group.fn(*args, str(shard), names, PatchConfig())
    assert shard.read_bytes() == good  # recomputed: the same bytes as the first time


def test_the_flow_refuses_an_existing_output_before_any_work(trio, single):
    args = str(trio["aligned"]), str(trio["reference"])
    with pytest.raises(OutputExistsError, match="exists"):
        plan_shards.fn(*args, str(single.folder), PatchConfig())


@pytest.mark.slow
def test_the_flow_on_a_local_two_worker_dask_cluster_equals_one_process(
    harness, forkserver_workers, trio, single, tmp_path
):
    """A LocalCluster of 2 one-thread worker processes, started by the flow's task runner,
    against the session's Prefect server (`harness`, tests/conftest.py)."""
    from flows.extract import run_distributed, staging_folder

    out = tmp_path / "patch"
    result = run_distributed(trio["aligned"], trio["reference"], out, workers=2)
    patch = SafetyPatch.load(out)
    assert result == {"patch_id": patch.patch_id, "out": str(out), "shards": SHAPE.layers}
    assert len(patch.manifest.shards) == SHAPE.layers
    assert_same_factors(single, patch)
    assert not staging_folder(out).exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_shards_on_the_gpu_equal_one_gpu_process(trio, tmp_path):
    """Each group on the device a worker of rank i pins (cuda:i mod GPUs), against one process
    on cuda:0: the same kernels on the same device model, so the same factors."""
    args = trio["aligned"], trio["reference"]
    one = extract(*args, tmp_path / "one", device="cuda:0", progress=False)
    groups = group_by_layer(list_targets(*args))
    shards = []
    for rank, names in enumerate(groups):
        shards.append(tmp_path / f"g{rank}.safetensors")
        device = worker_device(rank, torch.cuda.device_count())
        extract_shard(*args, shards[-1], names, device=device)
    assert_same_factors(one, assemble_patch(shards, *args, tmp_path / "sharded"))
