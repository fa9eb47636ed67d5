"""Fuzzing what an untrusted fine-tune carries (issue 25): adapter-config regexes and chat
templates. Every example finishes or is refused, each within ``BUDGET_S``."""

from __future__ import annotations

import json
import re
import tempfile
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lssf import templates
from lssf.errors import CheckpointError
from lssf.lora import module_pattern, read_adapter_config
from lssf.saferegex import UnsafePatternError, compile_safe
from lssf.templates import TemplateBudgetError, render_chat_template

BUDGET_S = 2.0
FUZZ = settings(
    max_examples=100,
    deadline=None,  # timed by the tests themselves, with their own budget
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    phases=[Phase.explicit, Phase.generate],  # no shrinking: a failure prints its example
)
TEMPLATE_FUZZ = settings(FUZZ, max_examples=60)
REGEX_TOKENS = [
    "a", "z", "q_proj", ".", "\\.", "*", "+", "?", "*?", "|", "(", ")", "(?:", "[a-z]",
    "[^.]", "\\d", "\\w", "{2}", "{1,3}", "{0,50}", "^", "$", "\\Z", "(?=", "(?!", "\\1",
    "(?P<g>", "(?P=g)", "\\b", "(?i)", "(?s)", "*+", "(?>",
]  # fmt: skip
MODULES = ["model.layers.0.self_attn.q_proj", "a." * 40 + "x", "z" * 200, "layers.1.mlp.down_proj"]
regexes = st.lists(st.sampled_from(REGEX_TOKENS), min_size=1, max_size=14).map("".join)


def timed(func, *args):
    start = time.perf_counter()
    try:
        return func(*args)
    finally:
        assert time.perf_counter() - start < BUDGET_S


@FUZZ
@given(key=regexes)
def test_rank_and_alpha_pattern_keys_match_in_time_or_are_refused(key: str) -> None:
    def lookup() -> None:
        try:
            pattern = module_pattern(key)
        except UnsafePatternError:
            return
        for module in MODULES:
            pattern.match(module)

    timed(lookup)


@FUZZ
@given(
    rank=st.dictionaries(regexes, st.integers(1, 64), max_size=3),
    alpha=st.dictionaries(regexes, st.floats(0.5, 64), max_size=3),
    targets=st.one_of(regexes, st.lists(regexes, max_size=3)),
)
def test_adapter_configs_are_read_in_time_or_refused(rank, alpha, targets) -> None:
    config = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "rank_pattern": rank,
              "alpha_pattern": alpha, "target_modules": targets}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "adapter_config.json").write_text(json.dumps(config))

        def read() -> None:
            try:
                read_adapter_config(Path(tmp))
            except CheckpointError as exc:
                assert "\n" not in str(exc)

        timed(read)


@FUZZ
@given(pattern=regexes, text=st.text(alphabet="aqz._\n1pXj", max_size=8))
def test_the_linear_engine_agrees_with_re(pattern: str, text: str) -> None:
    """On texts short enough for ``re`` to finish, both engines give the same answers."""
    try:
        safe = compile_safe(pattern)
    except UnsafePatternError:
        return
    compiled = re.compile(pattern)
    assert safe.search(text) == bool(compiled.search(text))
    assert safe.match(text) == bool(compiled.match(text))
    assert safe.fullmatch(text) == bool(compiled.fullmatch(text))


SIZES = st.sampled_from([0, 1, 3, 1000, 100000, 10**9])
expressions = st.deferred(
    lambda: st.one_of(
        st.sampled_from(["'ab'", "message['content']", "messages|length", "bos_token", "3"]),
        st.builds("({} * {})".format, expressions, SIZES),
        st.builds("({} ~ {})".format, expressions, expressions),
        st.builds("({} ** {})".format, SIZES, SIZES),
        st.builds("({}|string|center({}))".format, expressions, SIZES),
        st.builds("({}|string|replace('a', {}|string))".format, expressions, expressions),
        st.builds("('%{}d' % {})".format, SIZES, SIZES),
        st.builds("({}|tojson(indent={}))".format, expressions, SIZES),
    )
)
statements = st.deferred(
    lambda: st.one_of(
        st.builds("{{{{ {} }}}}".format, expressions),
        st.just("<|im_start|>user\n"),
        st.builds("{{% for i in range({}) %}}{}{{% endfor %}}".format, SIZES, statements),
        st.builds("{{% for message in messages %}}{}{{% endfor %}}".format, statements),
        st.builds("{{% set x %}}{}{{% endset %}}{{{{ x }}}}{}".format, statements, statements),
        st.builds("{{% if add_generation_prompt %}}{}{{% endif %}}".format, statements),
        st.builds(
            "{{% macro f(n) %}}{{% if n > 0 %}}{}{{{{ f(n-1) }}}}{{{{ f(n-1) }}}}{{% endif %}}"
            "{{% endmacro %}}{{{{ f({}) }}}}".format,
            statements,
            st.sampled_from([2, 10, 40]),
        ),
        st.builds("{}{}".format, statements, statements),
    )
)


@pytest.fixture(autouse=True)
def short_render_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    """A quarter of the wall-clock budget per render: the same refusals, a faster suite."""
    monkeypatch.setattr(templates, "MAX_SECONDS", 0.25)


@TEMPLATE_FUZZ
@given(template=statements)
def test_chat_templates_render_in_time_or_are_refused(template: str) -> None:
    messages = [{"role": "user", "content": "hi " * 5}, {"role": "assistant", "content": "a"}]

    def render() -> None:
        try:
            render_chat_template(
                template, messages=messages, add_generation_prompt=True, bos_token="<s>"
            )
        except TemplateBudgetError as exc:
            assert "chat template" in str(exc) and "\n" not in str(exc)
        except CheckpointError as exc:
            assert "chat template" in str(exc)

    timed(render)


def plain_sandbox() -> ImmutableSandboxedEnvironment:
    """The sandbox as ``lssf.calibration`` set it up before the budget (transformers' options)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
    return env


@TEMPLATE_FUZZ
@given(template=statements)
def test_templates_within_budget_render_as_the_plain_sandbox(template: str) -> None:
    """The budget changes no output: what renders under it renders the same without it."""
    context = {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": True}
    try:
        budgeted = render_chat_template(template, **context, bos_token="<s>")
    except CheckpointError:
        return
    assert plain_sandbox().from_string(template).render(**context, bos_token="<s>") == budgeted


QWEN_LIKE = """{%- if tools %}<|im_start|>system
{{ messages[0]['content'] if messages[0]['role'] == 'system' else 'You are helpful.' }}
# Tools
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}<|im_end|>
{% elif messages[0]['role'] == 'system' %}<|im_start|>system
{{ messages[0]['content'] }}<|im_end|>
{% endif %}
{%- set ns = namespace(n=0) %}
{%- for message in messages %}
{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
{%- set ns.n = ns.n + 1 %}
{{- '<|im_start|>' + message.role + '\\n' + message.content | trim + '<|im_end|>' + '\\n' }}
{%- elif message.role == 'assistant' %}<|im_start|>assistant
{%- for tool_call in message.tool_calls %}
<tool_call>{{ {'name': tool_call.name, 'arguments': tool_call.arguments} | tojson }}</tool_call>
{%- endfor %}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"""


@pytest.mark.parametrize("tools", [None, [{"name": "f", "parameters": {"x": 1}}]])
def test_a_real_world_shaped_template_renders_as_transformers_would(tools) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  hi  "},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "f", "arguments": {}}]},
        {"role": "user", "content": "ok"},
    ]
    context = {"messages": messages, "tools": tools, "add_generation_prompt": True}
    plain = plain_sandbox().from_string(QWEN_LIKE).render(**context)
    assert render_chat_template(QWEN_LIKE, **context) == plain
    assert plain.count("<|im_start|>") == 5 and "<tool_call>" in plain
