"""Bounded parsers for files and bodies lssf did not write: nothing they hold can hang us.

Only regular files are read (a FIFO or ``/dev/zero`` is refused without blocking), up to a size
cap checked before parsing; text must be UTF-8. JSON: nesting depth capped, integers of at most
``MAX_INT_DIGITS`` digits, no NaN or infinities. YAML: duplicate keys refused, nesting capped and
alias expansion bounded (a "billion laughs" file is refused before it is built). Every message
is one short line that names the problem, never the whole value. Stdlib and PyYAML only, so
light modules (report loading, the webhook) can use it.
"""

from __future__ import annotations

import json
import math
import os
import reprlib
import stat
from pathlib import Path
from typing import Any

import yaml

MAX_DEPTH = 64  # nesting of JSON/YAML containers; lssf's own files use fewer than 8
MAX_INT_DIGITS = 64
MAX_YAML_NODES = 100_000  # after alias expansion; a pipeline config has a few hundred
_MERGE_TAG = "tag:yaml.org,2002:merge"


class BoundedInputError(ValueError):
    """Untrusted input over a budget or malformed; the message is one short line."""


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 2, 4, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


def short_repr(value: object, limit: int = 80) -> str:
    """A repr of ``value`` bounded in time and length, however large or shared ``value`` is."""
    text = _REPR.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def read_regular_bytes(path: Path | str, max_bytes: int) -> bytes:
    """The bytes of a regular file of at most ``max_bytes``; anything else is refused.

    Opened non-blocking, so that a FIFO without a writer cannot hang the open; its type is
    checked on the open descriptor (no race with a rename), its size before and while reading.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except OSError as exc:
        raise BoundedInputError(f"cannot open: {exc.strerror or type(exc).__name__}") from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise BoundedInputError("not a regular file")
        if st.st_size > max_bytes:
            raise BoundedInputError(f"{st.st_size} bytes, over the {max_bytes}-byte limit")
        with os.fdopen(os.dup(fd), "rb") as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise BoundedInputError(f"cannot read: {exc.strerror or type(exc).__name__}") from exc
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise BoundedInputError(f"grew over the {max_bytes}-byte limit while read")
    return data


def decode_utf8(data: bytes) -> str:
    """``data`` as UTF-8 text, strictly; the error gives the first bad byte's offset."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BoundedInputError(f"not UTF-8 text (invalid byte at offset {exc.start})") from None


def read_regular_text(path: Path | str, max_bytes: int) -> str:
    """``read_regular_bytes`` decoded as UTF-8 (strictly)."""
    return decode_utf8(read_regular_bytes(path, max_bytes))


def _int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > MAX_INT_DIGITS:
        raise BoundedInputError(f"an integer of {digits} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BoundedInputError(f"number {text[:20]}... is out of range")
    return value


def _constant(text: str) -> Any:
    raise BoundedInputError(f"{text} is not a JSON number")


def loads_json(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """JSON with nesting at most ``max_depth`` deep and sane numbers; else BoundedInputError."""
    try:
        data = json.loads(text, parse_int=_int, parse_float=_float, parse_constant=_constant)
    except RecursionError:
        raise BoundedInputError(f"JSON nested deeper than {max_depth} levels") from None
    except UnicodeDecodeError:
        raise BoundedInputError("not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise BoundedInputError(
            f"not JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})"
        ) from None
    if _depth_over(data, max_depth):
        raise BoundedInputError(f"JSON nested deeper than {max_depth} levels")
    return data


def _depth_over(data: Any, max_depth: int) -> bool:
    """Whether parsed JSON nests containers deeper than ``max_depth`` (iterative walk)."""
    stack = [(data, 1)]
    while stack:
        item, depth = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if isinstance(item, (dict, list)):
            if depth > max_depth:
                return True
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return False


class _StrictLoader(getattr(yaml, "CSafeLoader", yaml.SafeLoader)):  # type: ignore[misc]
    """PyYAML's safe loader, refusing a mapping that names one key twice.

    YAML 1.2 forbids duplicates; PyYAML keeps the last silently. Merge keys (``<<``) may still
    be overridden.
    """

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if isinstance(node, yaml.MappingNode):
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == _MERGE_TAG:
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    duplicate = key in seen
                except TypeError:  # unhashable: PyYAML's own message follows
                    continue
                if duplicate:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {short_repr(key)}", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _expanded_size(root: yaml.Node, max_nodes: int, max_depth: int) -> None:
    """Refuse a node graph that expands past ``max_nodes`` nodes or ``max_depth`` levels.

    Aliases share nodes, so the expanded size is counted once per distinct node (linear); a
    node that contains itself is refused too.
    """
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    active: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        kids = _children(node)
        if done:
            active.discard(key)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[key] > max_nodes:
                raise BoundedInputError(f"YAML expands to more than {max_nodes} nodes (aliases)")
            if depth[key] > max_depth:
                raise BoundedInputError(f"YAML nested deeper than {max_depth} levels")
            continue
        if key in size:
            continue
        if key in active:
            raise BoundedInputError("YAML alias refers to a node that contains it")
        active.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in size)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    return []


def loads_yaml(text: str, max_nodes: int = MAX_YAML_NODES, max_depth: int = MAX_DEPTH) -> Any:
    """One YAML document, safely: see the module docstring. YAML errors pass through."""
    loader = _StrictLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise BoundedInputError(f"YAML nested deeper than {max_depth} levels") from None
        if node is None:
            return None
        _expanded_size(node, max_nodes, max_depth)
        return loader.construct_document(node)
    finally:
        loader.dispose()
