"""LoRA in, LoRA out: adapter fine-tunes are fused like merged ones; adapters come back out.

A pico Llama trio comes from ``lssf.synthetic.make_trio``; the LoRA fine-tune of its aligned
model is trained for a few steps with PEFT's own API, which also merges it (the reference) and
loads the adapters lssf writes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lssf import extract, fuse
from lssf.adapter_out import combine_lora, export_patch_adapter, safety_lora
from lssf.checkpoint import Checkpoint
from lssf.cli import main
from lssf.errors import (
    CheckpointError,
    ConfigError,
    PatchMismatchError,
    PickleRefusedError,
    ShapeMismatchError,
)
from lssf.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, lora_delta, lora_scale, pattern_value
from lssf.synthetic import LlamaShape

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


SHAPE = LlamaShape(hidden=32, intermediate=86, layers=2, heads=4, kv_heads=2, vocab=128)
TRIO = {"shape": SHAPE, "seed": 3}  # the `trio` fixture (tests/conftest.py)
IDS = torch.randint(0, SHAPE.vocab, (2, 10), generator=torch.Generator().manual_seed(7))

# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("lora")


@pytest.fixture(scope="module")
def patch_dir(trio: dict[str, Path], work: Path) -> Path:
    extract(trio["aligned"], trio["reference"], work / "patch", progress=False)
    return work / "patch"


def _load(folder: Path):
    return transformers.LlamaForCausalLM.from_pretrained(str(folder), dtype=torch.float32)


def _train_lora(aligned: Path, out: Path, config) -> dict[str, Path]:
    """A real PEFT LoRA fine-tune (three Adam steps), saved, and the same merged by PEFT."""
    torch.manual_seed(0)
    pm = peft.get_peft_model(_load(aligned), config)
    optim = torch.optim.Adam([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
    ids = torch.randint(0, SHAPE.vocab, (4, 12), generator=torch.Generator().manual_seed(1))
    for _ in range(3):
        optim.zero_grad()
        pm(input_ids=ids, labels=ids).loss.backward()
        optim.step()
    pm.save_pretrained(out / "adapter")
    pm.merge_and_unload().save_pretrained(out / "merged")
    return {"adapter": out / "adapter", "merged": out / "merged"}


@pytest.fixture(scope="module")
def lora_ft(trio: dict[str, Path], work: Path) -> dict[str, Path]:
    """Exercises rank_pattern, alpha_pattern, rsLoRA, an embedding LoRA and modules_to_save
    (lm_head, untouched by the patch, and every gate_proj, which the patch targets)."""
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "up_proj", "down_proj", "embed_tokens"],
        rank_pattern={"down_proj": 2},
        alpha_pattern={"model.layers.1.self_attn.q_proj": 3},
        use_rslora=True,
        modules_to_save=["lm_head", "gate_proj"],
        init_lora_weights=False,
    )
    return _train_lora(trio["aligned"], work / "ft", config)


@pytest.fixture(scope="module")
def fused_merged(lora_ft: dict[str, Path], patch_dir: Path, work: Path) -> Path:
    """The reference: the explicitly merged fine-tune, fused like any full fine-tune."""
    fuse(lora_ft["merged"], patch_dir, work / "fused_merged", alpha=0.8, progress=False)
    return work / "fused_merged"


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


# ---------------------------------------------------------------- pure maths


def test_pattern_value_follows_peft_matching() -> None:
    patterns = {"v_proj": 2, "model.layers.1.self_attn.q_proj": 3, "q_proj": 5}
    assert pattern_value(patterns, "model.layers.0.self_attn.v_proj", 4) == 2
    assert pattern_value(patterns, "model.layers.0.self_attn.xv_proj", 4) == 4
    assert pattern_value(patterns, "model.layers.1.self_attn.q_proj", 4) == 3
    assert pattern_value(patterns, "model.layers.0.self_attn.q_proj", 4) == 5


def test_scales_and_transposed_layouts() -> None:
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 5, generator=g), torch.randn(7, 3, generator=g)
    assert lora_scale(8, 4, rslora=False) == 2.0
    assert lora_scale(8, 4, rslora=True) == 4.0
    torch.testing.assert_close(lora_delta(a, b, 2.0, transposed=True), 2.0 * (b @ a).T)
    u, c = torch.randn(7, 2, generator=g), torch.randn(2, 5, generator=g)
    for transposed in (False, True):
        sa, sb = safety_lora(u, c, 0.5, transposed)
        want = 0.5 * (u @ c)
        torch.testing.assert_close(sb @ sa, want.T if transposed else want)
    ca, cb = combine_lora((a, b), 2.0, safety_lora(u, c, 0.5, False))
    torch.testing.assert_close(cb @ ca, 2.0 * b @ a + 0.5 * u @ c)


# ---------------------------------------------------------------- LoRA in


def test_fusing_adapter_equals_fusing_merged_finetune(
    lora_ft: dict[str, Path], patch_dir: Path, fused_merged: Path, work: Path
) -> None:
    out = work / "fused_adapter"
    result = fuse(lora_ft["adapter"], patch_dir, out, alpha=0.8, progress=False)
    assert result.n_fused > 0
    with Checkpoint(out) as got, Checkpoint(fused_merged) as want:
        assert sorted(got.names()) == sorted(want.names())
        for name in want.names():
            g, w = got.get(name), want.get(name)
            assert g.dtype == w.dtype == torch.float32, name
            rel = (g.double() - w.double()).norm() / w.double().norm().clamp_min(1e-30)
            assert rel < 1e-5, (name, float(rel))
    prov = json.loads((out / "lssf_provenance.json").read_text())
    assert prov["finetuned_kind"] == "lora"
    assert set(prov["sources"]["finetuned"]["files"]) == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    assert (out / "config.json").is_file()


# ---------------------------------------------------------------- LoRA out


def test_combined_adapter_in_peft_matches_merged_fused_model(
    trio: dict[str, Path], lora_ft: dict[str, Path], patch_dir: Path, fused_merged: Path, work: Path
) -> None:
    out = work / "combined"
    fuse(lora_ft["adapter"], patch_dir, out, alpha=0.8, output_format="adapter", progress=False)
    config = json.loads((out / ADAPTER_CONFIG).read_text())
    assert config["rank_pattern"] == config["alpha_pattern"]  # every module's scale is 1
    assert config["lora_alpha"] == config["r"] and not config["use_rslora"]
    q = "model.layers.0.self_attn.q_proj"
    patch_rank = json.loads((patch_dir / "manifest.json").read_text())["tensors"][f"{q}.weight"]
    assert config["rank_pattern"][q] == 4 + patch_rank["rank"]
    model = peft.PeftModel.from_pretrained(_load(trio["aligned"]), str(out))
    want = _logits(_load(fused_merged), IDS)
    torch.testing.assert_close(_logits(model, IDS), want, atol=1e-4, rtol=1e-4)


def test_patch_adapter_stacks_on_the_finetune_adapter(
    trio: dict[str, Path], patch_dir: Path, work: Path
) -> None:
    """A plain q/v LoRA (the common case) plus the patch adapter, both active in PEFT."""
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                             init_lora_weights=False)  # fmt: skip
    ft = _train_lora(trio["aligned"], work / "qv", config)
    fuse(ft["merged"], patch_dir, work / "qv" / "fused", alpha=0.8, progress=False)
    safety = export_patch_adapter(patch_dir, work / "safety", alpha=0.8, progress=False)
    model = peft.PeftModel.from_pretrained(
        _load(trio["aligned"]), str(ft["adapter"]), adapter_name="ft"
    )
    model.load_adapter(str(safety), adapter_name="safety")
    model.base_model.set_adapter(["ft", "safety"])
    want = _logits(_load(work / "qv" / "fused"), IDS)
    torch.testing.assert_close(_logits(model, IDS), want, atol=1e-4, rtol=1e-4)


def test_patch_adapter_alone_equals_fusing_the_aligned_model(
    trio: dict[str, Path], patch_dir: Path, work: Path
) -> None:
    assert main(["patch", "export-adapter", str(patch_dir), "--alpha", "0.5",
                 "--out", str(work / "safety_cli")]) == 0  # fmt: skip
    fuse(trio["aligned"], patch_dir, work / "aligned_fused", alpha=0.5, progress=False)
    model = peft.PeftModel.from_pretrained(_load(trio["aligned"]), str(work / "safety_cli"))
    want = _logits(_load(work / "aligned_fused"), IDS)
    torch.testing.assert_close(_logits(model, IDS), want, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------- refusals


def _bad_adapter(src: Path, dst: Path, config: dict | None = None) -> Path:
    shutil.copytree(src, dst)
    if config is not None:
        path = dst / ADAPTER_CONFIG
        path.write_text(json.dumps(json.loads(path.read_text()) | config))
    return dst


def _truncate_first_lora_a(folder: Path) -> None:
    tensors = load_file(folder / ADAPTER_WEIGHTS)
    key = next(k for k in sorted(tensors) if k.endswith("q_proj.lora_A.weight"))
    tensors[key] = tensors[key][:, :-1].contiguous()
    save_file(tensors, folder / ADAPTER_WEIGHTS, metadata={"format": "pt"})


def _pickle_only(folder: Path) -> None:
    (folder / ADAPTER_WEIGHTS).unlink()
    (folder / "adapter_model.bin").write_bytes(b"not a pickle: must never be opened")


BAD = {
    "no base": ({"base_model_name_or_path": None}, None, CheckpointError, "names no base model"),
    "missing base": (
        {"base_model_name_or_path": "/nonexistent/aligned"},
        None,
        CheckpointError,
        "cannot be resolved",
    ),
    "loha": ({"peft_type": "LOHA"}, None, CheckpointError, "peft_type 'LOHA' is not supported"),
    "dora": ({"use_dora": True}, None, CheckpointError, "DoRA"),
    "pickle": (None, _pickle_only, PickleRefusedError, "adapter_model.bin"),
    "shape": (None, _truncate_first_lora_a, ShapeMismatchError, "q_proj"),
    "rank": ({"rank_pattern": {}}, None, ShapeMismatchError, "rank 2 in its tensors but r=4"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("output_format", ["model", "adapter"])
def test_bad_adapters_are_refused_and_nothing_is_written(
    case: str, output_format: str, lora_ft: dict[str, Path], patch_dir: Path, tmp_path: Path
) -> None:
    config, mutate, error, message = BAD[case]
    bad = _bad_adapter(lora_ft["adapter"], tmp_path / "bad", config)
    if mutate:
        mutate(bad)
    out = tmp_path / "out"
    with pytest.raises(error, match=message) as info:
        fuse(bad, patch_dir, out, output_format=output_format, progress=False)
    if case in {"loha", "dora", "pickle"}:
        assert "lssf reads plain LoRA" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad"]


def test_adapter_on_another_base_is_refused_unless_forced(
    trio: dict[str, Path], lora_ft: dict[str, Path], patch_dir: Path, tmp_path: Path
) -> None:
    with pytest.raises(PatchMismatchError, match="not the aligned model"):
        fuse(lora_ft["adapter"], patch_dir, tmp_path / "out", aligned=trio["reference"])
    assert not (tmp_path / "out").exists()
    fuse(lora_ft["adapter"], patch_dir, tmp_path / "out", aligned=trio["reference"], force=True,
         output_format="adapter", progress=False)  # fmt: skip
    assert (tmp_path / "out" / ADAPTER_WEIGHTS).is_file()


def test_a_copy_of_the_aligned_model_is_recognised_by_content(
    trio: dict[str, Path], lora_ft: dict[str, Path], patch_dir: Path, tmp_path: Path
) -> None:
    copy = shutil.copytree(trio["aligned"], tmp_path / "aligned-copy")
    fuse(lora_ft["adapter"], patch_dir, tmp_path / "out", aligned=copy, output_format="adapter",
         progress=False)  # fmt: skip
    prov = json.loads((tmp_path / "out" / "lssf_provenance.json").read_text())
    assert prov["sources"]["finetuned_base"]["path"] == str(copy.resolve())


def test_full_finetune_as_adapter_is_not_applicable(
    trio: dict[str, Path], patch_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with pytest.raises(ConfigError, match="not applicable"):
        fuse(trio["finetuned"], patch_dir, tmp_path / "out", output_format="adapter")
    argv = ["fuse", "--finetuned", str(trio["finetuned"]), "--patch", str(patch_dir)]
    assert main([*argv, "--out", str(tmp_path / "out"), "--format", "adapter"]) == 2
    assert "not applicable" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- fan_in_fan_out (GPT-2 Conv1D)


@pytest.fixture(scope="module")
def gpt2_pair(work: Path) -> dict[str, Path]:
    """A pico GPT-2 reference and an aligned model: each block weight plus a rank-4 change."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=128, n_positions=32)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(work / "gpt2_ref")
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".h." in name and param.ndim == 2:
                param += 0.05 * torch.randn(param.shape[0], 4) @ torch.randn(4, param.shape[1])
    model.save_pretrained(work / "gpt2_aligned")
    return {"reference": work / "gpt2_ref", "aligned": work / "gpt2_aligned"}


def test_fan_in_fan_out_adapter_in_and_out(gpt2_pair: dict[str, Path], work: Path) -> None:
    """Conv1D stores (d_in, d_out); PEFT applies (B @ A)^T, and so must lssf, both ways."""
    patch = extract(gpt2_pair["aligned"], gpt2_pair["reference"], work / "gpt2_patch",
                    progress=False)  # fmt: skip
    aligned = transformers.GPT2LMHeadModel.from_pretrained(str(gpt2_pair["aligned"]))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"],
                             fan_in_fan_out=True, init_lora_weights=False)  # fmt: skip
    pm = peft.get_peft_model(aligned, config)
    pm.save_pretrained(work / "gpt2_lora")
    pm.merge_and_unload().save_pretrained(work / "gpt2_merged")
    fuse(work / "gpt2_merged", patch, work / "gpt2_want", progress=False)
    fuse(work / "gpt2_lora", patch, work / "gpt2_got", progress=False)
    with Checkpoint(work / "gpt2_got") as got, Checkpoint(work / "gpt2_want") as want:
        for name in want.names():
            torch.testing.assert_close(got.get(name), want.get(name), rtol=1e-5, atol=1e-6)
    fuse(work / "gpt2_lora", patch, work / "gpt2_adapter", output_format="adapter", progress=False)
    base = transformers.GPT2LMHeadModel.from_pretrained(str(gpt2_pair["aligned"]))
    model = peft.PeftModel.from_pretrained(base, str(work / "gpt2_adapter"))
    want_model = transformers.GPT2LMHeadModel.from_pretrained(str(work / "gpt2_want"))
    torch.testing.assert_close(_logits(model, IDS), _logits(want_model, IDS), atol=1e-4, rtol=1e-4)
