"""An OpenAI-compatible HTTP server over a transformers model.

    alignforge serve runs/sft-merged --port 8000
    curl http://127.0.0.1:8000/v1/chat/completions -d '{"messages": [{"role": "user",
         "content": "Hi"}], "max_tokens": 32}'

From Python (tests, notebooks) the same server runs in a background thread:

    from alignforge.rollout.server import create_app, start_server
    server = start_server(create_app(engine, model_name="smol"))   # 127.0.0.1, free port
    print(server.base_url)   # http://127.0.0.1:PORT/v1
    server.stop()

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (temperature, top_p, max_tokens,
n, seed, ``response_format`` json_schema → constrained decoding, logprobs, ``stream`` via
server-sent events) and ``POST /v1/completions``. Requests are served one at a time (the model
is shared); each request's prompts and its ``n`` choices are batched together.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


def _load_model(path: str, dtype: str = "float32"):
    """Load ``(model, tokenizer)``: ``default``, an HF dir, an adapter dir or a .gguf file; on
    the GPU when there is one."""
    import torch

    from alignforge.models import load_model, load_tokenizer

    model = load_model(path, dtype=dtype).eval()
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), load_tokenizer(path)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    messages: list[dict[str, Any]] = Field(min_length=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int = Field(1, ge=1, le=64)
    seed: int | None = None
    response_format: dict[str, Any] | None = None
    logprobs: bool = False
    stream: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str | None = None
    prompt: str | list[str]
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int = Field(16, ge=1)
    n: int = Field(1, ge=1, le=64)
    seed: int | None = None
    logprobs: int | None = None


def create_app(engine, model_name: str = "alignforge", max_tokens_default: int = 256):
    """FastAPI app serving ``engine`` (a :class:`TransformersEngine`)."""
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import StreamingResponse

    from alignforge.rollout.constrained import schema_from_response_format
    from alignforge.rollout.transformers_engine import chat_prompt_ids

    app = FastAPI(title="alignforge OpenAI-compatible server")
    lock = threading.Lock()
    tok = engine.tokenizer

    def run(prompts, req, max_tokens, schema=None, streamer=None):
        with lock:
            return engine.generate(
                prompts, n=req.n, temperature=req.temperature, top_p=req.top_p,
                max_new_tokens=max_tokens, greedy=req.temperature == 0, seed=req.seed,
                json_schema=schema, streamer=streamer,
            )  # fmt: skip

    @app.get("/v1/models")
    def models():
        return {
            "object": "list",
            "data": [{"id": model_name, "object": "model", "owned_by": "alignforge"}],
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens or max_tokens_default
        try:
            schema = schema_from_response_format(req.response_format)
            prompt = chat_prompt_ids(tok, req.messages)
        except (ValueError, KeyError, TypeError) as e:
            raise HTTPException(400, f"bad request: {e}") from None
        if req.stream:
            if req.n != 1 or schema is not None:
                raise HTTPException(400, "stream=true supports n=1 without response_format")
            return StreamingResponse(_sse_chat(run, prompt, req, max_tokens, tok, model_name),
                                     media_type="text/event-stream")  # fmt: skip
        created = int(time.time())
        [group] = await asyncio.to_thread(run, [prompt], req, max_tokens, schema)
        choices = [_chat_choice(i, r, tok, req.logprobs) for i, r in enumerate(group)]
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex[:24]}", "object": "chat.completion",
            "created": created, "model": model_name, "choices": choices,
            "usage": _usage(prompt, group),
            "system_fingerprint": engine.policy_version,
        }  # fmt: skip

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        texts = [req.prompt] if isinstance(req.prompt, str) else list(req.prompt)
        prompts = [list(tok(t)["input_ids"]) for t in texts]
        if any(not p for p in prompts):
            raise HTTPException(400, "bad request: empty prompt")
        groups = await asyncio.to_thread(run, prompts, req, req.max_tokens)
        choices = []
        for group in groups:
            for r in group:
                lp = None
                if req.logprobs is not None:
                    toks = [tok.decode([t]) for t in r.completion_ids]
                    lp = {"tokens": toks, "token_logprobs": r.logps, "top_logprobs": None}
                choices.append({"index": len(choices), "text": r.text,
                                "finish_reason": r.finish_reason, "logprobs": lp})  # fmt: skip
        return {
            "id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion",
            "created": int(time.time()), "model": model_name, "choices": choices,
            "usage": _usage([t for p in prompts for t in p], [r for g in groups for r in g]),
        }  # fmt: skip

    return app


def _chat_choice(index, rollout, tok, logprobs: bool) -> dict:
    lp = None
    if logprobs:
        content = []
        for t, logp in zip(rollout.completion_ids, rollout.logps, strict=True):
            piece = tok.decode([t])
            content.append({"token": piece, "logprob": logp,
                            "bytes": list(piece.encode()), "top_logprobs": []})  # fmt: skip
        lp = {"content": content}
    return {
        "index": index,
        "message": {"role": "assistant", "content": rollout.text},
        "finish_reason": rollout.finish_reason,
        "logprobs": lp,
    }


def _usage(prompt_ids, rollouts) -> dict:
    completion = sum(len(r.completion_ids) for r in rollouts)
    return {"prompt_tokens": len(prompt_ids), "completion_tokens": completion,
            "total_tokens": len(prompt_ids) + completion}  # fmt: skip


async def _sse_chat(run, prompt, req, max_tokens, tok, model_name):
    streamer = _token_streamer(tok)
    box: dict = {}

    def work():
        try:
            box["groups"] = run([prompt], req, max_tokens, None, streamer)
        except Exception as e:  # reported in the final event
            box["error"] = e
            streamer.end()

    thread = threading.Thread(target=work, daemon=True)
    thread.start()
    cid = f"chatcmpl-{uuid.uuid4().hex[:24]}"

    def event(delta: dict, finish=None) -> str:
        chunk = {"id": cid, "object": "chat.completion.chunk", "created": int(time.time()),
                 "model": model_name,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}  # fmt: skip
        return f"data: {json.dumps(chunk)}\n\n"

    yield event({"role": "assistant", "content": ""})
    iterator = iter(streamer)
    while True:
        piece = await asyncio.to_thread(next, iterator, None)
        if piece is None:
            break
        if piece:
            yield event({"content": piece})
    await asyncio.to_thread(thread.join)
    if "error" in box:
        yield f"data: {json.dumps({'error': {'message': str(box['error'])}})}\n\n"
    else:
        yield event({}, box["groups"][0][0].finish_reason)
    yield "data: [DONE]\n\n"


def _token_streamer(tok):
    """A ``TextIteratorStreamer`` that sends each token's text as soon as it is decoded.

    The stock one holds text back until a space or newline, so a client's first chunk (its time
    to first token) waited for the first whole word: ``{"entities":`` is four tokens.
    """
    from transformers import TextIteratorStreamer

    class TokenStreamer(TextIteratorStreamer):
        def put(self, value):
            if self.skip_prompt and self.next_tokens_are_prompt:
                self.next_tokens_are_prompt = False
                return
            self.token_cache.extend(value.reshape(-1).tolist())
            text = self.tokenizer.decode(self.token_cache, **self.decode_kwargs)
            if text.endswith("\ufffd"):  # a character split over tokens: wait for the rest
                return
            self.on_finalized_text(text[self.print_len :])
            self.print_len = len(text)

    return TokenStreamer(tok, skip_prompt=True, skip_special_tokens=True, timeout=600)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    server: Any
    thread: threading.Thread
    host: str
    port: int

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


def start_server(
    app, host: str = "127.0.0.1", port: int | None = None, timeout: float = 30.0
) -> RunningServer:
    """Run ``app`` with uvicorn in a daemon thread; returns once it accepts connections."""
    import uvicorn

    port = port or free_port(host)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="off")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"server on {host}:{port} did not start")
        time.sleep(0.02)
    return RunningServer(server, thread, host, port)


def serve(model_path: str, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None,
          policy_version: str | None = None, batch_size: int = 8,
          dtype: str = "float32") -> None:  # fmt: skip
    import uvicorn

    from alignforge.rollout.transformers_engine import TransformersEngine

    model, tokenizer = _load_model(model_path, dtype)
    engine = TransformersEngine(model, tokenizer, policy_version or model_path, batch_size)
    app = create_app(engine, model_name or model_path)
    uvicorn.run(app, host=host, port=port, log_level="info")
