"""Rollouts from OpenAI-compatible servers: vLLM (``vllm serve``) or ``alignforge serve``.

    from alignforge.rollout.server_engine import ServerEngine
    engine = ServerEngine(["http://gpu0:8000/v1", "http://gpu1:8000/v1"], model="policy-step-3",
                          eos_token_ids=[2], policy_version="3")
    groups = engine.generate([prompt_ids], n=4, temperature=0.9, max_new_tokens=64, seed=0)

Each prompt is one ``POST /v1/completions`` with its token ids as ``prompt``, ``n`` samples, its
own ``seed``, ``logprobs: 0`` and ``return_tokens_as_token_ids: true`` (vLLM's parameters), so
the reply carries every sampled token id and its log-prob. With vLLM the log-probs are those of
the distribution the token was drawn from only under ``--logprobs-mode processed_logprobs``
(after temperature and top-p; vLLM's default, ``raw_logprobs``, reports the untempered model);
``alignforge serve`` always reports those.

Prompts are spread over the servers by work stealing: each server has ``max_concurrency``
workers taking the next prompt as they finish one, first round-robin, then whichever server is
least loaded. Prompt ``p`` is seeded with the same per-prompt seed as
:class:`~alignforge.rollout.transformers_engine.TransformersEngine` gives it, so a rollout does
not depend on which server drew it; ``alignforge serve`` over the same fp32 weights returns the
in-process engine's tokens and log-probs. A server that stops answering is retried
(:class:`~alignforge.rollout.openai_client.OpenAIClient`), then the call fails with an
:class:`~alignforge.rollout.openai_client.EndpointError` naming its URL.

EOS: vLLM and ``alignforge serve`` return the EOS token that ended a completion among its tokens,
with its log-prob; the in-process engine keeps it too. A completion whose last token is an EOS
id has ``finish_reason="stop"`` (also when the server says ``length`` because EOS came exactly at
``max_tokens``). A server that reports an EOS stop (``finish_reason: stop`` without a
``stop_reason``) but omits the token is refused with an error: the trainer would never see the
token that ended the answer, nor its behaviour log-prob.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy

from alignforge.errors import UserError
from alignforge.rollout.base import Rollout
from alignforge.rollout.openai_client import EndpointError, OpenAIClient, _run_sync
from alignforge.rollout.transformers_engine import _prompt_seeds


class ServerEngine:
    """:class:`~alignforge.rollout.base.RolloutEngine` over the ``/v1/completions`` route of one
    or more servers; requests name ``model`` (the served model or a loaded LoRA adapter)."""

    def __init__(
        self,
        base_urls: str | list[str],
        model: str,
        eos_token_ids: list[int],
        *,
        policy_version: str = "0",
        api_key: str | None = None,
        max_concurrency: int = 32,
        timeout: float = 600.0,
        max_retries: int = 4,
        backoff: float = 0.5,
    ):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ValueError("ServerEngine needs at least one base URL")
        self.clients = [OpenAIClient(u, api_key, max_concurrency, timeout, max_retries, backoff)
                        for u in urls]  # fmt: skip
        self.model = model
        self.eos_ids = set(int(i) for i in eos_token_ids)
        self.policy_version = str(policy_version)

    @property
    def base_urls(self) -> list[str]:
        return [c.base_url for c in self.clients]

    def check(self) -> None:
        """Every server serves ``model`` (a run pointed at the wrong server fails at start)."""
        for c in self.clients:
            names = served_models(c.base_url, c.api_key)
            if self.model not in names:
                raise UserError(f"{c.endpoint('models')} serves {', '.join(names) or 'nothing'}, "
                                f"not {self.model!r}")  # fmt: skip

    def at(self, model: str, policy_version: str) -> ServerEngine:
        """This engine generating with ``model`` (e.g. an adapter just loaded), its rollouts
        tagged ``policy_version``; the original is unchanged, so a batch still being drawn in
        another thread keeps its own."""
        other = copy.copy(self)
        other.model, other.policy_version = model, str(policy_version)
        return other

    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 128,
        greedy: bool = False,
        seed: int | list[int] | None = None,
    ) -> list[list[Rollout]]:
        """``n`` rollouts for each prompt (token id lists), in the order of ``prompts``."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        for p, ids in enumerate(prompts):
            if not ids:
                raise ValueError(f"prompt {p} is empty")
        greedy = greedy or temperature <= 0
        seeds = _prompt_seeds(seed, len(prompts))
        sampling = {"n": n, "max_tokens": max_new_tokens, "temperature": 0.0 if greedy else temperature,
                    "top_p": 1.0 if greedy else top_p}  # fmt: skip
        bodies = [{"model": self.model, "prompt": list(ids), "seed": s, "logprobs": 0,
                   "return_tokens_as_token_ids": True, **sampling}
                  for ids, s in zip(prompts, seeds, strict=True)]  # fmt: skip
        replies = _run_sync(self._post_all(bodies))
        return [
            self._rollouts(body, server, reply)
            for body, (server, reply) in zip(bodies, replies, strict=True)
        ]

    async def _post_all(self, bodies: list[dict]) -> list[tuple[OpenAIClient, dict]]:
        """Every body posted to ``/completions`` of some server; replies in the bodies' order."""
        import httpx

        todo: asyncio.Queue = asyncio.Queue()
        for i in range(len(bodies)):
            todo.put_nowait(i)
        out: list = [None] * len(bodies)

        async def worker(server: OpenAIClient, http) -> None:
            while not todo.empty():
                i = todo.get_nowait()
                resp = await server.arequest(http, "POST", "completions", bodies[i])
                out[i] = (server, _json(resp, server))

        async with contextlib.AsyncExitStack() as stack:
            https = [await stack.enter_async_context(httpx.AsyncClient(
                timeout=c.timeout, limits=httpx.Limits(max_connections=c.max_concurrency)))
                for c in self.clients]  # fmt: skip
            # round-robin first: worker k of every server starts before worker k+1 of any
            workers = [worker(c, https[j]) for k in range(max(c.max_concurrency for c in self.clients))
                       for j, c in enumerate(self.clients) if k < c.max_concurrency]  # fmt: skip
            tasks = [asyncio.ensure_future(w) for w in workers]
            try:
                await asyncio.gather(*tasks)
            finally:
                for t in tasks:
                    t.cancel()
        return out

    def _rollouts(self, body: dict, server: OpenAIClient, reply: dict) -> list[Rollout]:
        url = server.endpoint("completions")
        choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))
        if len(choices) != body["n"]:
            raise EndpointError(
                url, 200, f"asked for n={body['n']} completions, got {len(choices)}"
            )
        greedy = body["temperature"] == 0.0
        out = []
        for choice in choices:
            ids, logps = self._tokens(url, choice)
            finish = choice.get("finish_reason")
            if ids and ids[-1] in self.eos_ids:
                finish = "stop"
            elif finish == "stop" and choice.get("stop_reason") is None:
                raise EndpointError(url, 200, "a completion stopped at EOS but the EOS token is "
                                    "not among its tokens; the trainer needs it and its log-prob")  # fmt: skip
            out.append(Rollout(
                prompt_ids=list(body["prompt"]), completion_ids=ids, logps=logps,
                text=choice.get("text") or "", finish_reason=finish or "length",
                policy_version=self.policy_version, temperature=body["temperature"],
                greedy=greedy, top_p=body["top_p"], extra={"server": server.base_url},
            ))  # fmt: skip
        return out

    @staticmethod
    def _tokens(url: str, choice: dict) -> tuple[list[int], list[float]]:
        """Token ids (from ``token_id:N`` strings) and their log-probs, one per sampled token."""
        lp = choice.get("logprobs") or {}
        tokens, logps = lp.get("tokens"), lp.get("token_logprobs")
        if tokens is None or logps is None or len(tokens) != len(logps):
            raise EndpointError(url, 200, "the reply has no per-token log-probs (logprobs.tokens "
                                "and token_logprobs); the server must honour `logprobs`")  # fmt: skip
        try:
            ids = [int(t.removeprefix("token_id:")) for t in tokens]
        except ValueError:
            raise EndpointError(url, 200, f"tokens come back as text ({tokens[:3]}), not "
                                "'token_id:N': the server ignored return_tokens_as_token_ids") from None  # fmt: skip
        return ids, [float(x) for x in logps]


def _json(resp, server: OpenAIClient) -> dict:
    try:
        return resp.json()
    except ValueError:
        raise EndpointError(server.endpoint("completions"), resp.status_code,
                            f"reply is not JSON: {resp.text[:200]}") from None  # fmt: skip


def served_models(base_url: str, api_key: str | None = None) -> list[str]:
    """The models a server serves (``GET /v1/models``), LoRA adapters (which name a ``parent``)
    left out; an :class:`EndpointError` naming the URL when it does not answer."""
    client = OpenAIClient(base_url, api_key)
    resp = client.get("models")
    try:
        cards = resp.json()["data"]
        return [c["id"] for c in cards if not c.get("parent")]
    except (ValueError, KeyError, TypeError):
        raise EndpointError(client.endpoint("models"), 200,
                            f"not a model list: {resp.text[:200]}") from None  # fmt: skip
