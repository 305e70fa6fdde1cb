"""Chat clients with one surface: any OpenAI-compatible HTTP endpoint, or a local model.

    from alignforge.rollout import OpenAIChatClient, TransformersChatClient
    client = OpenAIChatClient("http://127.0.0.1:8000/v1", model="teacher")
    [result] = client.chat([{"role": "user", "content": "Hi"}], temperature=0.0, max_tokens=64)
    many = client.chat_many([msgs1, msgs2], temperature=0.7, return_exceptions=True)
    for delta in client.stream_chat(msgs1, max_tokens=32):
        print(delta, end="")
    [s] = client.stream_many([msgs1], temperature=0.0)   # s.text, s.ttft_s, s.completion_tokens

    local = TransformersChatClient(model, tokenizer)   # same chat/chat_many surface, in process

Every request of the project to such a server goes through :class:`OpenAIClient` (this
client, :class:`~alignforge.rollout.server_engine.ServerEngine`'s ``/v1/completions``, the
LoRA routes of :mod:`alignforge.rollout.weight_sync`, the eval's ``--base-url`` and the AI
judge), which retries a request alone on 429, 5xx, timeouts and connection errors with
exponential backoff (``backoff * 2**attempt`` seconds, or the server's ``Retry-After``), then
raises :class:`EndpointError` naming the URL.

    client = OpenAIClient("http://127.0.0.1:8000/v1")
    client.post("load_lora_adapter", {"lora_name": "policy-step-3", "lora_path": "/runs/a"})

``chat_many`` keeps at most ``max_concurrency`` requests in flight. With
``return_exceptions=True`` a request that still fails becomes an :class:`EndpointError` in its
slot, so one bad item never sinks the batch. ``response_format`` takes the OpenAI forms
``{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}`` and
``{"type": "json_object"}``; local models then decode under the constraint
(:mod:`alignforge.rollout.constrained`).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from alignforge.errors import UserError

RETRY_STATUSES = {408, 409, 425, 429, 500, 502, 503, 504}


@dataclass
class ChatResult:
    text: str
    finish_reason: str
    logprobs: list[float] | None
    latency_s: float
    tokens: list[str] | None = None


@dataclass
class StreamedChat:
    text: str
    ttft_s: float | None  # None when no content came
    completion_tokens: int
    latency_s: float


class EndpointError(UserError, RuntimeError):
    """A request that failed for good; the message names the URL, the status and the reply.

    ``connection`` is true when no reply came at all (refused, DNS, timeout) after the retries.
    """

    def __init__(
        self, url: str, status: int | None, detail: str, attempts: int = 1, connection: bool = False
    ):
        self.url, self.status, self.detail, self.attempts = url, status, detail, attempts
        self.connection = connection
        where = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"{url}: {where} after {attempts} attempt(s): {detail[:300]}")

    @property
    def endpoint_down(self) -> bool:
        """The endpoint failed, not this request: every other request would fail the same way.
        No connection, a 5xx after the retries, or 401/403 (credentials) and 404 (base_url or
        model name)."""
        return self.connection or self.status in (401, 403, 404) or (self.status or 0) >= 500

    @property
    def hint(self) -> str:
        """What to check when :attr:`endpoint_down`."""
        if self.status in (401, 403):
            return "check the API key and that it may use this model"
        if self.status == 404:
            return "check base_url (it usually ends in /v1) and the model name"
        return "check that the server is running and reachable at base_url"


def _run_sync(coro):
    """``asyncio.run`` that also works when called from inside a running loop (notebooks)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    box: dict = {}

    def target():
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as e:  # re-raised in the caller's thread
            box["error"] = e

    t = threading.Thread(target=target)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


class OpenAIClient:
    """Requests to an OpenAI-compatible server at ``base_url`` (ending in ``/v1``), retried."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None = None,
        max_concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 0.5,
    ):
        self.base_url = base_url.rstrip("/")
        self.api_key = (
            api_key or os.environ.get("OPENAI_API_KEY") or os.environ.get("ALIGNFORGE_API_KEY")
        )
        self.max_concurrency = int(max_concurrency)
        self.timeout = float(timeout)
        self.max_retries = int(max_retries)
        self.backoff = float(backoff)

    def endpoint(self, path: str) -> str:
        return f"{self.base_url}/{path.lstrip('/')}"

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    async def arequest(
        self, client, method: str, path: str, body: dict | None = None, stream: bool = False
    ):
        """The 200 response of ``method path`` (``client``: an ``httpx.AsyncClient``), after
        retrying 429, 5xx, timeouts and connection errors; else :class:`EndpointError`.
        With ``stream`` its body is not read yet: iterate it, then ``await resp.aclose()``;
        ``resp.sent_at`` is the ``time.perf_counter()`` at which the answered attempt was sent."""
        import httpx

        url = self.endpoint(path)
        status, detail = None, ""
        for attempt in range(self.max_retries + 1):
            retry_after = None
            try:
                request = client.build_request(method, url, json=body, headers=self._headers())
                sent_at = time.perf_counter()
                resp = await client.send(request, stream=stream)
                resp.sent_at = sent_at
                if stream and resp.status_code != 200:
                    await resp.aread()
                    await resp.aclose()
            except httpx.TimeoutException as e:
                status, detail = None, f"timed out after {self.timeout:.1f}s ({type(e).__name__})"
            except httpx.TransportError as e:
                status, detail = None, f"connection failed: {type(e).__name__}: {e}"
            else:
                if resp.status_code == 200:
                    return resp
                status, detail = resp.status_code, resp.text
                if status not in RETRY_STATUSES:
                    raise EndpointError(url, status, detail, attempt + 1)
                retry_after = _retry_after(resp)
            if attempt < self.max_retries:
                delay = retry_after if retry_after is not None else self.backoff * 2**attempt
                await asyncio.sleep(delay * (1 + 0.1 * random.random()))
        raise EndpointError(url, status, detail, self.max_retries + 1, connection=status is None)

    def request(self, method: str, path: str, body: dict | None = None):
        """:meth:`arequest` from synchronous code, on a connection of its own."""
        import httpx

        async def once():
            async with httpx.AsyncClient(timeout=self.timeout) as client:
                return await self.arequest(client, method, path, body)

        return _run_sync(once())

    def post(self, path: str, body: dict):
        return self.request("POST", path, body)

    def get(self, path: str):
        return self.request("GET", path)


class OpenAIChatClient(OpenAIClient):
    """Client for ``/v1/chat/completions`` of vLLM, llama.cpp server, OpenAI or ours."""

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        max_concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 4,
        backoff: float = 0.5,
    ):
        super().__init__(base_url, api_key, max_concurrency, timeout, max_retries, backoff)
        self.model = model

    @property
    def url(self) -> str:
        return self.endpoint("chat/completions")

    def _body(self, messages, *, temperature, max_tokens, response_format, n, logprobs, **extra):
        body = {
            "model": self.model,
            "messages": messages,
            "temperature": temperature,
            "max_tokens": max_tokens,
            "n": n,
        }
        if response_format:
            body["response_format"] = response_format
        if logprobs:
            body["logprobs"] = True
        body.update({k: v for k, v in extra.items() if v is not None})
        return body

    async def achat(
        self,
        messages: list[dict],
        *,
        temperature: float = 1.0,
        max_tokens: int = 256,
        response_format: dict | None = None,
        n: int = 1,
        logprobs: bool = False,
        top_p: float | None = None,
        seed: int | None = None,
        client=None,
    ) -> list[ChatResult]:
        import httpx

        body = self._body(
            messages, temperature=temperature, max_tokens=max_tokens,
            response_format=response_format, n=n, logprobs=logprobs, top_p=top_p, seed=seed,
        )  # fmt: skip
        owns = client is None
        client = client or httpx.AsyncClient(timeout=self.timeout)
        try:
            return await self._post_with_retries(client, body)
        finally:
            if owns:
                await client.aclose()

    async def _post_with_retries(self, client, body: dict) -> list[ChatResult]:
        resp = await self.arequest(client, "POST", "chat/completions", body)
        return _parse_chat(resp, self.url, resp.elapsed.total_seconds())

    def chat(self, messages: list[dict], **kwargs) -> list[ChatResult]:
        """One request (``n`` choices). Keyword arguments as in :meth:`achat`."""
        return _run_sync(self.achat(messages, **kwargs))

    def chat_many(
        self, list_of_messages: list[list[dict]], *, return_exceptions: bool = False,
        progress: bool = False, **kwargs,
    ) -> list:  # fmt: skip
        """Many requests with bounded concurrency; results keep the input order."""
        return _run_sync(
            self._many(self.achat, list_of_messages, return_exceptions, progress, kwargs)
        )

    def stream_many(
        self, list_of_messages: list[list[dict]], *, return_exceptions: bool = False,
        progress: bool = False, **kwargs,
    ) -> list:  # fmt: skip
        """:meth:`astream_chat` for many requests with bounded concurrency, in input order."""
        return _run_sync(
            self._many(self.astream_chat, list_of_messages, return_exceptions, progress, kwargs)
        )

    async def astream_chat(
        self, messages: list[dict], *, client, temperature: float = 1.0, max_tokens: int = 256,
        top_p: float | None = None, seed: int | None = None, include_usage: bool = True,
    ) -> StreamedChat:  # fmt: skip
        """One streamed request, read to the end: the text, the time to its first content
        delta and the server's completion token count (``stream_options.include_usage``;
        without it, the number of content deltas). Retried like any request until the server
        starts answering; a stream that breaks off is an :class:`EndpointError`."""
        import httpx

        body = self._body(
            messages, temperature=temperature, max_tokens=max_tokens, response_format=None,
            n=1, logprobs=False, top_p=top_p, seed=seed, stream=True,
            stream_options={"include_usage": True} if include_usage else None,
        )  # fmt: skip
        resp = await self.arequest(client, "POST", "chat/completions", body, stream=True)
        started = resp.sent_at  # the answered attempt, not the retries before it
        parts: list[str] = []
        usage, first = None, None
        try:
            async for line in resp.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                try:
                    obj = json.loads(data)
                except json.JSONDecodeError:
                    raise EndpointError(self.url, 200, f"invalid SSE data {data[:120]!r}") from None
                if obj.get("usage"):
                    usage = obj["usage"].get("completion_tokens")
                for choice in obj.get("choices") or []:
                    piece = (choice.get("delta") or {}).get("content") or ""
                    if piece:
                        first = first or time.perf_counter()
                        parts.append(piece)
        except httpx.TransportError as e:
            detail = f"stream broke off: {type(e).__name__}: {e}"
            raise EndpointError(self.url, None, detail, connection=True) from None
        finally:
            await resp.aclose()
        latency = time.perf_counter() - started
        n = int(usage) if usage is not None else len(parts)
        return StreamedChat("".join(parts), first - started if first else None, n, latency)

    async def _many(self, request, list_of_messages, return_exceptions, progress, kwargs):
        """``request(messages, client=..., **kwargs)`` for each, at most ``max_concurrency``
        in flight over one connection pool."""
        import httpx
        from tqdm.auto import tqdm

        sem = asyncio.Semaphore(self.max_concurrency)
        bar = tqdm(total=len(list_of_messages), disable=not progress, desc="chat")
        limits = httpx.Limits(max_connections=self.max_concurrency)
        async with httpx.AsyncClient(timeout=self.timeout, limits=limits) as client:

            async def one(messages):
                async with sem:
                    try:
                        return await request(messages, client=client, **kwargs)
                    finally:
                        bar.update(1)

            results = await asyncio.gather(
                *(one(m) for m in list_of_messages), return_exceptions=return_exceptions
            )
        bar.close()
        return list(results)

    def stream_chat(
        self, messages: list[dict], *, temperature: float = 1.0, max_tokens: int = 256,
        top_p: float | None = None, seed: int | None = None,
    ) -> Iterator[str]:  # fmt: skip
        """Yield text deltas as the server sends them (server-sent events)."""
        import httpx

        body = self._body(
            messages, temperature=temperature, max_tokens=max_tokens, response_format=None,
            n=1, logprobs=False, top_p=top_p, seed=seed, stream=True,
        )  # fmt: skip
        with httpx.Client(timeout=self.timeout) as client:
            with client.stream("POST", self.url, json=body, headers=self._headers()) as resp:
                if resp.status_code != 200:
                    raise EndpointError(
                        self.url, resp.status_code, resp.read().decode(errors="replace")
                    )
                for line in resp.iter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    delta = json.loads(data)["choices"][0].get("delta", {}).get("content")
                    if delta:
                        yield delta


def _retry_after(resp) -> float | None:
    try:
        return float(resp.headers["retry-after"])
    except (KeyError, ValueError):
        return None


def _parse_chat(resp, url: str, latency: float) -> list[ChatResult]:
    try:
        payload = resp.json()
        choices = payload["choices"]
    except (ValueError, KeyError, TypeError) as e:
        raise EndpointError(
            url, resp.status_code, f"reply is not a chat completion: {e}: {resp.text[:200]}"
        ) from None
    out = []
    for choice in choices:
        message = choice.get("message") or {}
        lp = choice.get("logprobs") or {}
        content = lp.get("content") if isinstance(lp, dict) else None
        out.append(
            ChatResult(
                text=message.get("content") or "",
                finish_reason=choice.get("finish_reason") or "stop",
                logprobs=[float(t["logprob"]) for t in content] if content else None,
                latency_s=latency,
                tokens=[t.get("token", "") for t in content] if content else None,
            )
        )
    return out


class TransformersChatClient:
    """The chat client surface over an in-process model (constrained JSON when asked)."""

    def __init__(self, model, tokenizer, *, policy_version: str = "0", batch_size: int = 8,
                 model_name: str = "local"):  # fmt: skip
        from alignforge.rollout.transformers_engine import TransformersEngine

        self.engine = TransformersEngine(model, tokenizer, policy_version, batch_size)
        self.tokenizer = tokenizer
        self.model = model_name
        self.url = f"local:{model_name}"

    def chat(self, messages: list[dict], **kwargs) -> list[ChatResult]:
        return self.chat_many([messages], **kwargs)[0]

    def chat_many(
        self, list_of_messages: list[list[dict]], *, temperature: float = 1.0,
        max_tokens: int = 256, response_format: dict | None = None, n: int = 1,
        logprobs: bool = False, top_p: float | None = None, seed: int | None = None,
        return_exceptions: bool = False, progress: bool = False,
    ) -> list:  # fmt: skip
        from alignforge.rollout.constrained import schema_from_response_format
        from alignforge.rollout.transformers_engine import chat_prompt_ids

        schema = schema_from_response_format(response_format)
        prompts = [chat_prompt_ids(self.tokenizer, m) for m in list_of_messages]
        started = time.perf_counter()
        try:
            groups = self.engine.generate(
                prompts, n=n, temperature=temperature, top_p=top_p or 1.0,
                max_new_tokens=max_tokens, greedy=temperature <= 0, seed=seed, json_schema=schema,
            )  # fmt: skip
        except (RuntimeError, ValueError) as e:
            if not return_exceptions:
                raise
            error = EndpointError(self.url, None, f"{type(e).__name__}: {e}")
            return [error for _ in prompts]
        latency = (time.perf_counter() - started) / max(len(prompts), 1)
        return [
            [
                ChatResult(
                    text=r.text,
                    finish_reason=r.finish_reason,
                    logprobs=list(r.logps) if logprobs else None,
                    latency_s=latency,
                )  # fmt: skip
                for r in group
            ]
            for group in groups
        ]
