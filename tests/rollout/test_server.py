import json
import threading
import time

import httpx
import pytest

from alignforge.rollout import EndpointError, OpenAIChatClient, TransformersEngine
from alignforge.rollout.server import create_app, start_server

MSG = [{"role": "user", "content": "Name a city."}]


@pytest.fixture(scope="module")
def server(tiny_model, tokenizer):
    engine = TransformersEngine(tiny_model, tokenizer, policy_version="ckpt-1")
    running = start_server(create_app(engine, model_name="tiny"))
    yield running
    running.stop()


def test_models_and_chat_completion(server):
    models = httpx.get(server.base_url + "/models").json()
    assert models["data"][0]["id"] == "tiny"
    client = OpenAIChatClient(server.base_url, model="tiny")
    results = client.chat(MSG, temperature=0.8, max_tokens=6, n=3, logprobs=True, seed=3)
    assert len(results) == 3
    for r in results:
        assert r.finish_reason in {"stop", "length"}
        assert len(r.logprobs) == len(r.tokens) > 0 and all(lp <= 0 for lp in r.logprobs)
    again = client.chat(MSG, temperature=0.8, max_tokens=6, n=3, seed=3)
    assert [r.text for r in again] == [r.text for r in results]


def test_json_schema_response_format_is_enforced(server):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 15},
                                               "population": {"type": "integer", "maximum": 10**9}},
              "required": ["city", "population"], "additionalProperties": False}  # fmt: skip
    rf = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema}}
    client = OpenAIChatClient(server.base_url, model="tiny")
    for r in client.chat(MSG, temperature=1.0, max_tokens=60, n=2, response_format=rf, seed=0):
        obj = json.loads(r.text)
        assert set(obj) == {"city", "population"} and isinstance(obj["population"], int)


def test_stream_matches_the_non_streamed_greedy_text(server):
    client = OpenAIChatClient(server.base_url, model="tiny")
    [full] = client.chat(MSG, temperature=0.0, max_tokens=10)
    deltas = list(client.stream_chat(MSG, temperature=0.0, max_tokens=10))
    assert len(deltas) >= 2
    assert "".join(deltas) == full.text


def test_completions_endpoint_and_bad_requests(server):
    reply = httpx.post(server.base_url + "/completions",
                       json={"prompt": ["Once upon", "The"], "max_tokens": 4, "n": 2, "logprobs": 1},
                       timeout=30).json()  # fmt: skip
    assert len(reply["choices"]) == 4
    assert len(reply["choices"][0]["logprobs"]["token_logprobs"]) == len(
        reply["choices"][0]["logprobs"]["tokens"]
    )
    bad = httpx.post(server.base_url + "/chat/completions", json={"messages": [], "max_tokens": 2})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    client = OpenAIChatClient(server.base_url, model="tiny", max_retries=3, backoff=0.01)
    with pytest.raises(EndpointError, match=r"/chat/completions: HTTP 400 after 1 attempt"):
        client.chat(MSG, response_format={"type": "json_schema", "json_schema": {}}, max_tokens=2)


@pytest.fixture(scope="module")
def flaky():
    """A real HTTP server that fails in scripted ways before answering."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()
    calls: dict[str, int] = {}
    lock = threading.Lock()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        key = body["messages"][0]["content"]
        with lock:
            calls[key] = calls.get(key, 0) + 1
            count = calls[key]
        if key.startswith("fail500") and count <= 2:
            return JSONResponse({"error": "boom"}, status_code=500)
        if key.startswith("rate") and count == 1:
            return JSONResponse(
                {"error": "slow down"}, status_code=429, headers={"Retry-After": "0.05"}
            )
        if key.startswith("always503"):
            return JSONResponse({"error": "down"}, status_code=503)
        if key.startswith("slow"):
            import asyncio

            await asyncio.sleep(2.0)
        return {"choices": [{"message": {"content": f"ok:{key}"}, "finish_reason": "stop"}]}

    running = start_server(app)
    yield running, calls
    running.stop()


def test_retries_and_isolated_failures(flaky):
    running, calls = flaky
    client = OpenAIChatClient(running.base_url, model="x", max_retries=3, backoff=0.01, timeout=0.5,
                              max_concurrency=4)  # fmt: skip
    names = ["fail500-a", "rate-b", "plain-c", "always503-d", "slow-e", "plain-f"]
    started = time.perf_counter()
    out = client.chat_many([[{"role": "user", "content": n}] for n in names], max_tokens=4,
                           return_exceptions=True)  # fmt: skip
    assert out[0][0].text == "ok:fail500-a" and calls["fail500-a"] == 3
    assert out[1][0].text == "ok:rate-b" and calls["rate-b"] == 2
    assert out[2][0].text == "ok:plain-c" and out[5][0].text == "ok:plain-f"
    assert isinstance(out[3], EndpointError) and out[3].status == 503 and calls["always503-d"] == 4
    assert running.base_url in str(out[3])
    assert (
        isinstance(out[4], EndpointError) and out[4].status is None and "timed out" in str(out[4])
    )
    assert time.perf_counter() - started < 10


def test_connection_refused_names_the_url():
    from alignforge.rollout.server import free_port

    url = f"http://127.0.0.1:{free_port()}/v1"
    client = OpenAIChatClient(url, model="x", max_retries=1, backoff=0.01)
    with pytest.raises(EndpointError, match="connection failed") as info:
        client.chat(MSG)
    assert url in str(info.value)


def test_local_chat_client_has_the_same_surface(tiny_model, tokenizer):
    from alignforge.rollout import TransformersChatClient

    client = TransformersChatClient(tiny_model, tokenizer, model_name="tiny")
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 10}},
              "required": ["answer"], "additionalProperties": False}  # fmt: skip
    rf = {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}
    out = client.chat_many([MSG, MSG + [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"}]],
                           temperature=1.0, max_tokens=40, response_format=rf, n=2, logprobs=True, seed=0)  # fmt: skip
    assert [len(group) for group in out] == [2, 2]
    for group in out:
        for r in group:
            assert set(json.loads(r.text)) == {"answer"} and len(r.logprobs) > 0
    [greedy] = client.chat(MSG, temperature=0.0, max_tokens=5)
    assert greedy.finish_reason in {"stop", "length"}
