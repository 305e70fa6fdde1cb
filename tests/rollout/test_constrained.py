"""Constrained decoding on a tiny random model. Its free output is not JSON, so every valid object
here is the grammar's doing; outputs are checked with ``jsonschema``, not with our own code."""

import copy
import json

import jsonschema
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field
from transformers.generation.logits_process import TopPLogitsWarper

from alignforge.rollout import TransformersEngine, chat_prompt_ids
from alignforge.rollout.constrained import (
    JsonLogitsProcessor,
    json_constraint,
    schema_from_response_format,
)


class Pair(BaseModel):
    model_config = ConfigDict(extra="forbid")
    instruction: str = Field(min_length=1, max_length=10)
    answer: str | None = Field(default=None, max_length=10)


class PairSet(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pairs: list[Pair] = Field(min_length=1, max_length=2)


SCHEMAS = {
    "anyOf": {"type": "object", "required": ["v"], "additionalProperties": False,
              "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 9},
                                             {"type": "boolean"}, {"type": "null"}]}}},
    "additionalProperties": {"type": "object", "properties": {"ok": {"type": "boolean"}},
                             "required": ["ok"], "additionalProperties": False},
    "minimum/maximum": {"type": "object", "required": ["n", "x"], "additionalProperties": False,
                        "properties": {"n": {"type": "integer", "minimum": -5, "maximum": 12},
                                       "x": {"type": "number", "exclusiveMinimum": 0,
                                             "maximum": 1}}},
    "pattern": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
    "allOf": {"allOf": [{"properties": {"a": {"type": "integer", "minimum": 1, "maximum": 3}},
                         "required": ["a"]},
                        {"properties": {"b": {"enum": ["x", "y"]}}, "required": ["b"]}],
              "type": "object", "properties": {"a": True, "b": True},
              "additionalProperties": False},
    "enum": {"enum": ["red", 3, None, {"k": [1, 2]}]},
    "nested arrays of objects": {
        "type": "object", "required": ["items"], "additionalProperties": False,
        "properties": {"items": {"type": "array", "minItems": 1, "maxItems": 2, "items": {
            "type": "object", "required": ["name", "score"], "additionalProperties": False,
            "properties": {"name": {"type": "string", "minLength": 1, "maxLength": 6},
                           "score": {"type": "integer", "minimum": 0, "maximum": 99},
                           "tags": {"type": "array", "maxItems": 2,
                                    "items": {"enum": ["a", "b"]}}}}}}},
    "$ref / Optional (pydantic)": PairSet.model_json_schema(),
}  # fmt: skip


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return chat_prompt_ids(tokenizer, "Answer in JSON.")


def biased_model(tiny_model, tokenizer, bias_of) -> torch.nn.Module:
    """A copy of the tiny model whose logits get ``bias_of(token_id, token_string)`` added."""
    model = copy.deepcopy(tiny_model)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    bias = torch.tensor([float(bias_of(i, p)) for i, p in enumerate(pieces)])
    model.lm_head.register_forward_hook(lambda module, args, out: out + bias)
    return model


def test_free_output_of_the_tiny_model_is_not_json(tiny_model, tokenizer, prompt):
    [group] = TransformersEngine(tiny_model, tokenizer).generate(
        [prompt], n=3, max_new_tokens=12, seed=0
    )
    for r in group:
        with pytest.raises(ValueError):
            json.loads(r.text)


def test_every_sample_is_valid_for_its_schema(tiny_model, tokenizer, prompt):
    """One batch, one schema per prompt, three seeded samples each."""
    names = list(SCHEMAS)
    engine = TransformersEngine(tiny_model, tokenizer, batch_size=len(names) * 3)
    groups = engine.generate([prompt] * len(names), n=3, seed=0, max_new_tokens=64,
                             json_schema=[SCHEMAS[k] for k in names])  # fmt: skip
    for name, group in zip(names, groups, strict=True):
        for r in group:
            assert r.finish_reason == "stop", (name, r.text)
            jsonschema.validate(json.loads(r.text), SCHEMAS[name])
    for r in groups[-1]:
        PairSet.model_validate_json(r.text)
    assert len({r.text for r in groups[names.index("pattern")]}) > 1  # sampled, not forced


def test_json_object_gives_an_object(tiny_model, tokenizer, prompt):
    """``json_object`` admits any object; a model fond of quotes and braces ends one soon."""
    model = biased_model(tiny_model, tokenizer, lambda i, p: 8.0 if '"' in p or "}" in p else 0.0)
    engine = TransformersEngine(model, tokenizer, batch_size=8)
    schema = schema_from_response_format({"type": "json_object"})
    [free, constrained] = engine.generate([prompt, prompt], n=4, seed=1, max_new_tokens=48,
                                          json_schema=[None, schema])  # fmt: skip
    assert not any(_parses(r.text) for r in free)
    for r in constrained:
        assert r.finish_reason == "stop", r.text
        assert isinstance(json.loads(r.text), dict)
    assert any(json.loads(r.text) for r in constrained)  # not only {}


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_eos_cannot_end_an_unfinished_object(tiny_model, tokenizer, prompt):
    """A model that wants to stop at once (EOS +30) stops at once when free; under a schema EOS
    comes only after the object is complete, and a row cut by max_new_tokens has no EOS."""
    eos = tokenizer.eos_token_id
    model = biased_model(tiny_model, tokenizer, lambda i, p: 30.0 if i == eos else 0.0)
    engine = TransformersEngine(model, tokenizer)
    schema = SCHEMAS["nested arrays of objects"]
    [free] = engine.generate([prompt], n=2, seed=0, max_new_tokens=8)
    assert all(r.completion_ids == [eos] and r.finish_reason == "stop" for r in free)
    [done] = engine.generate([prompt], n=3, seed=0, max_new_tokens=64, json_schema=schema)
    for r in done:
        assert r.finish_reason == "stop" and r.completion_ids[-1] == eos
        assert eos not in r.completion_ids[:-1]
        jsonschema.validate(json.loads(r.text), schema)
    [cut] = engine.generate([prompt], n=2, seed=0, max_new_tokens=4, json_schema=schema)
    for r in cut:
        assert r.finish_reason == "length" and eos not in r.completion_ids
        assert r.text.startswith('{"') and not _parses(r.text)


@pytest.mark.parametrize("temperature,top_p,greedy", [(0.7, 0.9, False), (1.3, 1.0, False),
                                                      (1.0, 1.0, True)])  # fmt: skip
def test_logps_are_those_of_the_masked_tempered_distribution(
    tiny_model, tokenizer, prompt, temperature, top_p, greedy
):
    """logps[t] = log_softmax(top_p(mask_t(logits_t) / T))[token_t], with mask_t replayed by a
    fresh matcher and logits_t teacher-forced; greedy uses T=1 and no top-p."""
    schema = SCHEMAS["nested arrays of objects"]
    engine = TransformersEngine(tiny_model, tokenizer)
    [group] = engine.generate([prompt], n=2, seed=3, max_new_tokens=40, json_schema=schema,
                              temperature=temperature, top_p=top_p, greedy=greedy)  # fmt: skip
    for r in group:
        ids = torch.tensor([r.prompt_ids + r.completion_ids])
        with torch.no_grad():
            logits = tiny_model(ids).logits[0, len(r.prompt_ids) - 1 : -1].float()
        matcher = json_constraint(tokenizer, schema, engine.eos_ids).matcher()
        expected, unmasked = [], []
        for t, token in enumerate(r.completion_ids):
            allowed = _allowed(matcher, logits.shape[-1])
            scores = logits[t].masked_fill(~allowed, float("-inf"))[None]
            if not greedy:
                scores = TopPLogitsWarper(top_p)(None, scores / temperature)
            expected.append(torch.log_softmax(scores[0], -1)[token])
            unmasked.append(
                torch.log_softmax(logits[t] / (1.0 if greedy else temperature), -1)[token]
            )
            assert allowed[token]
            if not matcher.is_stopped():
                assert matcher.consume_token(token)
        assert torch.allclose(torch.tensor(r.logps), torch.stack(expected), atol=1e-4)
        # the mask matters: forced tokens have logp 0, far above the unmasked model's
        assert max(e - u for e, u in zip(expected, unmasked, strict=True)) > 1.0


def _allowed(matcher, vocab: int) -> torch.Tensor:
    """The matcher's bitmask as booleans, read bit by bit (token i is bit i % 32 of word i // 32)."""
    words = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)
    ids = torch.arange(vocab)
    return ((words[ids // 32] >> (ids % 32)) & 1).bool()


def test_rows_without_a_schema_are_not_masked(tiny_model, tokenizer, prompt):
    engine = TransformersEngine(tiny_model, tokenizer, batch_size=4)
    [[constrained], [free]] = engine.generate(
        [prompt, prompt], seed=5, max_new_tokens=10, json_schema=[SCHEMAS["anyOf"], None]
    )
    jsonschema.validate(json.loads(constrained.text), SCHEMAS["anyOf"])
    ids = torch.tensor([free.prompt_ids + free.completion_ids])
    with torch.no_grad():
        logits = tiny_model(ids).logits[0, len(free.prompt_ids) - 1 : -1]
    model_logps = torch.log_softmax(logits, -1).gather(
        -1, torch.tensor(free.completion_ids)[:, None]
    )
    assert torch.allclose(torch.tensor(free.logps), model_logps.squeeze(-1), atol=1e-4)


def test_processor_ignores_padding_after_a_row_ends_and_raises_on_a_foreign_token(tokenizer):
    schema = SCHEMAS["anyOf"]
    pad = tokenizer.pad_token_id
    make = lambda: json_constraint(tokenizer, schema, [tokenizer.eos_token_id]).matcher()  # noqa: E731
    proc = JsonLogitsProcessor([make(), make()], pad_id=pad)
    vocab = len(tokenizer)
    first = tokenizer('{"v":', add_special_tokens=False)["input_ids"][0]
    scores = torch.zeros(2, vocab)
    out = proc(torch.tensor([[1], [1]]), scores)
    assert torch.isfinite(out[:, first]).all() and torch.isinf(out).any(1).all()
    out = proc(torch.tensor([[1, first], [1, pad]]), scores)  # row 1 ended early: padding
    assert torch.isinf(out[0]).any() and torch.isfinite(out[1]).all()
    bad = tokenizer("hello", add_special_tokens=False)["input_ids"][0]
    with pytest.raises(RuntimeError, match="row 0: token .* broke the JSON grammar"):
        proc(torch.tensor([[1, first, bad], [1, pad, pad]]), scores)


def test_schema_errors_name_the_reason(tokenizer):
    with pytest.raises(ValueError, match="look-around"):
        json_constraint(tokenizer, {"type": "string", "pattern": "(?=a)a"})
    with pytest.raises(ValueError, match="coerce_one_of"):
        schema_from_response_format({"type": "json_schema", "json_schema": {"schema": {
            "oneOf": [{"type": "string"}, {"type": "string", "maxLength": 3}]}}})  # fmt: skip
    with pytest.raises(ValueError, match="json_object or json_schema"):
        schema_from_response_format({"type": "yaml"})
    assert schema_from_response_format({"type": "text"}) is None
    assert schema_from_response_format(None) is None
