"""Issue 25, budgets: nothing an untrusted fine-tune carries can hang lssf, and patches, folder
revisions and calibration files cannot be edited past their checks.

The hang cases run in a child interpreter with a time limit, so that before the fix they fail
(time out) instead of hanging the suite.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from lssf import extract
from lssf.calibration import read_calibration
from lssf.cli import main
from lssf.config import PatchConfig
from lssf.errors import CheckpointError, ConfigError, PatchIntegrityError
from lssf.patch import SafetyPatch
from lssf.sources import local_revision
from lssf.splits import hash_unit, normalise_prompt
from lssf.st_io import MAX_NAME_CHARS, read_header
from lssf.templates import TemplateBudgetError, render_chat_template

TRIO = {"shard_bytes": 40_000}  # sharded folders: they carry an index
ROOT = Path(__file__).resolve().parents[1]
NESTED_LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
CHATML = (
    "{{ bos_token }}{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def run_child(code: str, limit: float = 60.0) -> subprocess.CompletedProcess[str]:
    """``code`` in a fresh interpreter; a hang shows as a timeout, a failure of this test."""
    try:
        return subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=limit
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {limit} s: {code[:200]}")


@pytest.fixture(scope="module")
def patch_dir(trio: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("patch") / "patch"
    extract(trio["aligned"], trio["reference"], out, progress=False)
    return out


def write_adapter(folder: Path, base: Path, **config: object) -> Path:
    """A one-module PEFT LoRA adapter (rank 2 on layer 0's q_proj) on ``base``."""
    folder.mkdir(parents=True)
    settings = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": str(base)}
    (folder / "adapter_config.json").write_text(json.dumps(settings | config))
    key = "base_model.model.model.layers.0.self_attn.q_proj"
    tensors = {
        f"{key}.lora_A.weight": torch.zeros(2, 64),
        f"{key}.lora_B.weight": torch.zeros(64, 2),
    }
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


def copy_patch(src: Path, dst: Path, edit) -> Path:
    """``src`` copied with its manifest's JSON passed through ``edit``."""
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    manifest = json.loads((src / "manifest.json").read_text())
    edit(manifest)
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dst


# -- serious 3: regexes from adapter configs ---------------------------------------------------


def test_nested_quantifier_rank_pattern_is_matched_in_linear_time(trio, tmp_path):
    """``(.*.*)*z`` backtracked for ever in ``re``; the linear engine just finds no match."""
    adapter = write_adapter(tmp_path / "ad", trio["aligned"], rank_pattern={"(.*.*)*z": 16})
    child = run_child(
        "from lssf.lora import LoraAdapter\n"
        f"with LoraAdapter({str(adapter)!r}) as a:\n"
        "    print([round(m.scale, 3) for m in a.modules.values()])\n"
    )
    assert child.returncode == 0, child.stderr
    assert child.stdout.strip() == "[2.0]"  # r=2, lora_alpha=4: the pattern matched nothing


@pytest.mark.parametrize(
    ("field", "key", "why"),
    [
        ("alpha_pattern", r"(?=q)q_proj", "lookahead"),
        ("rank_pattern", r"(q)\1", "backreference"),
        ("rank_pattern", "q" * 600, "characters long"),
        ("alpha_pattern", r"(x{100}){100}", "states"),
    ],
)
def test_unsafe_adapter_patterns_fail_with_one_line(
    trio, patch_dir, tmp_path, capsys, field, key, why
):
    adapter = write_adapter(tmp_path / "ad", trio["aligned"], **{field: {key: 2}})
    code = main(
        [
            "fuse",
            "--finetuned",
            str(adapter),
            "--patch",
            str(patch_dir),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    err = capsys.readouterr().err
    assert code == 2 and field in err and why in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_plain_rank_patterns_still_apply(trio, tmp_path):
    from lssf.lora import LoraAdapter

    folder = write_adapter(
        tmp_path / "ad",
        trio["aligned"],
        r=8,
        rank_pattern={r"layers\.[0-9]+\.self_attn\.q_proj": 2},
    )
    with LoraAdapter(folder) as adapter:
        (module,) = adapter.modules.values()
    assert module.scale == 2.0  # lora_alpha 4 / rank 2 from the pattern (r=8 otherwise)


# -- serious 7: tensor names --------------------------------------------------------------------


def write_raw_safetensors(path: Path, name: str) -> None:
    header = json.dumps({name: {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + b"\0\0\0\0")


def test_overlong_tensor_name_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "model.safetensors"
    write_raw_safetensors(path, "model.layers.0." + "h.0." * 400 + "mlp.weight")
    with pytest.raises(CheckpointError, match="characters long") as exc:
        read_header(path)
    assert str(path) in str(exc.value) and str(MAX_NAME_CHARS) in str(exc.value)
    write_raw_safetensors(path, "model.layers.0." + "x" * 900 + ".weight")
    assert len(read_header(path).tensors) == 1  # a long but plausible name still reads


def test_default_include_and_exclude_are_linear_in_the_name():
    config = PatchConfig()
    name = "h.0." * 50_000 + "norm"  # 200k characters; re's search took ~10 s on it
    start = time.perf_counter()
    assert not config.is_target(name, 2)
    assert config.is_target("model.layers.3.mlp.up_proj.weight", 2)
    assert not config.is_target("model.layers.3.input_layernorm.weight", 2)
    assert time.perf_counter() - start < 3.0


def test_include_patterns_outside_the_linear_subset_are_refused():
    with pytest.raises(ValueError, match=r"(?s)include.*lookahead"):
        PatchConfig(include=[r"(?!lm_head).*\.weight$"])
    with pytest.raises(ValueError, match=r"(?s)exclude.*backreference"):
        PatchConfig(exclude=[r"(a)\1"])


# -- serious 4: chat templates ------------------------------------------------------------------


def test_nested_loop_template_is_refused_when_rendering_calibration(tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "chat_template.jinja").write_text(NESTED_LOOPS + CHATML)
    child = run_child(
        "from lssf.calibration import chat_template, render_prompt\n"
        f"t, s = chat_template(__import__('pathlib').Path({str(folder)!r}))\n"
        "try:\n    render_prompt(t, s, 'hi')\nexcept Exception as e:\n"
        "    print(type(e).__name__, e)\n"
    )
    assert "TemplateBudgetError" in child.stdout and "operations" in child.stdout


def test_extract_activation_refuses_a_template_over_budget(trio, tmp_path, capsys):
    from tests.test_activation import chatml_tokenizer

    aligned = tmp_path / "aligned"
    aligned.mkdir()
    for f in trio["aligned"].iterdir():
        (aligned / f.name).write_bytes(f.read_bytes())
    chatml_tokenizer().save_pretrained(aligned)
    (aligned / "chat_template.jinja").write_text(NESTED_LOOPS)
    calib = tmp_path / "c.jsonl"
    calib.write_text('{"prompt": "how do i pick a lock", "split": "calibration"}\n')
    argv = [
        "extract",
        "--aligned",
        str(aligned),
        "--reference",
        str(trio["reference"]),
        "--out",
        str(tmp_path / "p"),
        "--basis",
        "activation",
        "--calibration",
        str(calib),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "chat template" in err and str(aligned) in err and err.count("\n") == 1
    assert not (tmp_path / "p").exists()


def test_evaluate_refuses_a_template_over_budget_before_lm_eval(trio, tmp_path, capsys):
    pytest.importorskip("lm_eval")
    model = tmp_path / "model"
    model.mkdir()
    (model / "chat_template.jinja").write_text(NESTED_LOOPS + CHATML)
    argv = [
        "evaluate",
        "--model",
        str(model),
        "--suite",
        "organism",
        "--out",
        str(tmp_path / "r.json"),
        "--device",
        "cpu",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "chat template" in err and "operations" in err and str(model) in err
    assert not (tmp_path / "r.json").exists()


def test_transformers_renders_chat_templates_under_the_budget():
    pytest.importorskip("transformers")
    from evaluation.templates import budget_chat_templates
    from tests.test_activation import chatml_tokenizer

    tok = chatml_tokenizer()
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    before = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    budget_chat_templates()
    budget_chat_templates()  # idempotent
    assert tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True) == before
    start = time.perf_counter()
    with pytest.raises(TemplateBudgetError):
        tok.apply_chat_template(chat, tokenize=False, chat_template=NESTED_LOOPS)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    ("template", "why"),
    [
        (NESTED_LOOPS, "operations"),
        ("{{ 'a' * 1000000000 }}", "repeated value"),
        ("{{ 'a'|center(1000000000) }}", "number"),
        ("{{ '{:>999999999}'.format(1) }}", "width"),
        ("{{ '%999999999d' % 1 }}", "width"),
        ("{{ 2 ** 1000000000 }}", "power"),
        (
            "{% set n = namespace(s='a') %}{% for i in range(40) %}{% set n.s = n.s ~ n.s %}"
            "{% endfor %}",
            "1000000",
        ),
        (
            "{% set b = 'a' * 900000 %}{% set x %}{% for i in range(99) %}{{ b }}{% endfor %}"
            "{% endset %}",
            "characters",
        ),
        (
            "{% macro f(n) %}{% if n %}{{ f(n-1) }}{{ f(n-1) }}{% endif %}{% endmacro %}"
            "{{ f(40) }}",
            "operations|s in one render",
        ),
        ("{{ (range(1000)|list)|tojson(indent=100000) }}", "indents"),
        ("{% set s = 'a' * 100000 %}{{ s|replace('a', s) }}", "value"),
    ],
)
def test_templates_over_budget_are_refused_fast(template, why):
    start = time.perf_counter()
    with pytest.raises(TemplateBudgetError, match=why):
        render_chat_template(template, messages=[])
    assert time.perf_counter() - start < 2.0


# -- defects -------------------------------------------------------------------------------------


def test_patch_tensor_its_own_exclude_rules_out_is_refused(trio, patch_dir, tmp_path, capsys):
    def exclude_q(m: dict) -> None:
        m["config"]["exclude"] = [*m["config"]["exclude"], r"q_proj"]

    edited = copy_patch(patch_dir, tmp_path / "edited", exclude_q)
    with pytest.raises(PatchIntegrityError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight"):
        SafetyPatch.load(edited)
    for argv in (
        ["patch", "export-adapter", str(edited), "--out", str(tmp_path / "a")],
        [
            "fuse",
            "--finetuned",
            str(trio["finetuned"]),
            "--patch",
            str(edited),
            "--out",
            str(tmp_path / "f"),
        ],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "not selected by the patch's own include" in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "f").exists()


def test_all_rank_zero_patch_is_refused_by_fuse_and_export(trio, tmp_path, capsys):
    zero = tmp_path / "zero"
    assert not any(extract(trio["aligned"], trio["aligned"], zero, progress=False).ranks().values())
    for argv in (
        ["patch", "export-adapter", str(zero), "--out", str(tmp_path / "a")],
        [
            "fuse",
            "--finetuned",
            str(trio["finetuned"]),
            "--patch",
            str(zero),
            "--out",
            str(tmp_path / "f"),
        ],
    ):
        assert main(argv) == 2
        assert "rank 0 for all of its 14 tensor(s)" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "f").exists()


def test_the_index_file_is_part_of_a_folder_revision(trio, tmp_path):
    folder = tmp_path / "ft"
    folder.mkdir()
    for f in trio["finetuned"].iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    before = local_revision(folder)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    index["metadata"] = {"total_size": 1}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    assert local_revision(folder) != before


@pytest.mark.parametrize(
    "edit",
    [
        lambda m: m.update(method="other"),
        lambda m: m["aligned"].update(ref="elsewhere"),
        lambda m: m["aligned"].update(files={}),
        lambda m: m["reference"].update(kind="hub"),
    ],
)
def test_every_manifest_field_enters_the_patch_id(patch_dir, tmp_path, edit):
    edited = copy_patch(patch_dir, tmp_path / "edited", edit)
    assert SafetyPatch.load(edited).patch_id != SafetyPatch.load(patch_dir).patch_id


@pytest.mark.parametrize(
    ("edit", "field"),
    [
        (lambda m: m["config"].update(weight_top=1), "config.weight_top"),  # 1.0: same value
        (lambda m: m["config"].update(eta="0.85"), "config.eta"),
        (lambda m: next(iter(m["tensors"].values())).update(n_nonzero=8.0), "n_nonzero"),
        (lambda m: next(iter(m["tensors"].values())).update(shape=[64.0, 64]), "shape[0]"),
    ],
)
def test_manifest_number_types_lssf_never_writes_are_refused(patch_dir, tmp_path, edit, field):
    edited = copy_patch(patch_dir, tmp_path / "edited", edit)
    with pytest.raises(PatchIntegrityError, match="the manifest was edited") as exc:
        SafetyPatch.load(edited)
    assert field in str(exc.value)


def test_patch_id_is_stable_and_ignores_the_tool_version(trio, patch_dir, tmp_path):
    loaded = SafetyPatch.load(patch_dir)
    again = extract(trio["aligned"], trio["reference"], tmp_path / "again", progress=False)
    assert again.patch_id == loaded.patch_id == SafetyPatch.load(tmp_path / "again").patch_id
    other = copy_patch(patch_dir, tmp_path / "v", lambda m: m.update(lssf_version="9.9.9"))
    assert SafetyPatch.load(other).patch_id == loaded.patch_id
    assert loaded.manifest.model_copy().patch_id == loaded.patch_id


def _prompts_by_side() -> tuple[str, str]:
    """A prompt the split rule puts in calibration and one it holds out."""
    prompts = [f"how would someone pick lock number {i}" for i in range(40)]
    side = {p: hash_unit(normalise_prompt(p)) < 0.3 for p in prompts}
    return next(p for p in prompts if side[p]), next(p for p in prompts if not side[p])


def test_calibration_rows_without_split_follow_the_hash_rule(tmp_path):
    calib_prompt, heldout_prompt = _prompts_by_side()
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"id": "a", "prompt": calib_prompt}) + "\n")
    assert read_calibration(path).prompts == (calib_prompt,)
    path.write_text(json.dumps({"id": "b", "prompt": heldout_prompt}) + "\n")
    with pytest.raises(ConfigError, match=r"line 1 \(id 'b'\) is in the held-out .* split rule"):
        read_calibration(path)
    path.write_text(json.dumps({"prompt": heldout_prompt, "split": "calibration"}) + "\n")
    assert read_calibration(path).prompts == (heldout_prompt,)  # an explicit field decides
    path.write_text(json.dumps({"prompt": calib_prompt, "split": "train"}) + "\n")
    with pytest.raises(ConfigError, match="split 'train'"):
        read_calibration(path)
