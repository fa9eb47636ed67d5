"""Chat templates from model folders, rendered in jinja2's sandbox under a budget.

A chat template is code from whoever published the model. jinja2's sandbox stops it reaching
Python's internals, but not from looping: ``range(100000)`` nested twice is 10^10 empty
iterations, which no sandbox hook sees. Here every render runs under a ``_Budget``: each loop
iteration (loops are rewritten to pass through a counting filter), call, attribute or item
lookup, filter and arithmetic operator costs one operation, each ``{{ ... }}`` output counts its
characters, and a render is refused (``TemplateBudgetError``) past ``MAX_OPS`` operations,
``MAX_OUTPUT_CHARS`` characters (in any buffer: macros and ``set`` blocks too) or
``MAX_SECONDS``. Operations that would build a huge value in one step (``"a" * 10**9``,
``center(10**9)``, ``"%999999999d"``, ``2 ** 10**9``) are refused before they run.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import json
import re
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment, safe_range
from jinja2.visitor import NodeTransformer

from lssf.errors import CheckpointError
from lssf.st_io import short

MAX_OPS = 100_000  # per render: loop iterations, calls, lookups, filters, operators
MAX_OUTPUT_CHARS = 1_000_000  # per render, and the size of any value built on the way
MAX_SECONDS = 1.0  # per render
MAX_ARGUMENT = 100_000  # largest integer a filter or method may be given (widths, counts)
MAX_TEMPLATE_CHARS = 1_000_000
MAX_JSON_INDENT = 64  # tojson's indent multiplies the output by up to this much per level
# The filters a rewritten template calls: loops, outputs, concatenations.
_LOOP, _OUT, _VALUE = "lssf_budget_loop", "lssf_budget_out", "lssf_budget_value"
_LONG_NUMBER = re.compile(r"\d{7}")  # a width or precision of a million or more in a format


class TemplateBudgetError(CheckpointError):
    """A chat template that is too large, or whose render exceeds its budget."""


class _Budget:
    """What one render may still spend."""

    def __init__(self) -> None:
        self.ops = 0
        self.chars = 0
        self.deadline = time.monotonic() + MAX_SECONDS

    def charge(self, ops: int = 1) -> None:
        self.ops += ops
        if self.ops > MAX_OPS:
            raise TemplateBudgetError(
                f"the chat template needs more than {MAX_OPS} operations (loop iterations, "
                "calls, lookups) for one render"
            )
        if self.ops % 512 == 0 and time.monotonic() > self.deadline:
            raise TemplateBudgetError(f"the chat template ran over {MAX_SECONDS:g} s in one render")

    def output(self, n: int) -> None:
        self.chars += n
        if self.chars > MAX_OUTPUT_CHARS:
            raise TemplateBudgetError(
                f"the chat template writes more than {MAX_OUTPUT_CHARS} characters in one render"
            )


_current: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar(
    "lssf_template_budget", default=None
)


def _budget() -> _Budget:
    budget = _current.get()
    if budget is None:  # compile-time constant folding: jinja2 then evaluates it at render time
        raise TemplateBudgetError("no render budget is active")
    return budget


@contextlib.contextmanager
def _rendering() -> Iterator[None]:
    """A fresh budget for an outermost render; a nested one shares its caller's."""
    token = _current.set(_Budget()) if _current.get() is None else None
    try:
        yield
    finally:
        if token is not None:
            _current.reset(token)


def _refuse_large(what: str, size: int) -> None:
    if size > MAX_OUTPUT_CHARS:
        raise TemplateBudgetError(
            f"the chat template builds {what} of {size} items or characters "
            f"(at most {MAX_OUTPUT_CHARS})"
        )


def _check_value(value: Any) -> Any:
    if isinstance(value, str | bytes | list | tuple | dict | set | frozenset):
        _refuse_large("a value", len(value))
    return value


def _check_arguments(args: Iterable[Any]) -> None:
    for arg in args:
        if isinstance(arg, int) and not isinstance(arg, bool) and abs(arg) > MAX_ARGUMENT:
            shown = arg if abs(arg) < 10**30 else "of over 30 digits"
            raise TemplateBudgetError(
                f"the chat template passes the number {shown} to a filter or method "
                f"(at most {MAX_ARGUMENT})"
            )


def _check_format(fmt: Any) -> None:
    """A format string (``%``, ``format``) with a width or precision of a million or more."""
    if isinstance(fmt, str) and _LONG_NUMBER.search(fmt):
        raise TemplateBudgetError("the chat template formats with a width of a million or more")


def _str_method_size(owner: str, name: str, args: tuple[Any, ...]) -> int:
    """An upper bound on what ``owner.name(*args)`` builds, for the methods that multiply."""
    if name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]):
        return len(owner) + (owner.count(args[0]) + 1) * len(args[1])
    if name == "expandtabs":
        return len(owner) * (args[0] if args and isinstance(args[0], int) else 8)
    if name == "join" and args and isinstance(args[0], list | tuple):
        return len(owner) * len(args[0]) + sum(len(str(x)) for x in args[0])
    return len(owner)


def _check_binop(operator: str, left: Any, right: Any) -> None:
    sized = (str, bytes, list, tuple)
    if operator == "*":
        for seq, n in ((left, right), (right, left)):
            if isinstance(seq, sized) and isinstance(n, int) and not isinstance(n, bool):
                _refuse_large("a repeated value", len(seq) * max(n, 0))
    elif operator == "**" and isinstance(left, int) and isinstance(right, int):
        if right > 0 and max(abs(left), 2).bit_length() * right > 4096:
            raise TemplateBudgetError("the chat template raises a number to a huge power")
    elif operator == "%":
        _check_format(left)
    elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
        _refuse_large("a joined value", len(left) + len(right))


def _filter_size(name: str, args: tuple[Any, ...]) -> int:
    """An upper bound on what the ``replace`` and ``indent`` filters build (0: not these)."""
    strings = [a for a in args if isinstance(a, str)]
    if name == "do_replace" and len(strings) >= 3:
        text, old, new = strings[:3]
        return len(text) + (text.count(old) + 1) * len(new)
    if name == "do_indent" and strings:
        text = strings[0]
        width = next((a for a in args[args.index(text) + 1 :]), 4) if text in args else 4
        step = len(width) if isinstance(width, str) else int(width)
        return len(text) + (text.count("\n") + 1) * max(step, 0)
    return 0


def _big_indent(indent: int | str) -> bool:
    return (len(indent) if isinstance(indent, str) else indent) > MAX_JSON_INDENT


def _budgeted_filter(func: Callable[..., Any]) -> Callable[..., Any]:
    """A filter that costs one operation, refuses huge numbers and checks what it built."""

    @functools.wraps(func)  # keeps jinja2's pass_context/pass_eval_context marker
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _budget().charge()
        _check_arguments([*args, *kwargs.values()])
        indent = kwargs.get("indent", args[2] if len(args) > 2 else None)
        if "tojson" in func.__name__ and isinstance(indent, int | str) and _big_indent(indent):
            raise TemplateBudgetError(f"the chat template indents JSON by {short(indent)}")
        if func.__name__ == "do_format" and args:
            _check_format(next((a for a in args if isinstance(a, str)), None))
        _refuse_large("a value", _filter_size(func.__name__, (*args, *kwargs.values())))
        return _check_value(func(*args, **kwargs))

    return wrapper


def _loop(iterable: Any) -> Iterator[Any]:
    """A loop's items, one operation each."""
    budget = _budget()
    for item in iterable:
        budget.charge()
        yield item


def _out(value: Any) -> Any:
    """A ``{{ ... }}`` output (or literal text), its characters counted."""
    budget = _budget()
    budget.charge()
    budget.output(len(str(value)))
    return value


def _value(value: Any) -> Any:
    """A ``~`` concatenation's result, one operation, refused when huge."""
    _budget().charge()
    return _check_value(value)


def _filtered(node: nodes.Expr, name: str) -> nodes.Filter:
    return nodes.Filter(node, name, [], [], None, None, lineno=node.lineno)


class _WrapConcat(NodeTransformer):
    """Every ``a ~ b`` passes its result through ``_value`` (doubling a string 40 times)."""

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        return _filtered(self.generic_visit(node), _VALUE)


class BudgetedTemplate(jinja2.Template):
    """A template whose every render runs under a fresh budget."""

    def render(self, *args: Any, **kwargs: Any) -> str:
        """As jinja2's, under a fresh budget (or the enclosing render's)."""
        with _rendering():
            return super().render(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Iterator[str]:
        """As jinja2's, under a fresh budget (or the enclosing render's)."""
        with _rendering():
            yield from super().generate(*args, **kwargs)


class BudgetedSandbox(ImmutableSandboxedEnvironment):
    """jinja2's immutable sandbox with a per-render budget (see the module doc)."""

    template_class = BudgetedTemplate
    intercepted_binops = frozenset(["+", "-", "*", "/", "//", "%", "**"])
    intercepted_unops = frozenset(["-", "+"])

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters = {name: _budgeted_filter(f) for name, f in self.filters.items()}
        self.filters |= {_LOOP: _loop, _OUT: _out, _VALUE: _value}

    def add_filter(self, name: str, func: Callable[..., Any]) -> None:
        """Register a filter, budgeted like the built-in ones."""
        self.filters[name] = _budgeted_filter(func)

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        if len(source) > MAX_TEMPLATE_CHARS:
            raise TemplateBudgetError(
                f"the chat template is {len(source)} characters long (at most {MAX_TEMPLATE_CHARS})"
            )
        try:
            tree = super()._parse(source, name, filename)
        except RecursionError as exc:
            raise TemplateBudgetError("the chat template nests too deeply") from exc
        for loop in list(tree.find_all(nodes.For)):
            loop.iter = _filtered(loop.iter, _LOOP)
        for output in list(tree.find_all(nodes.Output)):
            output.nodes = [_filtered(child, _OUT) for child in output.nodes]
        return _WrapConcat().visit(tree)

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        """The sandbox's call, one operation; huge numbers and huge results refused."""
        _budget().charge()
        target = getattr(__obj, "__wrapped__", __obj)  # the sandbox wraps str.format
        owner, name = getattr(target, "__self__", None), getattr(target, "__name__", "")
        if __obj is not safe_range:  # range: at most 100000 items, its loop pays per item
            _check_arguments([*args, *kwargs.values()])
        if isinstance(owner, str):
            if name in ("format", "format_map"):
                _check_format(owner)
            _refuse_large("a string", _str_method_size(owner, name, args))
        return _check_value(super().call(__context, __obj, *args, **kwargs))

    def getattr(self, obj: Any, attribute: str) -> Any:
        """The sandbox's attribute lookup, one operation."""
        _budget().charge()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        """The sandbox's item lookup, one operation."""
        _budget().charge()
        return super().getitem(obj, argument)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        """An arithmetic operator, one operation; one that would build a huge value refused."""
        _budget().charge()
        _check_binop(operator, left, right)
        return _check_value(super().call_binop(context, operator, left, right))

    def call_unop(self, context: Any, operator: str, arg: Any) -> Any:
        """A unary operator, one operation."""
        _budget().charge()
        return super().call_unop(context, operator, arg)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | str | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


@functools.lru_cache(maxsize=8)
def compile_chat_template(source: str) -> BudgetedTemplate:
    """A chat template set up as transformers' ``apply_chat_template`` sets it up, budgeted."""
    env = BudgetedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.add_filter("tojson", _tojson)
    env.globals["raise_exception"] = _raise_exception
    return env.from_string(source)


def render_chat_template(source: str, **context: Any) -> str:
    """``source`` rendered with ``context`` under the budget.

    ``TemplateBudgetError`` past the budget, ``CheckpointError`` for a template that does not
    compile or raises.
    """
    try:
        return compile_chat_template(source).render(**context)
    except TemplateBudgetError:
        raise
    except Exception as exc:  # the template's own errors: TemplateError, TypeError, Overflow...
        why = f"{type(exc).__name__}: {exc}"
        raise CheckpointError(f"the chat template fails to render ({short(why, 200)})") from exc
