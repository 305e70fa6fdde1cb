"""``ServerEngine`` against ``alignforge serve`` running in subprocesses over a tiny random model:
the in-process engine's rollouts, prompts spread over two servers, EOS handling, a dead server."""

import copy

import pytest
import torch
from serve_process import ServeProcess

from alignforge.errors import UserError
from alignforge.rollout import EndpointError, TransformersEngine, chat_prompt_ids
from alignforge.rollout.base import build_rollout_engine
from alignforge.rollout.server import create_app, free_port, start_server
from alignforge.rollout.server_engine import ServerEngine
from alignforge.rollout.weight_sync import WeightSync

QUESTIONS = ["Name a city.", "Add 2 and 3.", "Say hi.", "Name a colour.", "Why?", "Count to 3."]
SAMPLING = dict(n=3, temperature=2.0, top_p=0.95, max_new_tokens=12)


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    return TransformersEngine(model, tok, batch_size=16)


@pytest.fixture(scope="module")
def servers(tiny_model_dir, tmp_path_factory):
    logs = tmp_path_factory.mktemp("serve")
    running = [ServeProcess(tiny_model_dir, logs / f"{i}.log").start() for i in range(2)]
    yield running
    for s in running:
        s.stop()


@pytest.fixture(scope="module")
def prompts(local):
    return [chat_prompt_ids(local.tokenizer, q) for q in QUESTIONS]


@pytest.fixture(scope="module")
def seeds(local, prompts):
    """Seeds under which some samples end at EOS within 12 tokens (found with the local engine;
    a random model's EOS is one token in 384), so the EOS path is compared too."""
    for first in range(0, 400, 7):
        seeds = list(range(first, first + len(prompts)))
        groups = local.generate(prompts, seed=seeds, **SAMPLING)
        if any(r.finish_reason == "stop" for g in groups for r in g):
            return seeds
    raise AssertionError("no seed gives an EOS")


def assert_same(a, b):
    """Same tokens, text, finish reason; log-probs within 1e-5 (fp32, other batch shapes)."""
    assert a.prompt_ids == b.prompt_ids
    assert a.completion_ids == b.completion_ids
    assert a.text == b.text and a.finish_reason == b.finish_reason
    assert a.logps == pytest.approx(b.logps, abs=1e-5)


def test_server_rollouts_equal_the_in_process_engines(local, servers, prompts, seeds):
    """Same fp32 weights, prompts and per-prompt seeds: the same tokens (EOS included, with its
    log-prob) and log-probs as TransformersEngine, within 1e-5."""
    engine = ServerEngine(servers[0].base_url, "tiny", local.eos_ids, policy_version="7")
    remote = engine.generate(prompts, seed=seeds, **SAMPLING)
    mine = local.generate(prompts, seed=seeds, **SAMPLING)
    stops = 0
    for got, want in zip(remote, mine, strict=True):
        for a, b in zip(got, want, strict=True):
            assert_same(a, b)
            assert a.policy_version == "7" and a.temperature == 2.0 and a.top_p == 0.95
            if a.finish_reason == "stop":
                assert a.completion_ids[-1] in local.eos_ids
                stops += 1
    assert stops > 0
    # an int seed means what it means in process: prompt p gets seed + 1_000_003 * p
    [[a], [b]] = engine.generate(prompts[:2], n=1, max_new_tokens=6, seed=5)
    [[c], [d]] = local.generate(prompts[:2], n=1, max_new_tokens=6, seed=5)
    assert_same(a, c)
    assert_same(b, d)


def test_prompts_are_spread_over_two_servers(local, servers, prompts, seeds):
    """Work stealing over both servers; a prompt's rollouts do not depend on which one drew it."""
    urls = [s.base_url for s in servers]
    engine = ServerEngine(urls, "tiny", local.eos_ids, max_concurrency=2)
    many = prompts * 2
    groups = engine.generate(many, seed=seeds * 2, **SAMPLING)
    used = [g[0].extra["server"] for g in groups]
    assert set(used) == set(urls), used
    alone = ServerEngine(urls[1], "tiny", local.eos_ids).generate(many, seed=seeds * 2, **SAMPLING)
    for got, want in zip(groups, alone, strict=True):
        for a, b in zip(got, want, strict=True):
            assert_same(a, b)


def test_build_rollout_engine_finds_the_served_model(local, servers):
    engine = build_rollout_engine(
        "server", base_urls=servers[0].base_url, tokenizer=local.tokenizer
    )
    assert isinstance(engine, ServerEngine) and engine.model == "tiny"
    engine.check()
    with pytest.raises(UserError, match=r"/v1/models serves tiny, not 'other'"):
        engine.at("other", "0").check()


def test_a_dead_server_fails_with_its_url_after_the_retries(local, prompts):
    url = f"http://127.0.0.1:{free_port()}/v1"
    engine = ServerEngine(url, "tiny", local.eos_ids, max_retries=2, backoff=0.01)
    with pytest.raises(EndpointError, match=rf"{url}/completions: no response after 3 attempt"):
        engine.generate(prompts[:2], max_new_tokens=4, seed=0)


def reply(tokens, finish, stop_reason=None):
    return {"choices": [{"index": 0, "text": "x", "finish_reason": finish, "stop_reason": stop_reason,
                         "logprobs": {"tokens": [f"token_id:{t}" for t in tokens],
                                      "token_logprobs": [-0.5] * len(tokens)}}]}  # fmt: skip


def test_eos_rules():
    """A completion ending in an EOS id stopped there (also when the server says `length`, EOS
    landing on max_tokens); an EOS stop without the EOS token is refused; a stop string is not."""
    engine = ServerEngine("http://127.0.0.1:9/v1", "m", [2])
    client, body = engine.clients[0], {"n": 1, "prompt": [5], "temperature": 1.0, "top_p": 1.0}
    [r] = engine._rollouts(body, client, reply([7, 2], "length"))
    assert r.completion_ids == [7, 2] and r.logps == [-0.5, -0.5] and r.finish_reason == "stop"
    [r] = engine._rollouts(body, client, reply([7, 8], "length"))
    assert r.finish_reason == "length"
    [r] = engine._rollouts(body, client, reply([7, 8], "stop", stop_reason="###"))
    assert r.finish_reason == "stop"
    with pytest.raises(EndpointError, match="stopped at EOS but the EOS token is not among"):
        engine._rollouts(body, client, reply([7, 8], "stop"))
    bad = reply([7], "length")
    bad["choices"][0]["logprobs"]["tokens"] = ["hello"]
    with pytest.raises(EndpointError, match="ignored return_tokens_as_token_ids"):
        engine._rollouts(body, client, bad)


def test_weight_sync_loads_the_adapter_then_full_weights(local, prompts, tmp_path):
    """An adapter published as policy-step-1 is what the server samples with (its log-probs are
    the peft model's); the oldest of `keep` versions is unloaded; full weights replace the base."""
    from peft import LoraConfig, get_peft_model

    served = TransformersEngine(copy.deepcopy(local.model), local.tokenizer)
    running = start_server(create_app(served, model_name="tiny"))
    try:
        peft = get_peft_model(
            copy.deepcopy(local.model), LoraConfig(r=4, target_modules=["lm_head", "q_proj"])
        )
        with torch.no_grad():
            for name, p in peft.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.5)
        sync = WeightSync(running.base_url, tmp_path / "sync", keep=2)
        sync.check()
        assert sync.publish(peft, 1) == "policy-step-1"
        engine = ServerEngine(running.base_url, "tiny", local.eos_ids).at("policy-step-1", "1")
        kw = dict(n=1, max_new_tokens=6, seed=[3, 4])
        got = engine.generate(prompts[:2], **kw)
        want = TransformersEngine(peft, local.tokenizer).generate(prompts[:2], **kw)
        for g, w in zip(got, want, strict=True):
            assert_same(g[0], w[0])
            assert g[0].policy_version == "1"
        base = local.generate(prompts[:2], **kw)
        moved = [abs(x - y) for g, b in zip(got, base, strict=True)
                 for x, y in zip(g[0].logps, b[0].logps, strict=False)]  # fmt: skip
        assert max(moved) > 1e-2  # the adapter changes what the server samples
        sync.publish(peft, 2)
        sync.publish(peft, 3)  # keep=2: version 1 is unloaded, its folder reused
        assert sorted(served_adapters(running.base_url)) == ["policy-step-2", "policy-step-3"]
        assert sorted(p.name for p in (tmp_path / "sync").iterdir()) == ["slot-0", "slot-1"]

        full = WeightSync(
            running.base_url, tmp_path / "full", adapter=None, tokenizer=local.tokenizer
        )
        full.check()
        assert full.publish(peft.merge_and_unload(), 4) is None
        after = ServerEngine(running.base_url, "tiny", local.eos_ids).generate(prompts[:2], **kw)
        for g, w in zip(after, want, strict=True):
            assert_same(g[0], w[0])
    finally:
        running.stop()


def served_adapters(base_url):
    import httpx

    return [c["id"] for c in httpx.get(f"{base_url}/models").json()["data"] if c.get("parent")]


def test_a_server_without_the_loading_route_is_refused_at_start():
    from fastapi import FastAPI

    running = start_server(FastAPI())
    try:
        with pytest.raises(UserError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
            WeightSync(running.base_url, "unused").check()
        with pytest.raises(UserError, match="cannot reload full weights"):
            WeightSync(running.base_url, "unused", adapter=None).check()
    finally:
        running.stop()
