"""Constrained decoding: force a local model to emit JSON valid for a JSON schema.

    from alignforge.rollout.json_constraint import JsonSchemaConstraint
    constraint = JsonSchemaConstraint(tokenizer, InstructionSet.model_json_schema())
    engine.generate([ids], json_schema=schema)        # the engine builds the logits processor

Supported schema subset (enough for pydantic models of records): ``object`` (properties are
emitted in declared order, all of them), ``array`` (``items``, ``minItems``, ``maxItems``),
``string`` (``minLength``, ``maxLength``, ``enum``/``const``), ``integer``, ``number``,
``boolean``, ``null``, ``$ref`` into ``$defs``, and ``anyOf``/``oneOf`` (the first non-null
branch is used). Output is compact JSON (no whitespace between tokens), which every JSON parser
accepts. Strings without ``maxLength`` are capped at ``max_string_chars`` so generation ends.

The grammar is a pushdown automaton over characters whose states are hashable tuples; a token is
allowed when all of its characters are accepted from the current state. Masks are cached per
state, and the common "inside a free string" state uses a precomputed set of quote-free tokens,
so a 49k-token vocabulary costs a few milliseconds per step.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np
import torch

_NUM_PREFIX = re.compile(r"-?(?:(?:0|[1-9]\d*)(?:\.\d*)?(?:[eE][+-]?\d*)?)?")
_NUM_FULL = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?")
_INT_PREFIX = re.compile(r"-?(?:0|[1-9]\d*)?")
_INT_FULL = re.compile(r"-?(?:0|[1-9]\d*)")
_MAX_NUMBER_CHARS = 16
_ESCAPES = {'"': '"', "\\": "\\", "/": "/", "n": "\n", "t": "\t"}


def normalize_schema(schema: dict, max_string_chars: int = 1000) -> tuple:
    """Turn a JSON schema into the hashable node tuples the automaton walks."""
    defs = schema.get("$defs", schema.get("definitions", {}))

    def norm(node: dict) -> tuple:
        if "$ref" in node:
            name = node["$ref"].rsplit("/", 1)[-1]
            if name not in defs:
                raise ValueError(f"json schema: unresolved $ref {node['$ref']!r}")
            return norm(defs[name])
        for key in ("anyOf", "oneOf", "allOf"):
            if key in node:
                options = [o for o in node[key] if o.get("type") != "null"] or node[key]
                return norm({**options[0], **{k: v for k, v in node.items() if k != key}})
        if "const" in node:
            node = {**node, "enum": [node["const"]]}
        if "enum" in node:
            if not all(isinstance(v, str) for v in node["enum"]):
                raise ValueError("json schema: only string enums are supported")
            return ("string", 0, None, tuple(node["enum"]))
        kind = node.get("type", "object" if "properties" in node else None)
        if isinstance(kind, list):
            kind = next((k for k in kind if k != "null"), "null")
        if kind == "object":
            props = tuple((name, norm(sub)) for name, sub in node.get("properties", {}).items())
            return ("object", props)
        if kind == "array":
            item = norm(node.get("items", {"type": "string"}))
            return ("array", item, int(node.get("minItems", 0)), node.get("maxItems"))
        if kind == "string":
            mx = node.get("maxLength", max_string_chars)
            return ("string", int(node.get("minLength", 0)), mx, None)
        if kind in ("integer", "number"):
            return ("number", kind == "integer")
        if kind in ("boolean", "null"):
            return (kind,)
        raise ValueError(f"json schema: unsupported node {json.dumps(node)[:120]}")

    return norm(schema)


def feed(stack: tuple, ch: str) -> tuple | None:
    """Advance the automaton by one character; ``None`` when ``ch`` is not allowed."""
    while stack:
        top, rest = stack[-1], stack[:-1]
        kind = top[0]
        if kind == "V":
            return _start_value(rest, top[1], ch)
        if kind == "L":
            if ch != top[1][0]:
                return None
            return rest + ((("L", top[1][1:]),) if len(top[1]) > 1 else ())
        if kind == "O":
            node, i = top[1], top[2]
            if i == len(node[1]):
                return rest if ch == "}" else None
            name, sub = node[1][i]
            lit = ("" if i == 0 else ",") + json.dumps(name) + ":"
            stack = rest + (("O", node, i + 1), ("V", sub), ("L", lit))
            continue
        if kind == "A":
            node, count = top[1], top[2]
            if ch == "]" and count >= node[2]:
                return rest
            if node[3] is not None and count >= node[3]:
                return None
            if count == 0:
                stack = rest + (("A", node, 1), ("V", node[1]))
                continue
            return rest + (("A", node, count + 1), ("V", node[1])) if ch == "," else None
        if kind == "S":
            return _feed_string(rest, top, ch)
        if kind == "N":
            is_int, text = top[1], top[2]
            prefix, full = (_INT_PREFIX, _INT_FULL) if is_int else (_NUM_PREFIX, _NUM_FULL)
            cand = text + ch
            if len(cand) <= _MAX_NUMBER_CHARS and prefix.fullmatch(cand):
                return rest + (("N", is_int, cand),)
            if not full.fullmatch(text):
                return None
            stack = rest  # the number ended; the parent sees ``ch``
            continue
        raise AssertionError(kind)
    return None


def _start_value(rest: tuple, node: tuple, ch: str) -> tuple | None:
    kind = node[0]
    if kind == "object":
        return rest + (("O", node, 0),) if ch == "{" else None
    if kind == "array":
        return rest + (("A", node, 0),) if ch == "[" else None
    if kind == "string":
        return rest + (("S", node, 0, False, ""),) if ch == '"' else None
    if kind == "number":
        return rest + (("N", node[1], ch),) if ch in "-0123456789" else None
    if kind == "boolean":
        lit = {"t": "rue", "f": "alse"}.get(ch)
        return rest + (("L", lit),) if lit else None
    if kind == "null":
        return rest + (("L", "ull"),) if ch == "n" else None
    raise AssertionError(kind)


def _feed_string(rest: tuple, top: tuple, ch: str) -> tuple | None:
    _, node, n, esc, content = top
    mn, mx, enum = node[1], node[2], node[3]
    if esc:
        if ch not in _ESCAPES:
            return None
        return rest + (("S", node, n + 1, False, ""),)
    if ch == '"':
        ok = n >= mn and (enum is None or content in enum)
        return rest if ok else None
    if ord(ch) < 0x20 or (mx is not None and n >= mx):
        return None
    if ch == "\\":
        return None if enum else rest + (("S", node, n, True, ""),)
    if enum is not None:
        grown = content + ch
        if not any(e.startswith(grown) for e in enum):
            return None
        return rest + (("S", node, n + 1, False, grown),)
    return rest + (("S", node, n + 1, False, ""),)


def feed_text(stack: tuple | None, text: str) -> tuple | None:
    for ch in text:
        if stack is None:
            return None
        stack = feed(stack, ch)
    return stack


def is_complete(stack: tuple) -> bool:
    if not stack:
        return True
    if len(stack) == 1 and stack[0][0] == "N":
        full = _INT_FULL if stack[0][1] else _NUM_FULL
        return bool(full.fullmatch(stack[0][2]))
    return False


def token_strings(tokenizer) -> list[str]:
    """The text each token id adds when appended (byte-level BPE and sentencepiece)."""
    n = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(n)))
    sentencepiece = sum(1 for p in pieces if p and p.startswith("\u2581")) > n // 20
    out = []
    for i, piece in enumerate(pieces):
        if piece is None:
            out.append("")
        elif sentencepiece:
            out.append(
                "" if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece) else piece.replace("\u2581", " ")
            )
        else:
            out.append(tokenizer.decode([i]))
    return out


class JsonSchemaConstraint:
    """Per-tokenizer, per-schema token masks; ``processor()`` gives a fresh logits processor."""

    def __init__(self, tokenizer, schema: dict, *, max_string_chars: int = 1000, eos_ids=()):
        self.root = normalize_schema(schema, max_string_chars)
        self.eos_ids = sorted({int(i) for i in eos_ids if i is not None})
        if not self.eos_ids and tokenizer.eos_token_id is not None:
            self.eos_ids = [int(tokenizer.eos_token_id)]
        strs = token_strings(tokenizer)
        special = set(getattr(tokenizer, "all_special_ids", []))
        special |= set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
        self.strs = strs
        self.vocab = len(strs)
        groups: dict[str, list[int]] = {}
        plain, plain_len, quoted = [], [], []
        for i, s in enumerate(strs):
            if not s or i in special or "\ufffd" in s or any(ord(c) < 0x20 for c in s):
                continue
            groups.setdefault(s[0], []).append(i)
            if '"' in s or "\\" in s:
                quoted.append(i)
            else:
                plain.append(i)
                plain_len.append(len(s))
        self.groups = {c: np.array(ids) for c, ids in groups.items()}
        self.plain = np.array(plain, dtype=np.int64)
        self.plain_len = np.array(plain_len, dtype=np.int64)
        self.quoted = quoted
        self._cache: dict[tuple, np.ndarray] = {}

    def initial_state(self) -> tuple:
        return (("V", self.root),)

    def allowed(self, state: tuple) -> np.ndarray:
        """Token ids allowed next from ``state`` (EOS only once the JSON is complete)."""
        hit = self._cache.get(state)
        if hit is not None:
            return hit
        ids: list[np.ndarray] = []
        top = state[-1] if state else None
        if top is not None and top[0] == "S" and not top[3] and top[1][3] is None:
            mx = top[1][2]
            room = np.inf if mx is None else mx - top[2]
            ids.append(self.plain[self.plain_len <= room])
            ids.append(np.array([i for i in self.quoted if feed_text(state, self.strs[i])]))
        elif state:
            for ch, group in self.groups.items():
                if feed(state, ch) is not None:
                    ok = [i for i in group if feed_text(state, self.strs[i]) is not None]
                    ids.append(np.array(ok, dtype=np.int64))
        if is_complete(state):
            ids.append(np.array(self.eos_ids, dtype=np.int64))
        out = np.unique(np.concatenate(ids).astype(np.int64)) if ids else np.zeros(0, np.int64)
        if len(self._cache) > 20000:
            self._cache.clear()
        self._cache[state] = out
        return out

    def advance(self, state: tuple | None, token_id: int) -> tuple | None:
        if state is None or token_id >= self.vocab:
            return None
        return feed_text(state, self.strs[token_id])

    def processor(self) -> JsonLogitsProcessor:
        return JsonLogitsProcessor(self)


class JsonLogitsProcessor:
    """A transformers logits processor that masks tokens breaking the schema (one per generate)."""

    def __init__(self, constraint: JsonSchemaConstraint):
        self.c = constraint
        self.prompt_len: int | None = None
        self.states: list[Any] = []
        self.finished: list[bool] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        batch = input_ids.shape[0]
        if self.prompt_len is None:
            self.prompt_len = input_ids.shape[1]
            self.states = [self.c.initial_state()] * batch
            self.finished = [False] * batch
        elif input_ids.shape[1] > self.prompt_len:
            last = input_ids[:, -1].tolist()
            for row, tok in enumerate(last):
                if self.finished[row]:
                    continue
                if tok in self.c.eos_ids:
                    self.finished[row] = True
                else:
                    self.states[row] = self.c.advance(self.states[row], tok)
        mask = torch.full_like(scores, float("-inf"))
        for row in range(batch):
            state = self.states[row]
            if self.finished[row] or state is None:
                allowed = np.array(self.c.eos_ids, dtype=np.int64)
            else:
                allowed = self.c.allowed(state)
            if len(allowed) == 0:
                allowed = np.array(self.c.eos_ids, dtype=np.int64)
            mask[row, torch.from_numpy(allowed)] = 0.0
        return scores + mask
