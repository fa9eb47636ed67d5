r"""Regexes matched in time linear in the text, for names and patterns lssf does not control.

Python's ``re`` backtracks: ``(.*.*)*z`` from an adapter config, or a quadratic search over a
megabyte tensor name, runs for hours. Here a pattern is parsed by Python's own parser (so the
syntax is ``re``'s), refused outside a subset that needs no backtracking, and run as a Thompson
NFA simulated one character at a time, its state sets cached as a lazily built DFA: each
character costs at most one pass over the NFA's states (``MAX_STATES``), whatever the pattern.

The subset: literals, classes (``[a-z]``, ``\d``, ``\w``, ``\s``), ``.``, groups,
alternation, greedy and lazy repeats (``* + ? {m,n}``), ``^``, ``$``, ``\A``, ``\Z``, and the
flags VERBOSE and DOTALL. Refused: backreferences, lookarounds, conditionals, atomic groups,
possessive repeats, word boundaries and other flags (their meaning needs backtracking or is
rarely needed in tensor and module names).
"""

from __future__ import annotations

import functools
import re
import re._constants as c  # the parse tree's opcodes (Python >= 3.11)
import re._parser as sre_parse  # Python's own regex parser
from collections.abc import Callable

MAX_PATTERN_CHARS = 512
MAX_STATES = 4000
_CACHE_LIMIT = 50_000  # DFA transitions kept per pattern before the cache is dropped
_ALLOWED_FLAGS = re.UNICODE | re.VERBOSE | re.DOTALL
_CHAR, _SPLIT, _ASSERT, _MATCH = range(4)
_AT_START, _AT_END, _BEFORE_FINAL_NEWLINE = 1, 2, 4
_CATEGORIES: dict[object, Callable[[str], bool]] = {
    c.CATEGORY_DIGIT: str.isdecimal,
    c.CATEGORY_NOT_DIGIT: lambda ch: not ch.isdecimal(),
    c.CATEGORY_SPACE: str.isspace,
    c.CATEGORY_NOT_SPACE: lambda ch: not ch.isspace(),
    c.CATEGORY_WORD: lambda ch: ch.isalnum() or ch == "_",
    c.CATEGORY_NOT_WORD: lambda ch: not (ch.isalnum() or ch == "_"),
}
_REFUSED = {
    c.GROUPREF: "a backreference",
    c.GROUPREF_EXISTS: "a conditional group",
    c.ASSERT: "a lookahead or lookbehind",
    c.ASSERT_NOT: "a negative lookahead or lookbehind",
    c.ATOMIC_GROUP: "an atomic group",
    c.POSSESSIVE_REPEAT: "a possessive repeat",
}


class UnsafePatternError(ValueError):
    """A pattern outside the linear-time subset, too long, too large, or not a regex."""


class _Builder:
    """A Thompson NFA from a parse tree, built back to front (each node knows its successor)."""

    def __init__(self, dotall: bool) -> None:
        self.kind: list[int] = []
        self.arg: list[object] = []
        self.out: list[tuple[int, ...]] = []
        self.dotall = dotall

    def state(self, kind: int, arg: object = None, out: tuple[int, ...] = ()) -> int:
        if len(self.kind) >= MAX_STATES:
            raise UnsafePatternError(f"needs over {MAX_STATES} states (repeat counts too high)")
        self.kind.append(kind)
        self.arg.append(arg)
        self.out.append(out)
        return len(self.kind) - 1

    def seq(self, items: list, nxt: int) -> int:
        for op, av in reversed(list(items)):
            nxt = self.node(op, av, nxt)
        return nxt

    def node(self, op: object, av: object, nxt: int) -> int:
        if op in _REFUSED:
            raise UnsafePatternError(f"uses {_REFUSED[op]}, which needs a backtracking engine")
        if op in (c.LITERAL, c.NOT_LITERAL, c.ANY, c.IN):
            return self.state(_CHAR, self.predicate(op, av), (nxt,))
        if op is c.BRANCH:
            alts = [self.seq(alt, nxt) for alt in av[1]]
            return self.state(_SPLIT, None, tuple(alts))
        if op is c.SUBPATTERN:
            _group, add_flags, del_flags, body = av
            if (add_flags | del_flags) & ~_ALLOWED_FLAGS:
                raise UnsafePatternError("sets a flag other than VERBOSE or DOTALL on a group")
            return self.seq(body, nxt)
        if op in (c.MAX_REPEAT, c.MIN_REPEAT):  # greedy or lazy: the same set of matches
            return self.repeat(*av, nxt)
        if op is c.AT and av in (c.AT_BEGINNING, c.AT_BEGINNING_STRING, c.AT_END, c.AT_END_STRING):
            return self.state(_ASSERT, av, (nxt,))
        what = "a word boundary or line anchor" if op is c.AT else str(op).lower()
        raise UnsafePatternError(f"uses {what}, which is not supported")

    def repeat(self, lo: int, hi: int, body: list, nxt: int) -> int:
        if hi == c.MAXREPEAT:  # x{lo,}: lo copies, then a loop
            loop = self.state(_SPLIT, None, ())
            self.out[loop] = (self.seq(body, loop), nxt)
            start = loop
        else:  # x{lo,hi}: lo copies, then hi - lo nested optional ones
            start = nxt
            for _ in range(hi - lo):
                start = self.state(_SPLIT, None, (self.seq(body, start), nxt))
        for _ in range(lo):
            start = self.seq(body, start)
        return start

    def predicate(self, op: object, av: object) -> Callable[[str], bool]:
        if op is c.LITERAL:
            return chr(av).__eq__
        if op is c.NOT_LITERAL:
            return chr(av).__ne__
        if op is c.ANY:
            return (lambda ch: True) if self.dotall else "\n".__ne__
        return _class_predicate(av)


def _class_predicate(items: list) -> Callable[[str], bool]:
    """``[...]``: literals, ranges and categories, maybe negated."""
    negate, chars, ranges, tests = False, set(), [], []
    for op, av in items:
        if op is c.NEGATE:
            negate = True
        elif op is c.LITERAL:
            chars.add(chr(av))
        elif op is c.RANGE:
            ranges.append(av)
        elif op is c.CATEGORY and av in _CATEGORIES:
            tests.append(_CATEGORIES[av])
        else:
            raise UnsafePatternError(f"uses {str(op).lower()} in a character class, not supported")

    def test(ch: str) -> bool:
        hit = ch in chars or any(lo <= ord(ch) <= hi for lo, hi in ranges)
        return (hit or any(t(ch) for t in tests)) != negate

    return test


class SafeRegex:
    """One compiled pattern: ``search``, ``match`` and ``fullmatch`` answer True or False."""

    def __init__(self, pattern: str, builder: _Builder, start: int) -> None:
        self.pattern = pattern
        self._b = builder
        self._start = frozenset((start,))
        self._match_state = builder.kind.index(_MATCH)
        self._cache: dict[tuple, frozenset[int]] = {}

    def _closure(self, states: frozenset[int], ctx: int) -> frozenset[int]:
        """The character-consuming and final states reachable through splits and anchors."""
        kind, arg, out = self._b.kind, self._b.arg, self._b.out
        seen: set[int] = set()
        stack = list(states)
        while stack:
            s = stack.pop()
            if s in seen:
                continue
            seen.add(s)
            if kind[s] == _SPLIT or (kind[s] == _ASSERT and _holds(arg[s], ctx)):
                stack.extend(out[s])
        return frozenset(s for s in seen if kind[s] in (_CHAR, _MATCH))

    def _step(self, states: frozenset[int], ch: str, ctx: int, search: bool) -> frozenset[int]:
        key = (states, ch, ctx, search)
        nxt = self._cache.get(key)
        if nxt is None:
            kind, arg, out = self._b.kind, self._b.arg, self._b.out
            moved = {out[s][0] for s in states if kind[s] == _CHAR and arg[s](ch)}
            nxt = self._closure(frozenset(moved | self._start if search else moved), ctx)
            if len(self._cache) > _CACHE_LIMIT:
                self._cache.clear()
            self._cache[key] = nxt
        return nxt

    def _run(self, text: str, search: bool, whole: bool) -> bool:
        n = len(text)
        final_nl = n > 0 and text[-1] == "\n"
        cur = self._closure(self._start, _context(0, n, final_nl))
        for i, ch in enumerate(text):
            if self._match_state in cur and not whole:
                return True
            if not cur and not search:
                return False
            cur = self._step(cur, ch, _context(i + 1, n, final_nl), search)
        return self._match_state in cur

    def search(self, text: str) -> bool:
        """Whether the pattern matches anywhere in ``text`` (``re.search``)."""
        return self._run(text, search=True, whole=False)

    def match(self, text: str) -> bool:
        """Whether the pattern matches at the start of ``text`` (``re.match``)."""
        return self._run(text, search=False, whole=False)

    def fullmatch(self, text: str) -> bool:
        """Whether the pattern matches all of ``text`` (``re.fullmatch``)."""
        return self._run(text, search=False, whole=True)


def _context(pos: int, n: int, final_nl: bool) -> int:
    ctx = _AT_START if pos == 0 else 0
    if pos == n:
        ctx |= _AT_END
    elif final_nl and pos == n - 1:
        ctx |= _BEFORE_FINAL_NEWLINE
    return ctx


def _holds(at: object, ctx: int) -> bool:
    if at in (c.AT_BEGINNING, c.AT_BEGINNING_STRING):
        return bool(ctx & _AT_START)
    if at is c.AT_END:  # "$": the end, or before a final newline
        return bool(ctx & (_AT_END | _BEFORE_FINAL_NEWLINE))
    return bool(ctx & _AT_END)  # "\Z"


@functools.lru_cache(maxsize=256)
def compile_safe(pattern: str) -> SafeRegex:
    """``pattern`` compiled for linear-time matching; ``UnsafePatternError`` says why not."""
    if not isinstance(pattern, str):
        raise UnsafePatternError(f"is a {type(pattern).__name__}, not a string")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise UnsafePatternError(f"is {len(pattern)} characters long (at most {MAX_PATTERN_CHARS})")
    try:
        parsed = sre_parse.parse(pattern)
    except (re.error, RecursionError, OverflowError) as exc:
        raise UnsafePatternError(f"is not a valid regex: {exc}") from exc
    if parsed.state.flags & ~_ALLOWED_FLAGS:
        raise UnsafePatternError("sets a flag other than VERBOSE or DOTALL")
    builder = _Builder(dotall=bool(parsed.state.flags & re.DOTALL))
    try:
        start = builder.seq(list(parsed), builder.state(_MATCH))
    except RecursionError as exc:
        raise UnsafePatternError("nests groups too deeply") from exc
    return SafeRegex(pattern, builder, start)
