"""``alignforge serve`` through the official ``openai`` client, parameter by parameter, on a tiny
random model (the tokenizer is the default model's, 49k tokens)."""

import copy
import json
import threading
import time

import httpx
import openai
import pytest
import torch

from alignforge.rollout import TransformersEngine, chat_prompt_ids
from alignforge.rollout.server import create_app, start_server

MSG = [{"role": "user", "content": "Name a city."}]


@pytest.fixture(scope="module")
def engine(tiny_model, tokenizer):
    return TransformersEngine(tiny_model, tokenizer, policy_version="ckpt-1")


@pytest.fixture(scope="module")
def server(engine):
    running = start_server(create_app(engine, model_name="tiny"))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key="-", max_retries=0, timeout=60)


def test_chat_logprobs_are_the_processed_ones_with_their_top_alternatives(
    client, engine, tiny_model, tokenizer
):
    """Each token's log-prob and its 3 best alternatives are those of the distribution it was
    drawn from: the model's logits / temperature, cut to the top-p nucleus (transformers'
    TopPLogitsWarper), renormalised. Recomputed here by teacher forcing, within 1e-5."""
    from transformers.generation.logits_process import TopPLogitsWarper

    out = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=6, temperature=0.7,
                                         top_p=0.9, seed=1, logprobs=True, top_logprobs=3)  # fmt: skip
    content = out.choices[0].logprobs.content
    prompt = chat_prompt_ids(tokenizer, MSG)
    [[local]] = engine.generate([prompt], temperature=0.7, top_p=0.9, max_new_tokens=6, seed=1)
    assert len(content) == out.usage.completion_tokens == len(local.completion_ids) > 0
    ids = torch.tensor([prompt + local.completion_ids])
    with torch.no_grad():
        logits = tiny_model(ids).logits[0, len(prompt) - 1 : -1].float() / 0.7
    processed = torch.log_softmax(TopPLogitsWarper(0.9)(ids, logits), -1)
    for t, (entry, token_id) in enumerate(zip(content, local.completion_ids, strict=True)):
        assert entry.token == tokenizer.decode([token_id])
        assert entry.bytes == list(entry.token.encode())
        assert entry.logprob == pytest.approx(processed[t, token_id].item(), abs=1e-5)
        best = processed[t].topk(3)
        assert [a.logprob for a in entry.top_logprobs] == pytest.approx(
            best.values.tolist(), abs=1e-5
        )
        assert [a.token for a in entry.top_logprobs] == [
            tokenizer.decode([i]) for i in best.indices
        ]


def test_chat_stream_carries_logprobs_and_usage(client):
    kw = dict(model="tiny", messages=MSG, max_tokens=8, temperature=1.0, seed=4, logprobs=True,
              top_logprobs=2)  # fmt: skip
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True,
                                                 stream_options={"include_usage": True}))  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    lps = [e for c in chunks if c.choices and c.choices[0].logprobs
           for e in c.choices[0].logprobs.content]  # fmt: skip
    assert text == full.choices[0].message.content
    assert [e.logprob for e in lps] == [e.logprob for e in full.choices[0].logprobs.content]
    assert all(len(e.top_logprobs) == 2 for e in lps)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[
        0
    ].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(lps)
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_stop_ends_before_the_stop_string(client):
    base = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0)
    text = base.choices[0].message.content
    stop = text[4:6]
    expected = text[: text.find(stop)]
    out = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12, temperature=0,
                                         stop=[stop, "never-appears"])  # fmt: skip
    choice = out.choices[0]
    assert (choice.message.content, choice.finish_reason) == (expected, "stop")
    assert choice.model_extra["stop_reason"] == stop
    assert (
        out.usage.completion_tokens < base.usage.completion_tokens
        or base.choices[0].finish_reason == "stop"
    )
    streamed = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=12,
                                              temperature=0, stop=stop, stream=True)  # fmt: skip
    chunks = [c.choices[0] for c in streamed if c.choices]
    assert "".join(c.delta.content or "" for c in chunks) == expected
    assert chunks[-1].finish_reason == "stop"


def test_response_format_json_schema_and_json_object(client, tokenizer):
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}  # fmt: skip
    rf = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    out = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=20, n=2, seed=0,
                                         response_format=rf)  # fmt: skip
    for choice in out.choices:
        assert choice.finish_reason == "stop" and isinstance(
            json.loads(choice.message.content)["ok"], bool
        )
    # json_object: every token the first step could take opens an object (the others are masked
    # to -inf, reported as vLLM's -9999.0)
    out = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=4, seed=0,
                                         response_format={"type": "json_object"}, logprobs=True,
                                         top_logprobs=5)  # fmt: skip
    first = out.choices[0].logprobs.content[0]
    assert out.choices[0].message.content.startswith("{")
    assert all(a.token.lstrip().startswith("{") or a.logprob == -9999.0 for a in first.top_logprobs)
    with pytest.raises(openai.BadRequestError, match="response_format"):
        client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2,
                                       response_format={"type": "json_schema", "json_schema": {}})  # fmt: skip


def test_completions_take_token_ids_and_return_them(client, tokenizer):
    ids = tokenizer("Once upon a time", add_special_tokens=False)["input_ids"]
    out = client.completions.create(model="tiny", prompt=[ids, ids[:2]], max_tokens=5, n=2,
                                    logprobs=2, seed=3,
                                    extra_body={"return_tokens_as_token_ids": True,
                                                "return_token_ids": True})  # fmt: skip
    assert len(out.choices) == 4 and [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.usage.prompt_tokens == len(ids) + 2
    for i, c in enumerate(out.choices):
        assert c.model_extra["prompt_token_ids"] == (ids if i < 2 else ids[:2])
        lp = c.logprobs
        assert lp.tokens == [f"token_id:{t}" for t in c.model_extra["token_ids"]]
        assert (
            len(lp.token_logprobs) == len(lp.tokens) == len(lp.text_offset) == len(lp.top_logprobs)
        )
        assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
        for token, best in zip(lp.tokens, lp.top_logprobs, strict=True):
            assert (
                token in best
                and 2 <= len(best) <= 3
                and all(k.startswith("token_id:") for k in best)
            )
    text_prompt = client.completions.create(model="tiny", prompt="Once upon a time", max_tokens=5,
                                            temperature=0, extra_body={"add_special_tokens": False})  # fmt: skip
    ids_prompt = client.completions.create(model="tiny", prompt=ids, max_tokens=5, temperature=0)
    assert text_prompt.choices[0].text == ids_prompt.choices[0].text


def test_completions_stream(client):
    kw = dict(model="tiny", prompt=["Once upon", "The"], max_tokens=6, n=2, seed=9, logprobs=1)
    full = client.completions.create(**kw)
    chunks = list(
        client.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    for i, choice in enumerate(full.choices):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == i]
        assert "".join(c.text for c in mine) == choice.text
        assert [
            t for c in mine for t in c.logprobs.token_logprobs
        ] == choice.logprobs.token_logprobs
        assert [o for c in mine for o in c.logprobs.text_offset] == choice.logprobs.text_offset
        assert mine[-1].finish_reason == choice.finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == full.usage.total_tokens


@pytest.mark.parametrize(
    "endpoint,kwargs,param",
    [
        ("completions", {"echo": True}, "echo"),
        ("completions", {"best_of": 2}, "best_of"),
        ("completions", {"suffix": "end"}, "suffix"),
        ("chat", {"logit_bias": {"5": 2.0}}, "logit_bias"),
        ("chat", {"frequency_penalty": 0.5}, "frequency_penalty"),
        ("chat", {"extra_body": {"top_k": 5}}, "top_k"),
        ("chat", {"top_logprobs": 2}, "top_logprobs"),  # needs logprobs=true, as in vLLM
        ("chat", {"stream_options": {"include_usage": True}}, "Stream options"),
    ],
)  # fmt: skip
def test_unsupported_parameters_are_refused_by_name(client, endpoint, kwargs, param):
    with pytest.raises(openai.BadRequestError, match=param):
        if endpoint == "chat":
            client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2, **kwargs)
        else:
            client.completions.create(model="tiny", prompt="Hi", max_tokens=2, **kwargs)


def test_unknown_fields_are_ignored_and_unknown_models_are_404(client):
    out = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=2,
                                         extra_body={"no_such_field": 1})  # fmt: skip
    assert out.usage.completion_tokens >= 1
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="other", messages=MSG, max_tokens=2)


def test_server_equals_the_in_process_engine(client, engine, tokenizer):
    """Same fp32 weights, prompts and seed: the same token ids, and log-probs within 1e-5."""
    prompts = [chat_prompt_ids(tokenizer, "Hi"), chat_prompt_ids(tokenizer, "Name two rivers.")]
    out = client.completions.create(model="tiny", prompt=prompts, n=2, max_tokens=8, seed=5,
                                    temperature=0.8, top_p=0.9, logprobs=0,
                                    extra_body={"return_token_ids": True})  # fmt: skip
    local = engine.generate(prompts, n=2, temperature=0.8, top_p=0.9, max_new_tokens=8, seed=5)
    rows = [r for group in local for r in group]
    assert [c.model_extra["token_ids"] for c in out.choices] == [r.completion_ids for r in rows]
    for c, r in zip(out.choices, rows, strict=True):
        assert c.logprobs.token_logprobs == pytest.approx(r.logps, abs=1e-5)
        assert (c.text, c.finish_reason) == (r.text, r.finish_reason)
    assert out.system_fingerprint == "ckpt-1"


def test_concurrent_requests_share_a_batch(server, client, engine, monkeypatch):
    seen = []
    generate_rows = engine.generate_rows

    def recording(specs):
        seen.append(len(specs))
        return generate_rows(specs)

    monkeypatch.setattr(engine, "generate_rows", recording)
    batcher = server_app_state(server).batcher
    results = {}

    def ask(temperature, max_tokens):
        results[temperature] = client.chat.completions.create(
            model="tiny", messages=MSG, max_tokens=max_tokens, temperature=temperature, seed=0
        )

    with batcher.lock:  # the model is busy: both requests wait for it
        threads = [threading.Thread(target=ask, args=a) for a in ((0.0, 3), (1.0, 5))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 20
        while batcher.queued < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    for t in threads:
        t.join(timeout=60)
    assert seen == [2]
    # each row kept its own settings in the shared batch: the same answers as alone
    monkeypatch.undo()
    for temperature, max_tokens in ((0.0, 3), (1.0, 5)):
        alone = client.chat.completions.create(model="tiny", messages=MSG, max_tokens=max_tokens,
                                               temperature=temperature, seed=0)  # fmt: skip
        assert alone.choices[0].message.content == results[temperature].choices[0].message.content
        assert results[temperature].usage.completion_tokens <= max_tokens


def server_app_state(server):
    return server.server.config.app.state


@pytest.fixture
def own_server(tokenizer):
    """A server over its own model, which the test may change (adapters, weights)."""
    from tiny import make_tiny_model

    engine = TransformersEngine(make_tiny_model(tokenizer), tokenizer, policy_version="v0")
    running = start_server(create_app(engine, model_name="base"))
    yield running, engine
    running.stop()


def test_lora_adapters_load_generate_and_unload(own_server, tokenizer, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    running, engine = own_server
    base_model = copy.deepcopy(engine.model)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(base_model), cfg).save_pretrained(tmp_path / "lora")
    client = openai.OpenAI(base_url=running.base_url, api_key="-", max_retries=0)
    kw = dict(messages=MSG, max_tokens=5, temperature=0, logprobs=True)
    before = client.chat.completions.create(model="base", **kw)

    url = running.base_url
    r = httpx.post(
        url + "/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(tmp_path / "lora")}
    )
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'sql' added successfully."
    again = httpx.post(
        url + "/load_lora_adapter", json={"lora_name": "sql", "lora_path": str(tmp_path / "lora")}
    )
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    inplace = {"lora_name": "sql", "lora_path": str(tmp_path / "lora"), "load_inplace": True}
    assert httpx.post(url + "/load_lora_adapter", json=inplace).status_code == 200
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"base", "sql"} and models["sql"].model_extra["parent"] == "base"

    adapted = client.chat.completions.create(model="sql", **kw)
    peft = PeftModel.from_pretrained(base_model, tmp_path / "lora").eval()
    prompt = chat_prompt_ids(tokenizer, MSG)
    [[expected]] = TransformersEngine(peft, tokenizer).generate(
        [prompt], greedy=True, max_new_tokens=5
    )
    assert [c.logprob for c in adapted.choices[0].logprobs.content] == pytest.approx(
        expected.logps, abs=1e-5
    )
    assert adapted.choices[0].message.content == expected.text
    assert adapted.system_fingerprint == str(tmp_path / "lora")  # the policy that sampled
    base_again = client.chat.completions.create(model="base", **kw)
    assert base_again.choices[0].message.content == before.choices[0].message.content
    assert [c.logprob for c in adapted.choices[0].logprobs.content] != [
        c.logprob for c in before.choices[0].logprobs.content]  # fmt: skip

    assert httpx.post(url + "/unload_lora_adapter", json={"lora_name": "sql"}).status_code == 200
    assert [m.id for m in client.models.list().data] == ["base"]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="sql", **kw)
    after = client.chat.completions.create(model="base", **kw)
    assert [c.logprob for c in after.choices[0].logprobs.content] == [
        c.logprob for c in before.choices[0].logprobs.content]  # fmt: skip
    missing = httpx.post(url + "/unload_lora_adapter", json={"lora_name": "sql"})
    assert missing.status_code == 404


def test_load_weights_replaces_the_base_model(own_server, tokenizer, tmp_path):
    from tiny import make_tiny_model

    running, engine = own_server
    other = make_tiny_model(tokenizer, seed=1)
    other.save_pretrained(tmp_path / "step-2")
    tokenizer.save_pretrained(tmp_path / "step-2")
    client = openai.OpenAI(base_url=running.base_url, api_key="-", max_retries=0)
    kw = dict(model="base", messages=MSG, max_tokens=5, temperature=0, logprobs=True)
    before = client.chat.completions.create(**kw)
    r = httpx.post(running.base_url + "/load_weights",
                   json={"path": str(tmp_path / "step-2"), "policy_version": "step-2"}, timeout=60)  # fmt: skip
    assert r.status_code == 200 and r.json() == {"policy_version": "step-2"}
    after = client.chat.completions.create(**kw)
    assert after.system_fingerprint == "step-2" and before.system_fingerprint == "v0"
    [[expected]] = TransformersEngine(other.eval(), tokenizer).generate(
        [chat_prompt_ids(tokenizer, MSG)], greedy=True, max_new_tokens=5)  # fmt: skip
    assert [c.logprob for c in after.choices[0].logprobs.content] == pytest.approx(
        expected.logps, abs=1e-5
    )
    bad = httpx.post(running.base_url + "/load_weights", json={"path": str(tmp_path / "nope")})
    assert bad.status_code == 400 and "nope" in bad.json()["error"]["message"]


def test_settled_text_holds_back_split_characters_and_stop_prefixes(tokenizer):
    """A stream sends each token's text at once, except a character split over tokens (until it
    is whole) and the last characters that may start a stop string."""
    from alignforge.rollout.server import _settled

    flamingo = tokenizer(" 🦩", add_special_tokens=False)["input_ids"]
    assert len(flamingo) == 3
    partial = tokenizer.decode(flamingo[:2])
    assert partial.endswith("\ufffd") and _settled(partial, 0) == partial.rstrip("\ufffd")
    assert _settled(tokenizer.decode(flamingo), 0) == " 🦩"
    assert _settled("ab\ufffd", 0) == "ab"
    assert _settled("abcd", 2) == "ab"
    assert _settled("abcd", 0) == "abcd"
