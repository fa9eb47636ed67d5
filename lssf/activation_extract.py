"""Extraction with the activation basis: one layer-by-layer pass over the aligned model.

The calibration sequences are each chat-templated prompt followed by the aligned model's answer
(the row's ``response``, else its greedy answer). Per decoder layer (``lssf/llama_forward.py``):
the Grams of the targeted maps' inputs at the answer positions, averaged per prompt, then each
target's basis (``lssf/activation.py``) and factors; the Grams are dropped before the next layer.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from lssf.activation import (
    activation_spectrum,
    answer_weights,
    captured_energy,
    prompt_weights,
)
from lssf.calibration import (
    chat_template,
    encode_answers,
    encode_prompts,
    read_calibration,
    read_json,
    stop_ids,
)
from lssf.checkpoint import Checkpoint, folder_file
from lssf.config import PatchConfig
from lssf.errors import CheckpointError, ConfigError, NonFiniteError
from lssf.llama_forward import (
    INPUT_GROUPS,
    DecoderSpec,
    embed,
    greedy_answers,
    layer_forward,
    layer_weights,
    read_spec,
    rope_tables,
)
from lssf.lowrank import checked_factors, patch_tensor, safety_delta, spectrum_stats
from lssf.methods import get_rank_rule
from lssf.patch import CalibrationRecord, TensorRecord
from lssf.st_io import is_finite

log = logging.getLogger(__name__)
# What the Gram counts, recorded in the patch manifest (``CalibrationRecord.gram``).
GRAM_READINGS = {
    "answer": "answer positions (last prompt token to the answer's second-to-last), "
    "mean per prompt",
    "prompt": "every prompt token, no answer, mean per token (v1)",
}


def plan_targets(targets: list[str], spec: DecoderSpec) -> dict[int, dict[str, str]]:
    """Targets by decoder layer, name -> module in the layer; an unknown linear map is refused."""
    pattern = re.compile(re.escape(spec.prefix) + r"layers\.(\d+)\.(.+)\.weight")
    by_layer: dict[int, dict[str, str]] = {}
    for name in targets:
        m = pattern.fullmatch(name)
        if m is None or m.group(2) not in INPUT_GROUPS or int(m.group(1)) >= spec.layers:
            raise ConfigError(
                f"target tensor {name!r} is not a decoder linear map the activation basis "
                f"knows ({', '.join(INPUT_GROUPS)}); narrow include/exclude or use delta-svd"
            )
        by_layer.setdefault(int(m.group(1)), {})[name] = m.group(2)
    return by_layer


def _delta_rank(delta: torch.Tensor, n_act: int, config: PatchConfig) -> tuple[int, dict]:
    """delta-svd's rank (``patch_tensor``) capped at the ``n_act`` non-zero activation
    directions: beyond them the eigenvectors span a null space in no particular order."""
    record = patch_tensor(delta, config)[2]
    stats = record.model_dump(
        include={"entropy_ratio", "energy_kept", "n_nonzero", "top_singular_value"}
    )
    if record.rank <= n_act:
        return record.rank, stats
    log.warning(
        "%s tensor: delta rank %d capped at the %d non-zero activation directions "
        "(more calibration tokens lift the cap)",
        list(delta.shape),
        record.rank,
        n_act,
    )
    tall = delta if delta.shape[0] >= delta.shape[1] else delta.T
    s = torch.linalg.svdvals(tall.float()).double().cpu()[: record.n_nonzero]
    return n_act, spectrum_stats(s, n_act)


def activation_tensor(
    delta: torch.Tensor, aligned: torch.Tensor, gram: torch.Tensor, config: PatchConfig
) -> tuple[torch.Tensor, torch.Tensor, TensorRecord]:
    """Factors of one target: delta, aligned (d_out, d_in); gram (d_in, d_in) = X^T X / T.

    Returns ``U': (d_out, r)``, ``C = U'^T delta: (r, d_in)`` (float32, CPU) and the record,
    whose spectrum fields describe the spectrum that set the rank (``rank_spectrum``).
    """
    act = activation_spectrum(aligned if config.activation_weight == "aligned" else delta, gram)
    if config.rank_spectrum == "delta":
        rank, stats = _delta_rank(delta, int(act.s.numel()), config)
    else:
        rank = get_rank_rule(config.rank_rule).select(act.s, config.eta)
        rank = rank if config.max_rank is None else min(rank, config.max_rank)
        stats = spectrum_stats(act.s, rank)
    basis = act.u[:, :rank].to(delta.device)
    u, c = checked_factors(delta, basis, act.s, rank, config.weight_top)
    record = TensorRecord(
        shape=tuple(delta.shape),
        rank=rank,
        delta_norm=float(torch.linalg.vector_norm(delta.double())),
        delta_energy_kept=captured_energy(basis, delta),
        **stats,
    )
    return u.cpu(), c.cpu(), record


@dataclass(frozen=True)
class CalibrationTokens:
    """Each prompt's ids then its answer's ids; how many answers lssf generated."""

    prompts: list[list[int]]
    answers: list[list[int]]
    truncated: int  # prompts cut at calibration_max_tokens
    generated: int


def calibration_tokens(
    a_ckpt: Checkpoint, spec: DecoderSpec, config: PatchConfig, device: torch.device
) -> tuple[CalibrationTokens, str]:
    """The calibration sequences of the aligned model and the calibration file's sha256."""
    folder = a_ckpt.folder
    calib = read_calibration(config.calibration, config.calibration_limit)
    full = encode_prompts(folder, calib.prompts)
    prompts = [x[: config.calibration_max_tokens] for x in full]
    budget = config.calibration_answer_tokens
    window = spec.sliding_window
    if window is not None and max(map(len, prompts)) + budget > window:
        raise ConfigError(
            f"calibration sequences of up to {max(map(len, prompts)) + budget} tokens exceed "
            f"the model's sliding_window {window}; lower calibration_max_tokens or "
            "calibration_answer_tokens"
        )
    given = encode_answers(folder, calib.answers)
    if config.activation_tokens == "prompt":  # v1: the answers are neither read nor generated
        given = [[] for _ in given]
    missing = [i for i, a in enumerate(given) if a is None]
    if missing:
        log.info("activation basis: generating %d answers (<= %d tokens)", len(missing), budget)
        made = greedy_answers(
            a_ckpt, spec, [prompts[i] for i in missing], budget, stop_ids(folder), device
        )
        for i, answer in zip(missing, made, strict=True):
            given[i] = answer
    answers = [a[:budget] for a in given]
    empty = [i for i, a in enumerate(answers) if not a]
    if empty and config.activation_tokens == "answer":
        raise ConfigError(f"calibration: the answer of prompt {empty[0]} has no token")
    tokens = CalibrationTokens(
        prompts=prompts,
        answers=answers,
        truncated=sum(len(x) > config.calibration_max_tokens for x in full),
        generated=len(missing),
    )
    return tokens, calib.sha256


def activation_patch(
    a_ckpt: Checkpoint,
    r_ckpt: Checkpoint,
    targets: list[str],
    config: PatchConfig,
    device: torch.device,
    write: Callable[[str, torch.Tensor, torch.Tensor], None],
    progress: bool = True,
) -> tuple[dict[str, TensorRecord], CalibrationRecord]:
    """Factors of every target (written through ``write(name, U, C)``) and the calibration
    record (``model_revision`` left empty: the caller knows the hashed revision)."""
    folder = a_ckpt.folder
    if (config_path := folder_file(folder, "config.json")) is None:
        raise CheckpointError(f"{folder} has no config.json; the activation basis needs it")
    spec = read_spec(read_json(config_path), a_ckpt, str(config_path))
    by_layer = plan_targets(targets, spec)
    calib, sha256 = calibration_tokens(a_ckpt, spec, config, device)
    seqs = [p + a for p, a in zip(calib.prompts, calib.answers, strict=True)]
    lengths = [len(x) for x in seqs]
    if config.activation_tokens == "answer":
        scale = answer_weights([len(p) for p in calib.prompts], [len(a) for a in calib.answers])
    else:
        scale = prompt_weights(lengths)
    h = embed(a_ckpt, spec, torch.tensor([t for x in seqs for t in x]), device)
    tables = rope_tables(spec, max(lengths), device)
    records: dict[str, TensorRecord] = {}
    bar = tqdm(total=len(targets), desc="extract", unit="tensor", disable=not progress)
    for layer in range(max(by_layer) + 1):
        w = layer_weights(a_ckpt, spec, layer, device)
        modules = by_layer.get(layer, {})
        widths = {INPUT_GROUPS[m]: w[f"{m}.weight"].shape[1] for m in modules.values()}
        grams = {g: torch.zeros(d, d, dtype=torch.double, device=device) for g, d in widths.items()}
        h = layer_forward(h, w, spec, lengths, tables, grams, scale)
        if not is_finite(h):
            raise NonFiniteError(f"hidden states of {folder} overflow at decoder layer {layer}")
        for name, module in modules.items():
            aligned = w[f"{module}.weight"]
            delta = safety_delta(name, aligned, r_ckpt.get(name).to(device))
            try:
                u, c, records[name] = activation_tensor(
                    delta, aligned, grams[INPUT_GROUPS[module]], config
                )
            except NonFiniteError as exc:
                raise NonFiniteError(f"tensor {name!r}: {exc}") from exc
            write(name, u, c)
            bar.set_postfix(layer=layer, rank=records[name].rank)
            bar.update()
        del grams, w
    bar.close()
    template, _ = chat_template(folder)
    n_answer = sum(len(a) for a in calib.answers)
    record = CalibrationRecord(
        file=str(config.calibration),
        sha256=sha256,
        rows=len(seqs),
        tokens=sum(lengths),
        truncated=calib.truncated,
        model_revision="",
        chat_template_sha256=hashlib.sha256(template.encode()).hexdigest(),
        prompt_tokens=sum(lengths) - n_answer,
        answer_tokens=n_answer,
        answers_generated=calib.generated,
        gram=GRAM_READINGS[config.activation_tokens],
    )
    log.info(
        "activation basis: %d prompts, %d prompt + %d answer tokens (%d answers generated)",
        record.rows,
        record.prompt_tokens,
        n_answer,
        calib.generated,
    )
    return {n: records[n] for n in targets}, record
