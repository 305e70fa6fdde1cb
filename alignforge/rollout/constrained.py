"""Constrained decoding: a local model's output forced to JSON valid for a JSON schema.

    from alignforge.rollout.constrained import schema_from_response_format
    schema = schema_from_response_format({"type": "json_object"})    # {"type": "object"}
    engine.generate([ids], json_schema=schema)      # or a list: one schema (or None) per prompt

The grammar engine is llguidance, vLLM's ``guidance`` structured-output backend (see
docs/decisions.md for why not xgrammar). A schema is compiled once per (tokenizer, schema);
each sequence gets its own matcher, which yields the bitmask of tokens allowed next. Every other
logit is set to -inf before temperature, top-p and sampling, and the sampled token advances the
matcher. EOS is allowed only once the JSON is complete, so a row either ends in valid JSON
(``finish_reason="stop"``) or runs out of ``max_new_tokens`` (``"length"``).

Schemas follow JSON Schema 2020-12 as llguidance implements it: ``anyOf``, ``allOf``, ``oneOf``
(when its branches provably exclude each other), ``$ref``/``$defs``, ``enum``/``const``,
``properties``/``required``/``additionalProperties``, ``minItems``/``maxItems``,
``minLength``/``maxLength``, ``pattern`` (no look-arounds), ``format``, ``minimum``/``maximum``
(and the exclusive forms) and ``multipleOf``. A schema it cannot enforce is refused with the
reason, never loosened. Properties come in the schema's order. The output is compact JSON unless
the schema's top-level ``"x-guidance"`` asks for whitespace (llguidance's options).
"""

from __future__ import annotations

import json
import weakref
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np
import torch

_MAX_SCHEMAS = 256  # compiled schemas kept per tokenizer
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def schema_from_response_format(response_format: dict | None) -> dict | None:
    """The JSON schema to decode under for an OpenAI ``response_format``.

    ``{"type": "json_schema", "json_schema": {"schema": {...}}}`` gives that schema;
    ``{"type": "json_object"}`` gives ``{"type": "object"}`` (any JSON object, as vLLM does);
    ``None`` and ``{"type": "text"}`` give ``None`` (unconstrained). A schema that cannot be
    enforced raises ``ValueError`` with the reason, so a server can answer 400 before generating.
    """
    if not response_format:
        return None
    kind = response_format.get("type")
    if kind == "json_schema":
        schema = (response_format.get("json_schema") or {}).get("schema")
        if not isinstance(schema, dict):
            raise ValueError("response_format.json_schema.schema must be a JSON schema object")
        _grammar(schema)
        return schema
    if kind == "json_object":
        return {"type": "object"}
    if kind in (None, "text"):
        return None
    raise ValueError(
        f"response_format.type {kind!r} is not supported; use text, json_object or json_schema"
    )


def _grammar(schema: dict, ll_tokenizer=None) -> str:
    """llguidance's grammar for ``schema``; ``ValueError`` with the reason if it cannot be
    enforced (checked against ``ll_tokenizer``'s vocabulary when given)."""
    import llguidance

    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
    except (ValueError, TypeError) as e:
        raise ValueError(f"json schema: {e}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar, ll_tokenizer).strip()
    if error:
        if "coerce_one_of" in error:
            error += ' (in the schema: "x-guidance": {"coerce_one_of": true} at the top level)'
        raise ValueError(f"json schema cannot be enforced: {error}")
    return grammar


class JsonConstraint:
    """One JSON schema compiled for one tokenizer; :meth:`matcher` starts a sequence."""

    def __init__(self, ll_tokenizer, schema: dict):
        import llguidance

        self.schema = schema
        grammar = _grammar(schema, ll_tokenizer)
        self._start = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)

    def matcher(self):
        """A fresh ``llguidance.LLMatcher`` at the start of the JSON (a copy, no recompiling)."""
        return self._start.deep_copy()


def json_constraint(tokenizer, schema: dict, eos_ids: Sequence[int] = ()) -> JsonConstraint:
    """``schema`` compiled for ``tokenizer`` (a fast HF tokenizer), cached per tokenizer.

    ``eos_ids`` are the tokens that end generation (default: the tokenizer's EOS); the grammar
    allows them only once the JSON is complete. Raises ``ValueError`` naming what in the schema
    cannot be enforced.
    """
    if not isinstance(schema, dict):
        raise ValueError(f"json schema must be a JSON object, got {type(schema).__name__}")
    eos = tuple(sorted({int(i) for i in eos_ids})) or (tokenizer.eos_token_id,)
    if eos == (None,):
        raise ValueError("constrained decoding needs an EOS token: the tokenizer has none")
    per_tokenizer = _CACHE.setdefault(tokenizer, {})
    if eos not in per_tokenizer:
        per_tokenizer[eos] = (_ll_tokenizer(tokenizer, list(eos)), OrderedDict())
    ll_tok, schemas = per_tokenizer[eos]
    key = json.dumps(schema)  # not sort_keys: property order is part of the grammar
    if key in schemas:
        schemas.move_to_end(key)
    else:
        schemas[key] = JsonConstraint(ll_tok, schema)
        if len(schemas) > _MAX_SCHEMAS:
            schemas.popitem(last=False)
    return schemas[key]


def _ll_tokenizer(tokenizer, eos_ids: list[int]):
    import llguidance.hf
    from transformers import PreTrainedTokenizerFast

    if not isinstance(tokenizer, PreTrainedTokenizerFast):
        raise ValueError(
            f"constrained decoding needs a fast (Rust) tokenizer, got {type(tokenizer).__name__}; "
            "load it with AutoTokenizer.from_pretrained(path) (use_fast is the default)"
        )
    return llguidance.hf.from_tokenizer(tokenizer, eos_token=eos_ids)


class JsonLogitsProcessor:
    """A transformers logits processor: row ``i`` keeps only the tokens ``matchers[i]`` allows
    next; rows whose matcher is ``None`` pass unchanged. One per ``generate`` call.

    Each call first feeds the token taken at the previous step to its row's matcher. A matcher
    that has stopped (its JSON is complete, or EOS was taken) ignores what follows. A row that
    ``generate`` has ended for another reason (a stop string, its own token limit) gets
    ``pad_id`` from then on: when the grammar rejects that padding the row is left unmasked, as
    its scores no longer matter. Any other rejected token is a bug and raises.
    """

    def __init__(self, matchers: Sequence, pad_id: int | None = None):
        self.matchers = list(matchers)
        self.pad_id = pad_id
        self._started = False

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        if len(self.matchers) != scores.shape[0]:
            raise ValueError(f"{len(self.matchers)} matchers for a batch of {scores.shape[0]}")
        if self._started:
            self._advance(input_ids[:, -1].tolist())
        self._started = True
        if all(m is None for m in self.matchers):
            return scores
        allowed = torch.from_numpy(self._allowed(scores.shape[-1])).to(scores.device)
        return scores.masked_fill(~allowed, float("-inf"))

    def _advance(self, tokens: list[int]) -> None:
        for row, token in enumerate(tokens):
            m = self.matchers[row]
            if m is None or m.is_stopped():
                continue
            if not m.consume_token(token):
                if token == self.pad_id:
                    self.matchers[row] = None
                    continue
                raise RuntimeError(f"row {row}: token {token} broke the JSON grammar: "
                                   f"{m.get_error()}")  # fmt: skip

    def _allowed(self, vocab: int) -> np.ndarray:
        """``(B, vocab)`` booleans: each matcher's bitmask unpacked (bit j of 32-bit word w is
        token 32 w + j; ids past the tokenizer's vocabulary are never allowed), all True for a
        row without one."""
        allowed = np.ones((len(self.matchers), vocab), dtype=bool)
        for row, m in enumerate(self.matchers):
            if m is None:
                continue
            bits = np.unpackbits(np.frombuffer(m.compute_bitmask(), np.uint8), bitorder="little")
            if m.is_error():
                raise RuntimeError(f"row {row}: the JSON grammar failed: {m.get_error()}")
            allowed[row] = False
            n = min(vocab, len(bits))
            allowed[row, :n] = bits[:n]
        return allowed
