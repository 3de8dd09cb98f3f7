"""Reading the structured answer out of a model's reply, safely: JSON, then a Python dict literal, never `eval`.

The `<sep>` format is a dict such as `{'thought': '...', 'hallucination': 'no'}`, written with Python or JSON quotes,
perhaps with prose around it. `parse_structured` tries the whole reply as JSON, then each balanced `{...}` in it
(found by a scan that respects quoted strings) with `json.loads` and then `ast.literal_eval`. Model output is
untrusted: every candidate is bounded in size and in nesting depth *before* a parser sees it, and only a few
candidates are tried, so a truncated dict, a call expression, a nested bomb or a 10 MB reply gives None, quickly.
"""

from __future__ import annotations

import ast
import json
from typing import Any

MAX_CHARS = 10_000  # the longest candidate `{...}` handed to a parser
MAX_DEPTH = 20  # the deepest nesting of brackets ({, [, () a candidate may have
MAX_CANDIDATES = 8  # how many `{` starts are tried before giving up

_OPEN = {"{": "}", "[": "]", "(": ")"}
_CLOSE = set(_OPEN.values())
_PARSE_ERRORS = (ValueError, SyntaxError, TypeError, MemoryError, RecursionError)


def _balanced_end(text: str, start: int, max_chars: int, max_depth: int) -> int | None:
    """Index just past the `}` that closes the `{` at `start`, or None (unbalanced, too long or too deep).

    Brackets inside quoted strings (single or double quotes, backslash escapes) do not count.
    """
    stack: list[str] = []
    quote: str | None = None
    escaped = False
    end = min(len(text), start + max_chars)
    for index in range(start, end):
        char = text[index]
        if quote is not None:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = None
        elif char in "'\"":
            quote = char
        elif char in _OPEN:
            stack.append(_OPEN[char])
            if len(stack) > max_depth:
                return None
        elif char in _CLOSE:
            if not stack or stack.pop() != char:
                return None  # a stray or mismatched bracket: not a literal
            if not stack:
                return index + 1
    return None


def _as_dict(candidate: str) -> dict | None:
    """The candidate as a dict, through JSON then a Python literal; None if it is neither."""
    for parse in (json.loads, ast.literal_eval):
        try:
            value: Any = parse(candidate)
        except _PARSE_ERRORS:
            continue
        return value if isinstance(value, dict) else None
    return None


def parse_structured(text: str, *, max_chars: int = MAX_CHARS, max_depth: int = MAX_DEPTH) -> dict | None:
    """The first dict in a model reply (JSON or a Python literal, prose around it allowed), or None; never raises.

    Nothing is evaluated: only `json.loads` and `ast.literal_eval` run, each on a candidate of at most `max_chars`
    characters nested at most `max_depth` deep.
    """
    if not isinstance(text, str):
        return None
    start = text.find("{")
    for _ in range(MAX_CANDIDATES):
        if start < 0:
            return None
        end = _balanced_end(text, start, max_chars, max_depth)
        if end is not None:
            parsed = _as_dict(text[start:end])
            if parsed is not None:
                return parsed
        start = text.find("{", start + 1)
    return None
