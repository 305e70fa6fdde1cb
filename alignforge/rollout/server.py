"""``alignforge serve``: vLLM's OpenAI-compatible HTTP API over a transformers model.

    alignforge serve runs/sft-merged --port 8000 --model-name policy
    curl http://127.0.0.1:8000/v1/chat/completions -d '{"model": "policy", "messages":
         [{"role": "user", "content": "Hi"}], "max_tokens": 32, "logprobs": true}'

From Python (tests, notebooks) the same server runs in a background thread:

    from alignforge.rollout.server import create_app, start_server
    server = start_server(create_app(engine, model_name="smol"))   # 127.0.0.1, free port
    client = openai.OpenAI(base_url=server.base_url, api_key="-")
    server.stop()

Routes, with vLLM's request and response shapes (see :mod:`alignforge.rollout.protocol` for the
parameters and what is refused):

* ``GET /v1/models``: the served model and the LoRA adapters loaded at runtime.
* ``POST /v1/chat/completions``: ``n``, ``seed``, ``stop``, ``logprobs`` + ``top_logprobs``,
  ``response_format`` (``json_object``, ``json_schema``: constrained decoding), ``stream`` with
  ``stream_options.include_usage``, ``return_tokens_as_token_ids``, ``return_token_ids``.
* ``POST /v1/completions``: ``prompt`` as a string, strings, token ids or lists of token ids;
  ``logprobs: k``, ``stop``, ``stream``, the same extras.
* ``POST /v1/load_lora_adapter`` ``{"lora_name", "lora_path", "load_inplace"}`` and
  ``POST /v1/unload_lora_adapter`` ``{"lora_name"}`` (vLLM's); ``"model": lora_name`` then
  generates with that adapter.
* ``POST /v1/load_weights`` ``{"path", "policy_version"}`` (alignforge's own; vLLM's OpenAI
  server has no such route): replace the base weights by a saved model's, between batches.

Log-probs are those of the distribution each token was sampled from (after the JSON mask,
temperature and top-p: vLLM's ``--logprobs-mode processed_logprobs``), which is what off-policy
correction needs. Concurrent requests are batched (:class:`~alignforge.rollout.batcher.Batcher`).
``system_fingerprint`` is the policy version that generated the answer.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from alignforge.rollout.protocol import (
    ApiError,
    ChatRequest,
    CompletionLogprobs,
    CompletionRequest,
    chat_logprob_entry,
    check_supported,
    usage,
)

log = logging.getLogger(__name__)


def _load_model(path: str, dtype: str = "float32", device=None, quantization: str | None = None):
    """Load ``(model, tokenizer)``: ``default``, an HF dir, an adapter dir (merged into its base,
    so runtime adapters apply to plain weights) or a .gguf file; on ``device``, else the GPU when
    there is one. ``quantization="int8"``: every linear layer in torch's dynamic int8 kernel, on
    the CPU (the kernel has no GPU version)."""
    import torch

    from alignforge.models import load_model, load_tokenizer
    from alignforge.rollout.batch import quantize_int8

    model = load_model(path, dtype=dtype).eval()
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload().eval()
    if quantization == "int8":
        return quantize_int8(model.cpu()), load_tokenizer(path)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return model.to(device), load_tokenizer(path)


class LoadLoraRequest(BaseModel):
    lora_name: str
    lora_path: str
    load_inplace: bool = False


class UnloadLoraRequest(BaseModel):
    lora_name: str
    lora_int_id: int | None = None


class LoadWeightsRequest(BaseModel):
    path: str
    policy_version: str | None = None


def create_app(engine, model_name: str = "alignforge", max_tokens_default: int = 256,
               model_path: str | None = None):  # fmt: skip
    """FastAPI app serving ``engine`` (a :class:`TransformersEngine`) as ``model_name``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse

    from alignforge.rollout.batcher import Adapters, Batcher
    from alignforge.rollout.transformers_engine import chat_prompt_ids

    app = FastAPI(title="alignforge OpenAI-compatible server")
    adapters = Adapters(engine)
    batcher = Batcher(engine, adapters)
    app.state.batcher, app.state.adapters = batcher, adapters
    gen = _Generation(engine, batcher, adapters, model_name)
    tok = engine.tokenizer

    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):  # 400 as vLLM, not FastAPI's 422
        return JSONResponse(_validation_error(e.errors()).body(), status_code=400)

    @app.get("/v1/models")
    def models():
        created = int(time.time())
        limit = getattr(engine.model.config, "max_position_embeddings", None)
        cards = [{"id": model_name, "object": "model", "created": created,
                  "owned_by": "alignforge", "root": model_path or model_name, "parent": None,
                  "max_model_len": limit}]  # fmt: skip
        cards += [{"id": name, "object": "model", "created": created, "owned_by": "alignforge",
                   "root": path, "parent": model_name, "max_model_len": limit}
                  for name, path in adapters.paths.items()]  # fmt: skip
        return {"object": "list", "data": cards}

    async def answer(view, specs, adapter):
        if view.req.stream:
            return StreamingResponse(_sse(view, batcher, specs, adapter),
                                     media_type="text/event-stream")  # fmt: skip
        return view.response(await gen.run(specs, adapter))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        max_tokens = req.max_completion_tokens or req.max_tokens or max_tokens_default
        try:
            prompt = chat_prompt_ids(tok, req.messages)
        except (ValueError, KeyError, TypeError) as e:
            raise ApiError(400, f"messages: {e}", "messages") from None
        top_k = req.top_logprobs or 0
        specs, adapter = await gen.prepare(req, [prompt], max_tokens, top_k)
        return await answer(_View(tok, "chat", req, model_name, top_k, [prompt]), specs, adapter)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        prompt = req.prompt
        if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        prompts = [list(tok(p, add_special_tokens=req.add_special_tokens)["input_ids"])
                   if isinstance(p, str) else list(p) for p in prompt]  # fmt: skip
        if not prompts:
            raise ApiError(400, "prompt: empty prompt", "prompt")
        top_k = req.logprobs or 0
        specs, adapter = await gen.prepare(req, prompts, req.max_tokens or 16, top_k)
        return await answer(
            _View(tok, "completion", req, model_name, top_k, prompts), specs, adapter
        )

    _add_weight_routes(app, engine, batcher, adapters, model_name)
    return app


def _validation_error(errors: list[dict]) -> ApiError:
    """pydantic's errors as one message naming the fields."""
    if errors and errors[0]["type"] == "json_invalid":
        return ApiError(400, f"body: not valid JSON ({errors[0].get('ctx', {}).get('error')})")
    param = next((str(x) for err in errors for x in err["loc"][1:2]), None)
    lines = [f"{'.'.join(str(x) for x in err['loc'][1:]) or 'body'}: "
             f"{str(err['msg']).removeprefix('Value error, ')}" for err in errors[:3]]  # fmt: skip
    return ApiError(400, "; ".join(lines), param)


class _Generation:
    """What the chat and completions routes share: checking a request, its rows, running them."""

    def __init__(self, engine, batcher, adapters, model_name: str):
        self.engine, self.batcher, self.adapters = engine, batcher, adapters
        self.model_name = model_name

    def adapter_for(self, model: str | None) -> str | None:
        if not model or model == self.model_name:
            return None
        if model in self.adapters.paths:
            return model
        raise ApiError(404, f"The model `{model}` does not exist.", "model")

    def constraint_schema(self, response_format) -> dict | None:
        """The schema to decode under; compiled here so a bad one is this request's 400."""
        from alignforge.rollout.constrained import json_constraint, schema_from_response_format

        try:
            schema = schema_from_response_format(response_format)
            if schema is not None:
                json_constraint(self.engine.tokenizer, schema, self.engine.eos_ids)
        except ValueError as e:
            raise ApiError(400, f"response_format: {e}", "response_format") from None
        return schema

    def check_lengths(self, prompts, max_tokens: int) -> None:
        model = self.engine.model
        vocab = model.get_input_embeddings().weight.shape[0]
        limit = getattr(model.config, "max_position_embeddings", None)
        for p in prompts:
            if not p:
                raise ApiError(400, "prompt: empty prompt", "prompt")
            if bad := [t for t in p if not 0 <= t < vocab]:
                raise ApiError(400, f"prompt: token id {bad[0]} is outside the vocabulary "
                               f"(0..{vocab - 1})", "prompt")  # fmt: skip
            if limit and len(p) + max_tokens > limit:
                raise ApiError(400, f"This model's maximum context length is {limit} tokens. "
                               f"However, you requested {len(p) + max_tokens} tokens "
                               f"({len(p)} in the messages, {max_tokens} in the completion).")  # fmt: skip

    async def prepare(self, req, prompts, max_tokens: int, top_k: int):
        """Check ``req``, then one :class:`RowSpec` per prompt and choice (prompt-major)."""
        from alignforge.rollout.transformers_engine import RowSpec, row_seeds

        check_supported(req)
        adapter = self.adapter_for(req.model)
        self.check_lengths(prompts, max_tokens)
        schema = await asyncio.to_thread(self.constraint_schema, req.response_format)
        sampling = req.sampling()
        seeds = row_seeds(req.seed, len(prompts), req.n)
        specs = [RowSpec(prompt, max_new_tokens=max_tokens, seed=seeds[p][j], json_schema=schema,
                         top_logprobs=top_k, **sampling)
                 for p, prompt in enumerate(prompts) for j in range(req.n)]  # fmt: skip
        return specs, adapter

    async def run(self, specs, adapter):
        futures = [self.batcher.submit(s, adapter) for s in specs]
        try:
            return await asyncio.gather(*(asyncio.wrap_future(f) for f in futures))
        except ApiError:
            raise
        except Exception as e:
            log.exception("generation failed")
            raise ApiError(500, f"generation failed: {e}") from None


def _add_weight_routes(app, engine, batcher, adapters, model_name: str) -> None:
    """vLLM's LoRA routes and alignforge's ``/v1/load_weights``; each waits for the batch in
    flight and holds the next."""
    from fastapi.responses import PlainTextResponse

    async def locked(fn, *args):
        def work():
            with batcher.lock:
                fn(*args)

        await asyncio.to_thread(work)

    @app.post("/v1/load_lora_adapter")
    async def load_lora(req: LoadLoraRequest):
        if req.lora_name == model_name:
            raise ApiError(400, f"lora_name: '{req.lora_name}' is the served model's name")
        await locked(adapters.load, req.lora_name, req.lora_path, req.load_inplace)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(req: UnloadLoraRequest):
        await locked(adapters.unload, req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")

    @app.post("/v1/load_weights")
    async def load_weights(req: LoadWeightsRequest):
        await locked(adapters.reload_base, req.path, req.policy_version)
        return {"policy_version": engine.policy_version}


class _View:
    """Turns rollouts (or, streaming, token events) into one endpoint's response shapes."""

    def __init__(self, tok, kind: str, req, model_name: str, top_k: int, prompts):
        self.tok, self.kind, self.req, self.top_k = tok, kind, req, top_k
        self.prompts, self.model = prompts, model_name
        self.as_ids = bool(req.return_tokens_as_token_ids)
        self.logprobs = bool(req.logprobs) if kind == "chat" else req.logprobs is not None
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.object = "chat.completion" if kind == "chat" else "text_completion"

    def prompt_of(self, index: int) -> list[int]:
        return self.prompts[index // self.req.n]

    def logprobs_of(self, token_ids, logps, tops, builder=None):
        if not self.logprobs:
            return None
        tops = tops or [None] * len(token_ids)
        if self.kind == "chat":
            return {"content": [chat_logprob_entry(self.tok, t, lp, top, self.top_k, self.as_ids)
                                for t, lp, top in zip(token_ids, logps, tops, strict=True)]}  # fmt: skip
        builder = builder or CompletionLogprobs(self.tok, self.top_k, self.as_ids)
        return builder.add(token_ids, logps, tops)

    def response(self, rollouts) -> dict:
        choices = []
        for i, r in enumerate(rollouts):
            lp = self.logprobs_of(r.completion_ids, r.logps, r.extra.get("top_logprobs"))
            choice: dict[str, Any] = {"index": i, "logprobs": lp, "finish_reason": r.finish_reason,
                                      "stop_reason": r.extra.get("stop_reason")}  # fmt: skip
            if self.kind == "chat":
                choice["message"] = {"role": "assistant", "content": r.text}
            else:
                choice["text"] = r.text
            if self.req.return_token_ids:
                choice["token_ids"] = r.completion_ids
                if self.kind == "completion":
                    choice["prompt_token_ids"] = self.prompt_of(i)
            choices.append(choice)
        out = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
               "choices": choices, "system_fingerprint": rollouts[0].policy_version,
               "usage": usage(sum(map(len, self.prompts)),
                              sum(len(r.completion_ids) for r in rollouts))}  # fmt: skip
        if self.req.return_token_ids and self.kind == "chat":
            out["prompt_token_ids"] = self.prompts[0]
        return out

    def chunk(self, choices: list[dict], **extra) -> str:
        body = {"id": self.id, "object": self.object + (".chunk" if self.kind == "chat" else ""),
                "created": self.created, "model": self.model, "choices": choices, **extra}  # fmt: skip
        return f"data: {json.dumps(body)}\n\n"

    def delta(self, index: int, text: str, role: bool = False) -> dict:
        if self.kind == "completion":
            return {"index": index, "text": text}
        delta = {"role": "assistant", "content": text} if role else {"content": text}
        return {"index": index, "delta": delta}


async def _sse(view: _View, batcher, specs, adapter):
    """Server-sent events: one chunk per token and choice (text held back while it may be the
    start of a stop string or of a split character), each choice's last chunk with its
    ``finish_reason``, then ``usage`` if asked, then ``[DONE]``."""
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    for i, spec in enumerate(specs):
        spec.on_token = lambda ev, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, ev))
    futures = [batcher.submit(s, adapter) for s in specs]
    for i, f in enumerate(futures):
        f.add_done_callback(lambda f, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, f)))
    hold = max((len(s) for s in specs[0].stop), default=1) - 1
    sent, counts = [0] * len(specs), [0] * len(specs)
    builders = [CompletionLogprobs(view.tok, view.top_k, view.as_ids) for _ in specs]
    if view.kind == "chat":
        for i in range(len(specs)):
            yield view.chunk([{**view.delta(i, "", role=True), "logprobs": None,
                               "finish_reason": None}])  # fmt: skip
    done = 0
    while done < len(specs):
        i, ev = await events.get()
        if isinstance(ev, Future):  # the row's end: its last token's event came before it
            done += 1
            if ev.exception() is not None:
                yield f"data: {json.dumps(ApiError(500, str(ev.exception())).body())}\n\n"
                break
            continue
        counts[i] += 1
        text = ev.text if ev.finish_reason else _settled(ev.text, hold)
        piece, sent[i] = text[sent[i] :], max(sent[i], len(text))
        lp = view.logprobs_of([ev.token_id], [ev.logp], [ev.top], builders[i])
        if not (piece or lp or ev.finish_reason):
            continue
        choice = {**view.delta(i, piece), "logprobs": lp, "finish_reason": ev.finish_reason}
        if ev.finish_reason:
            choice["stop_reason"] = ev.stop_reason
        if view.req.return_token_ids:
            choice["token_ids"] = [ev.token_id]
        yield view.chunk([choice])
    else:
        if view.req.include_usage():
            yield view.chunk([], usage=usage(sum(map(len, view.prompts)), sum(counts)))
    yield "data: [DONE]\n\n"


def _settled(text: str, hold: int) -> str:
    """The part of a growing text that later tokens cannot change: without a trailing split
    character, and without the last ``hold`` characters (a stop string may be starting)."""
    text = text.rstrip("\ufffd")
    return text[: len(text) - hold] if hold else text


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
          policy_version: str | None = None, batch_size: int = 8, dtype: str = "float32",
          quantization: str | None = None) -> None:  # fmt: skip
    import uvicorn

    from alignforge.rollout.transformers_engine import TransformersEngine

    model, tokenizer = _load_model(model_path, dtype, quantization=quantization)
    engine = TransformersEngine(model, tokenizer, policy_version or model_path, batch_size)
    app = create_app(engine, model_name or model_path, model_path=model_path)
    uvicorn.run(app, host=host, port=port, log_level="info")
