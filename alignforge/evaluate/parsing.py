"""Robust extraction of a JSON object from raw model output.

    >>> parse_json_output('Sure! ```json\\n{"entities": []}\\n``` Hope it helps.')
    ParseResult(value={'entities': []}, error=None)

Tried in order, first success wins:
1. the body of the first fenced code block (```json ... ``` or ``` ... ```), else the whole text;
2. ``json.loads`` of it;
3. from each ``{`` / ``[`` in turn (so leading chatter and trailing text are ignored):
   ``raw_decode``, else the bracketed span after repairs: trailing commas removed, Python
   literals (single quotes, ``True``/``None``) read with ``ast.literal_eval``.
Never raises: junk gives ``ParseResult(None, "<why>")``.
"""

from __future__ import annotations

import ast
import json
import re
from typing import Any, NamedTuple

_FENCE = re.compile(r"```[a-zA-Z0-9_-]*[ \t]*\n?(.*?)(?:```|$)", re.S)
_TRAILING_COMMA = re.compile(r",\s*([}\]])")
_MAX_STARTS = 20


class ParseResult(NamedTuple):
    value: Any
    error: str | None


def parse_json_output(text: str) -> ParseResult:
    if not isinstance(text, str):
        return ParseResult(None, f"output is {type(text).__name__}, not text")
    candidates = [m.group(1) for m in _FENCE.finditer(text)] + [text]
    for cand in candidates:
        value = _decode(cand.strip())
        if value is not None:
            return ParseResult(value, None)
    if not text.strip():
        return ParseResult(None, "empty output")
    return ParseResult(None, "no JSON object found in output")


def _decode(text: str) -> Any:
    if not text:
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    decoder = json.JSONDecoder()
    starts = [i for i, ch in enumerate(text) if ch in "{["][:_MAX_STARTS]
    for i in starts:  # outermost first: a repaired outer object beats a clean inner one
        try:
            return decoder.raw_decode(text, i)[0]
        except ValueError:
            value = _repair(text[i:])
            if value is not None:
                return value
    return None


def _repair(text: str) -> Any:
    """Trailing commas and Python-literal syntax (single quotes, True/False/None)."""
    close = "}" if text[0] == "{" else "]"
    end = _matching_close(text, text[0], close)
    if end is None:
        return None
    body = _TRAILING_COMMA.sub(r"\1", text[: end + 1])
    try:
        return json.loads(body)
    except ValueError:
        pass
    try:
        value = ast.literal_eval(body)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    return value if isinstance(value, dict | list) else None


def _matching_close(text: str, open_: str, close: str) -> int | None:
    """Index of the bracket closing ``text[0]``, skipping quoted strings ('...' and "...")."""
    depth, quote, escaped = 0, None, False
    for i, ch in enumerate(text):
        if quote:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == quote:
                quote = None
        elif ch in "\"'":
            quote = ch
        elif ch == open_:
            depth += 1
        elif ch == close:
            depth -= 1
            if depth == 0:
                return i
    return None
