"""Generation behind one small interface, with latency measured per item.

    from alignforge.evaluate.generation import OpenAIGenerator, TransformersGenerator

    gen = TransformersGenerator.from_path("runs/sft/final", adapter=None, max_new_tokens=256)
    gen = OpenAIGenerator("http://127.0.0.1:8000/v1", model="my-model")
    outs = gen.generate([[{"role": "user", "content": "Extract the entities: ..."}]])
    outs[0].text, outs[0].ttft_s, outs[0].n_tokens, outs[0].seconds

All are greedy (temperature 0). Time to first token (TTFT) is, for a local model, the time until
its batch's first new token (the rollout engine's first token event) and, for endpoints, the
time until the first content chunk of the streamed (SSE) response.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from alignforge.rollout.openai_client import EndpointError, OpenAIChatClient

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Generation:
    text: str
    ttft_s: float | None  # seconds until the first generated token; None if nothing came
    n_tokens: int  # generated tokens (the endpoint's count when it reports usage)
    seconds: float  # wall time of the request (for a batch: of the whole batch)

    @property
    def tokens_per_s(self) -> float:
        return self.n_tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Generator(Protocol):
    """Anything that turns chat conversations into completions."""

    batch_size: int

    def generate(self, batch: Sequence[Messages]) -> list[Generation]: ...


# ---- local transformers models -------------------------------------------------------------


def _load(path: str, adapter: str | None = None, template: str = "default") -> tuple[Any, Any]:
    """(model, tokenizer) from ``default``, an HF model dir, an adapter dir, or a base plus an adapter.

    A LoRA adapter is merged into the base weights: same outputs, faster greedy decoding.
    ``template`` replaces the saved chat template (:func:`alignforge.data.templating.set_chat_template`).
    """
    import torch

    from alignforge.data.templating import set_chat_template
    from alignforge.models import load_model, load_tokenizer

    model = load_model(path)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    tokenizer = load_tokenizer(
        adapter if adapter and (Path(adapter) / "tokenizer_config.json").exists() else path
    )
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    return model, set_chat_template(tokenizer, template)


class TransformersGenerator:
    """Greedy batched generation with an in-process model, through
    :class:`~alignforge.rollout.transformers_engine.TransformersEngine` (``batch_size`` prompts
    per batch, in the order given). Prompts are
    :func:`~alignforge.rollout.transformers_engine.chat_prompt_ids`; an end-of-sequence token
    counts as a generated token."""

    def __init__(
        self, model: Any, tokenizer: Any, max_new_tokens: int = 256, batch_size: int = 8
    ) -> None:
        from alignforge.rollout.transformers_engine import TransformersEngine

        self.engine = TransformersEngine(model, tokenizer, batch_size=batch_size)
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.batch_size = max_new_tokens, batch_size

    @classmethod
    def from_path(
        cls, path: str, adapter: str | None = None, template: str = "default", **kwargs: Any
    ) -> TransformersGenerator:
        model, tokenizer = _load(path, adapter, template)
        return cls(model, tokenizer, **kwargs)

    def generate(self, batch: Sequence[Messages]) -> list[Generation]:
        out: list[Generation] = []
        for i in range(0, len(batch), self.batch_size):
            out.extend(self._generate_batch(batch[i : i + self.batch_size]))
        return out

    def _generate_batch(self, batch: Sequence[Messages]) -> list[Generation]:
        from alignforge.rollout.transformers_engine import RowSpec, chat_prompt_ids

        first: list[float] = []

        def first_token(_event) -> None:
            # every row makes its first token at the same step: one row's is the batch's, and
            # dropping the callback spares decoding that row's text at every later step
            first.append(time.perf_counter())
            specs[0].on_token = None

        specs = [RowSpec(chat_prompt_ids(self.tokenizer, m), self.max_new_tokens, greedy=True)
                 for m in batch]  # fmt: skip
        specs[0].on_token = first_token
        start = time.perf_counter()
        rollouts = self.engine.generate_rows(specs)
        seconds = time.perf_counter() - start
        ttft = first[0] - start if first else None
        return [Generation(r.text, ttft if r.n_tokens else None, r.n_tokens, seconds)
                for r in rollouts]  # fmt: skip


# ---- GGUF files in llama.cpp ---------------------------------------------------------------


class LlamaCppGenerator:
    """Greedy generation from a GGUF file in llama.cpp (``llama-cpp-python``), one prompt at a time.

    The prompt is the GGUF's own chat template rendered by llama-cpp-python's formatter, as its
    server and Ollama do; without a template, the same ``role: content`` fallback as
    :func:`~alignforge.rollout.transformers_engine.chat_prompt_ids`. Tokens are counted as generated (an end-of-generation token included,
    as :class:`TransformersGenerator` counts it). llama.cpp reuses the KV cache of the longest
    prompt prefix shared with the previous request (the task's instructions), which is part of
    what it measures.
    """

    def __init__(
        self, path: str, max_new_tokens: int = 256, n_ctx: int = 4096, threads: int | None = None
    ) -> None:
        from alignforge.export.gguf import llama_cpp_version

        llama_cpp_version()  # a one-line error naming the extra when it is missing
        import llama_cpp
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        # llama.cpp's own default, half the logical CPUs: its threads spin at every barrier, so
        # one more than the cores it really gets makes it several times slower (measured on 2
        # shared cores: 1 thread 26 tokens/s, 2 threads 3)
        threads = threads or max(1, (os.cpu_count() or 2) // 2)
        self.llm = llama_cpp.Llama(
            model_path=str(path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
            verbose=False,
        )  # fmt: skip
        self.vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.is_eog = llama_cpp.llama_vocab_is_eog
        self.max_new_tokens, self.batch_size = max_new_tokens, 8  # batch: cache flush granularity
        template = self.llm.metadata.get("tokenizer.chat_template")
        eos, bos = (self._token_text(t) for t in (self.llm.token_eos(), self.llm.token_bos()))
        self.formatter = template and Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos)

    def _token_text(self, token: int) -> str:
        return self.llm.detokenize([token], special=True).decode() if token >= 0 else ""

    @classmethod
    def from_path(cls, path: str, **kwargs: Any) -> LlamaCppGenerator:
        return cls(path, **kwargs)

    def prompt_ids(self, messages: Messages) -> list[int]:
        if self.formatter:
            text = self.formatter(messages=messages).prompt
        else:
            text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
        return self.llm.tokenize(text.encode("utf-8"), add_bos=not self.formatter, special=True)

    def generate(self, batch: Sequence[Messages]) -> list[Generation]:
        return [self._generate_one(m) for m in batch]

    def _generate_one(self, messages: Messages) -> Generation:
        prompt = self.prompt_ids(messages)
        out: list[int] = []
        first, start = None, time.perf_counter()
        for token in self.llm.generate(prompt, temp=0.0, top_k=1, top_p=1.0, min_p=0.0,
                                       repeat_penalty=1.0):  # fmt: skip
            first = first or time.perf_counter()
            out.append(token)
            if self.is_eog(self.vocab, token) or len(out) >= self.max_new_tokens:
                break
        seconds = time.perf_counter() - start
        body = out[:-1] if out and self.is_eog(self.vocab, out[-1]) else out
        text = self.llm.detokenize(body).decode("utf-8", "replace")
        return Generation(text, first - start if first else None, len(out), seconds)


# ---- OpenAI-compatible endpoints -----------------------------------------------------------


class OpenAIGenerator:
    """Streaming ``/chat/completions`` client (OpenAI, vLLM, llama.cpp, TGI, ...), greedy.

    ``base_url`` is the API root (``http://host:8000/v1``) or the full completions URL. The
    API key comes from ``api_key`` or the environment variable ``api_key_env``. Requests go
    through :class:`~alignforge.rollout.openai_client.OpenAIChatClient` (``concurrency`` in
    flight, ``retries`` on 429, 5xx, timeouts and connection errors); a server that rejects
    ``stream_options`` is asked again without it, and tokens are then counted as chunks.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_tokens: int = 512,
        concurrency: int = 4,
        timeout_s: float = 120.0,
        retries: int = 3,
    ) -> None:
        base = base_url.rstrip("/").removesuffix("/chat/completions")
        self.client = OpenAIChatClient(
            base, model, api_key=api_key or os.environ.get(api_key_env),
            max_concurrency=max(1, concurrency), timeout=timeout_s, max_retries=retries,
        )  # fmt: skip
        self.url, self.model, self.max_tokens = self.client.url, model, max_tokens
        self.batch_size = concurrency
        self._usage_ok = True

    def _stream(self, batch: Sequence[Messages]) -> list:
        return self.client.stream_many(
            list(batch), return_exceptions=True, temperature=0.0, max_tokens=self.max_tokens,
            include_usage=self._usage_ok,
        )  # fmt: skip

    def generate(self, batch: Sequence[Messages]) -> list[Generation]:
        out = self._stream(batch)
        redo = [i for i, r in enumerate(out) if _rejects_usage(r)]
        if redo and self._usage_ok:
            self._usage_ok = False  # older servers reject it; count chunks instead
            for i, r in zip(redo, self._stream([batch[i] for i in redo]), strict=True):
                out[i] = r
        for r in out:
            if isinstance(r, EndpointError) and r.endpoint_down:
                raise EndpointError(r.url, r.status, f"{r.detail[:200]}; {r.hint}", r.attempts,
                                    r.connection) from None  # fmt: skip
            if isinstance(r, BaseException):
                raise r
        return [Generation(r.text, r.ttft_s, r.completion_tokens, r.latency_s) for r in out]


def _rejects_usage(r: object) -> bool:
    return isinstance(r, EndpointError) and r.status == 400 and "stream_options" in r.detail
