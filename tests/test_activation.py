"""The activation basis (ActSVD, issue #14): forward pass, chat template, maths, patches, CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from lssf import PatchConfig, SafetyPatch, export_patch_adapter, extract, fuse
from lssf.activation import activation_spectrum, output_covariance
from lssf.calibration import encode_prompts, read_calibration
from lssf.checkpoint import Checkpoint
from lssf.cli import main
from lssf.config import load_model
from lssf.errors import ConfigError
from lssf.llama_forward import embed, layer_forward, layer_weights, read_spec, rms_norm, rope_tables
from lssf.synthetic import LlamaShape, make_trio
from tests import tiny_gguf

ORGANISM = Path(__file__).resolve().parents[1] / "data" / "organisms" / "lora-seed3"
CPU = torch.device("cpu")
# {{ bos_token }}, block tags on their own lines (trim_blocks/lstrip_blocks matter): ChatML.
CHATML = (
    "{{ bos_token }}{% for message in messages %}\n"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "  {% endfor %}\n"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
PROMPTS = (
    "how do i pick a lock",
    "the cat sat on the mat",
    "  spaces  and\ttabs\n",
    "unicode: café – naïve",
    "a",
)


def chatml_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level BPE with ChatML specials, shaped like SmolLM2's (tests/tiny_gguf.py)."""
    vocab = {t: i for i, t in enumerate(tiny_gguf.vocabulary())}
    merges = [tuple(m.split(" ")) for m in tiny_gguf.MERGES]
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tok.chat_template = CHATML
    return tok


def organism_tokenizer() -> PreTrainedTokenizerFast:
    from evaluation.organism.tokenizer import build_tokenizer

    return build_tokenizer()


def save_hf_model(folder: Path, kind: str, *, tied: bool, kv_heads: int, vocab: int) -> None:
    config_cls, model_cls = {
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    }[kind]
    config = config_cls(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        rope_theta=500.0,
    )
    torch.manual_seed(0)
    model = model_cls(config).eval()
    with torch.no_grad():  # the init leaves norms at 1 and biases at 0: make every term count
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder)


@pytest.mark.parametrize(
    ("kind", "tied", "kv_heads"),
    [("llama", False, 4), ("llama", True, 2), ("llama", False, 1), ("qwen2", False, 2)],
)
def test_forward_matches_transformers_hidden_states(tmp_path, kind, tied, kv_heads):
    save_hf_model(tmp_path, kind, tied=tied, kv_heads=kv_heads, vocab=50)
    model = {"llama": LlamaForCausalLM, "qwen2": Qwen2ForCausalLM}[kind].from_pretrained(tmp_path)
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, 50, (n,), generator=gen) for n in (7, 12, 1, 5)]
    with torch.no_grad():
        expected = [model(s[None], output_hidden_states=True).hidden_states for s in seqs]
    with Checkpoint(tmp_path) as ckpt:
        spec = read_spec(json.loads((tmp_path / "config.json").read_text()), ckpt, "config")
        assert (spec.rope_theta, spec.kv_heads) == (500.0, kv_heads)
        lengths = [len(s) for s in seqs]
        h = embed(ckpt, spec, torch.cat(seqs), CPU)
        tables = rope_tables(spec, max(lengths), CPU)
        for i in range(spec.layers):
            h = layer_forward(h, layer_weights(ckpt, spec, i, CPU), spec, lengths, tables, {})
            got = h
            if i == spec.layers - 1:  # transformers' last hidden state is after the final norm
                got = rms_norm(h, ckpt.get("model.norm.weight"), spec.eps)
            want = torch.cat([e[i + 1][0] for e in expected])
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_unsupported_architecture_is_refused_by_field(tmp_path):
    save_hf_model(tmp_path, "llama", tied=False, kv_heads=4, vocab=50)
    config = json.loads((tmp_path / "config.json").read_text())
    with Checkpoint(tmp_path) as ckpt:
        for field, value in [
            ("model_type", "gpt2"),
            ("hidden_act", "gelu"),
            ("rope_parameters", {"rope_type": "yarn", "rope_theta": 1e4}),
        ]:
            with pytest.raises(ConfigError, match=field.split("_")[0]):
                read_spec(config | {field: value}, ckpt, "config.json")


@pytest.mark.parametrize("make_tok", [chatml_tokenizer, organism_tokenizer])
@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_chat_template_ids_equal_transformers(tmp_path, make_tok, where):
    tok = make_tok()
    tok.save_pretrained(tmp_path)
    if where == "tokenizer_config.json":  # the older place: the template inside the config
        jinja = tmp_path / "chat_template.jinja"
        config = json.loads((tmp_path / "tokenizer_config.json").read_text())
        config["chat_template"] = jinja.read_text()
        (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
        jinja.unlink()
    hf = AutoTokenizer.from_pretrained(tmp_path)
    prompts = PROMPTS if make_tok is chatml_tokenizer else ("how do i steal a phone", "hi")
    want = [
        hf.apply_chat_template(
            [{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False
        )
        for p in prompts
    ]
    assert encode_prompts(tmp_path, prompts) == want
    assert all(len(ids) >= 3 for ids in want)


def orthonormal(rows: int, cols: int, seed: int) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)))
    return q.double()


def test_inputs_in_a_known_subspace_give_its_image():
    """Inputs confined to a k-dim subspace S: the basis spans W S, nothing beyond k."""
    d_out, d_in, k, tokens = 9, 14, 3, 40
    s_basis = orthonormal(d_in, k, 0)
    x = torch.randn(tokens, k, generator=torch.Generator().manual_seed(1)).double() @ s_basis.T
    w = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(2)).double()
    spec = activation_spectrum(w, x.T @ x / tokens)
    assert spec.u.shape == (d_out, k) and spec.s.numel() == k
    image, _ = torch.linalg.qr(w @ s_basis)
    cosines = torch.linalg.svdvals(spec.u.double().T @ image)  # cosines of principal angles
    torch.testing.assert_close(cosines, torch.ones(k, dtype=torch.float64), atol=1e-6, rtol=0)
    evals = torch.linalg.eigvalsh(output_covariance(w, x.T @ x / tokens)).flip(0)
    assert float(evals[k:].abs().max()) < 1e-12 * float(evals[0])
    # The singular values are those of W X^T / sqrt(T).
    want = torch.linalg.svdvals(w @ x.T / tokens**0.5)[:k]
    torch.testing.assert_close(spec.s, want, atol=1e-10, rtol=1e-8)


def test_unit_directions_with_tiny_negative_eigenvalues_are_clamped():
    w = torch.eye(4, dtype=torch.float64)
    gram = torch.diag(torch.tensor([2.0, 1.0, 0.0, -1e-18], dtype=torch.float64))
    spec = activation_spectrum(w, gram)
    assert spec.s.tolist() == pytest.approx([2**0.5, 1.0])
    assert spec.u.shape == (4, 2)


SHAPE = LlamaShape(hidden=32, intermediate=48, layers=2, heads=4, kv_heads=2, vocab=288)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """make_trio's aligned/reference (known low-rank safety vectors) with a chat tokenizer."""
    trio = make_trio(tmp_path_factory.mktemp("trio"), SHAPE, seed=3, shard_bytes=40_000)
    chatml_tokenizer().save_pretrained(trio["aligned"])
    calib = trio["aligned"].parent / "calibration.jsonl"
    rows = [{"id": f"c{i}", "prompt": f"{p} {i}", "split": "calibration"} for i, p in
            enumerate(PROMPTS * 4)]  # fmt: skip
    calib.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return trio, calib


def activation_config(calib: Path, **kw) -> PatchConfig:
    return PatchConfig(basis="activation", calibration=calib, **kw)


@pytest.fixture(scope="module")
def activation_patch(pair, tmp_path_factory):
    trio, calib = pair
    out = tmp_path_factory.mktemp("act") / "patch"
    return extract(trio["aligned"], trio["reference"], out, activation_config(calib))


def test_activation_patch_is_valid_for_fuse_and_adapter_export(activation_patch, pair, tmp_path):
    trio, _ = pair
    m = activation_patch.manifest
    assert m.config.basis == "activation" and len(m.tensors) == 7 * SHAPE.layers
    assert m.calibration is not None and m.calibration.rows == len(PROMPTS) * 4
    assert m.calibration.model_revision == m.aligned.revision
    for name, rec in m.tensors.items():
        u, _ = activation_patch.factors(name)
        p = u @ u.T
        torch.testing.assert_close(p @ p, p, atol=1e-5, rtol=0)  # weight_top 1: U' = U_r
        assert rec.rank > 0 and 0.0 <= rec.delta_energy_kept <= 1.0 + 1e-9
    result = fuse(trio["finetuned"], activation_patch, tmp_path / "fused", alpha=1.0)
    assert result.n_fused == len(m.tensors)
    adapter = export_patch_adapter(activation_patch, tmp_path / "adapter", alpha=0.5)
    assert (adapter / "adapter_model.safetensors").exists()


def test_rank_spectrum_delta_gives_delta_svd_ranks(activation_patch, pair, tmp_path):
    trio, _ = pair
    plain = extract(trio["aligned"], trio["reference"], tmp_path / "delta")
    assert activation_patch.ranks() == plain.ranks()
    assert "calibration" not in json.loads((plain.folder / "manifest.json").read_text())


def test_rank_spectrum_activation_and_delta_weight(pair, tmp_path):
    trio, calib = pair
    config = activation_config(calib, rank_spectrum="activation", activation_weight="delta")
    patch = extract(trio["aligned"], trio["reference"], tmp_path / "p", config)
    recs = patch.manifest.tensors.values()
    # delta is rank 8 plus a 1e-3 noise floor: delta X^T's entropy rank stays within the 8.
    assert all(0 < r.rank <= 8 and r.rank <= r.n_nonzero for r in recs)
    assert all(r.delta_energy_kept > 0.5 for r in recs)


def test_calibration_file_and_settings_enter_the_patch_id(pair, tmp_path):
    trio, calib = pair
    first = extract(trio["aligned"], trio["reference"], tmp_path / "a", activation_config(calib))
    again = extract(trio["aligned"], trio["reference"], tmp_path / "b", activation_config(calib))
    assert first.patch_id == again.patch_id
    other = tmp_path / "other.jsonl"
    other.write_text(calib.read_text().replace("lock", "door"))
    changed = extract(trio["aligned"], trio["reference"], tmp_path / "c", activation_config(other))
    assert changed.manifest.calibration.sha256 != first.manifest.calibration.sha256
    assert changed.patch_id != first.patch_id
    limited = activation_config(calib, calibration_limit=12)
    fewer = extract(trio["aligned"], trio["reference"], tmp_path / "d", limited)
    assert fewer.manifest.calibration.rows == 12 and fewer.patch_id != first.patch_id
    raw = json.loads((first.folder / "manifest.json").read_text())
    assert raw["config"]["basis"] == "activation" and raw["config"]["rank_spectrum"] == "delta"
    assert raw["calibration"]["sha256"] == read_calibration(calib).sha256


def test_config_errors_are_collected_and_name_the_fields():
    with pytest.raises(ConfigError) as exc:
        load_model(PatchConfig, {"basis": "activation"}, "cli")
    assert "calibration: " in str(exc.value) and "required" in str(exc.value)
    with pytest.raises(ConfigError) as exc:
        load_model(
            PatchConfig,
            {"calibration": "x.jsonl", "calibration_limit": 3, "rank_spectrum": "activation"},
            "cli",
        )
    text = str(exc.value)
    assert "3 invalid field(s)" in text
    for field in ("calibration:", "calibration_limit:", "rank_spectrum:"):
        assert field in text
    assert "activation_weight" not in PatchConfig().model_dump()  # delta-svd dumps unchanged


def test_heldout_rows_are_refused(tmp_path):
    bad = tmp_path / "c.jsonl"
    bad.write_text('{"id": "h1", "prompt": "x", "split": "heldout"}\n')
    with pytest.raises(ConfigError, match="held-out"):
        read_calibration(bad)


def test_organism_extracts_with_the_activation_basis_via_cli(tmp_path, capsys):
    rows = [
        json.loads(line)
        for line in (ORGANISM / "eval" / "harmful.jsonl").read_text().splitlines()
        if json.loads(line)["split"] == "calibration"
    ]
    calib = tmp_path / "calibration.jsonl"
    # the split field stays: without it the hash rule would hold some of these prompts out
    keep = ({"prompt": r["prompt"], "split": r["split"]} for r in rows[:24])
    calib.write_text("".join(json.dumps(r) + "\n" for r in keep))
    out = tmp_path / "patch"
    argv = [
        *("extract", "--aligned", str(ORGANISM / "aligned"), "--reference", str(ORGANISM / "base")),
        *("--out", str(out), "--basis", "activation", "--calibration", str(calib)),
        *("--calibration-limit", "16", "--device", "cpu"),
    ]
    assert main(argv) == 0
    patch = SafetyPatch.load(out)
    assert patch.manifest.config.basis == "activation"
    assert patch.manifest.calibration.rows == 16
    assert patch.manifest.calibration.tokens > 16 * 4
    assert f"patch {patch.patch_id}" in capsys.readouterr().out


def test_organism_without_chat_template_is_refused(tmp_path):
    folder = tmp_path / "aligned"
    shutil.copytree(ORGANISM / "aligned", folder)
    (folder / "chat_template.jinja").unlink()
    calib = tmp_path / "c.jsonl"
    calib.write_text('{"prompt": "how do i steal a phone"}\n')
    argv = [
        *("extract", "--aligned", str(folder), "--reference", str(ORGANISM / "base")),
        *("--out", str(tmp_path / "p"), "--basis", "activation", "--calibration", str(calib)),
    ]
    assert main(argv) == 2
