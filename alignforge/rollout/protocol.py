"""Request and response shapes of ``alignforge serve``: vLLM's OpenAI-compatible API.

    from alignforge.rollout.protocol import ChatRequest, check_supported
    req = ChatRequest.model_validate(body)      # unknown fields are kept and ignored, as in vLLM
    check_supported(req)                        # ApiError(400) naming a parameter we do not honour

Field names, defaults and validation messages follow vLLM's ``ChatCompletionRequest`` and
``CompletionRequest``. Parameters vLLM knows but this server does not implement (``best_of``,
``logit_bias``, penalties, ``echo``, ``suffix``, tools, ...) are refused with a 400 naming the
parameter when set to anything but their neutral value, never silently ignored. Fields neither
knows are ignored, as vLLM ignores them.

Log-probs are vLLM's ``processed_logprobs``: those of the distribution the token was drawn from,
after the JSON constraint's mask, temperature and top-p (a token outside the nucleus has
-9999.0, vLLM's floor for -inf). Greedy rows (``temperature: 0``) report the untempered ones.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_LOGPROBS = 20  # vLLM's default --max-logprobs
LOGPROB_FLOOR = -9999.0  # vLLM reports -inf (a token outside the nucleus) as this

_OFF = (None, False)
_ZERO = (None, 0, 0.0)
_EMPTY = (None, [], {}, "")
# vLLM request fields this server does not implement, with the values that mean "not used".
_COMMON_UNSUPPORTED: dict[str, tuple] = {
    "frequency_penalty": _ZERO, "presence_penalty": _ZERO, "logit_bias": _EMPTY,
    "best_of": (None, 1), "use_beam_search": _OFF, "top_k": (None, 0, -1), "min_p": _ZERO,
    "repetition_penalty": (None, 1, 1.0), "length_penalty": (None, 1, 1.0),
    "stop_token_ids": _EMPTY, "include_stop_str_in_output": _OFF, "ignore_eos": _OFF,
    "min_tokens": _ZERO, "skip_special_tokens": (None, True),
    "spaces_between_special_tokens": (None, True), "truncate_prompt_tokens": (None,),
    "prompt_logprobs": (None,), "logprob_token_ids": _EMPTY, "allowed_token_ids": _EMPTY,
    "bad_words": _EMPTY, "structured_outputs": (None,), "guided_json": (None,),
    "guided_regex": (None,), "guided_choice": (None,), "guided_grammar": (None,),
    "priority": _ZERO, "vllm_xargs": _EMPTY, "echo": _OFF,
}  # fmt: skip
_CHAT_UNSUPPORTED = _COMMON_UNSUPPORTED | {
    "tools": _EMPTY, "tool_choice": (None, "none"), "functions": _EMPTY,
    "function_call": (None, "none"), "add_generation_prompt": (None, True),
    "continue_final_message": _OFF, "add_special_tokens": _OFF, "chat_template": (None,),
    "chat_template_kwargs": _EMPTY, "documents": _EMPTY, "modalities": (None, ["text"]),
    "audio": (None,), "prediction": (None,),
}  # fmt: skip
_COMPLETION_UNSUPPORTED = _COMMON_UNSUPPORTED | {"suffix": _EMPTY, "prompt_embeds": _EMPTY}


class ApiError(Exception):
    """An error answered as vLLM's ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def body(self) -> dict:
        kind = {400: "BadRequestError", 404: "NotFoundError"}.get(
            self.status, "InternalServerError"
        )
        return {"error": {"message": self.message, "type": kind, "param": self.param,
                          "code": self.status}}  # fmt: skip


class StreamOptions(BaseModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields are ignored, as vLLM does
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {}

    model: str | None = None
    n: int = Field(1, ge=1, le=64)
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    response_format: dict[str, Any] | None = None
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    user: str | None = None  # accepted and ignored, as in vLLM

    @model_validator(mode="before")
    @classmethod
    def _stream_options_need_stream(cls, data):
        if isinstance(data, dict) and data.get("stream_options") and not data.get("stream"):
            raise ValueError("Stream options can only be defined when `stream=True`.")
        return data

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(not s for s in stops):
            raise ApiError(400, "stop: empty stop strings are not allowed", "stop")
        return tuple(stops)

    def sampling(self) -> dict:
        """Per-row settings for :class:`~alignforge.rollout.transformers_engine.RowSpec`."""
        temperature = 1.0 if self.temperature is None else self.temperature
        return {"temperature": temperature, "greedy": temperature == 0,
                "top_p": 1.0 if self.top_p is None else self.top_p, "stop": self.stop_strings()}  # fmt: skip

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(_Request):
    UNSUPPORTED: ClassVar[dict[str, tuple]] = _CHAT_UNSUPPORTED
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(0, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("when using `top_logprobs`, `logprobs` must be set to true.")
        return self


class CompletionRequest(_Request):
    UNSUPPORTED: ClassVar[dict[str, tuple]] = _COMPLETION_UNSUPPORTED
    prompt: list[int] | list[list[int]] | str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_special_tokens: bool = True


def check_supported(req: _Request) -> None:
    """Refuse (400, naming the parameter) a vLLM parameter this server would otherwise ignore."""
    for name, value in (req.model_extra or {}).items():
        neutral = req.UNSUPPORTED.get(name)
        if neutral is not None and not any(_same(value, v) for v in neutral):
            raise ApiError(400, f"{name}: not supported by alignforge serve (got {value!r}); "
                           "leave it out", name)  # fmt: skip
    if req.stream_options and req.stream_options.continuous_usage_stats:
        raise ApiError(400, "stream_options.continuous_usage_stats: not supported; use "
                       "include_usage", "stream_options")  # fmt: skip


def _same(a, b) -> bool:
    """Equal and of the same type (``True`` is not the neutral ``1`` of ``best_of``)."""
    return a is b or (type(a) is type(b) and a == b)


def token_str(tokenizer, token_id: int, as_id: bool) -> str:
    """A token as vLLM shows it in log-probs: its text, or ``"token_id:123"``."""
    return f"token_id:{token_id}" if as_id else tokenizer.decode([token_id])


def _lp(x: float) -> float:
    return max(float(x), LOGPROB_FLOOR)


def chat_logprob_entry(tokenizer, token_id, logp, top, k: int, as_id: bool) -> dict:
    """One ``logprobs.content`` entry: the token, its log-prob, bytes and its ``k`` best
    alternatives (``top``: ``(token_id, logp)`` pairs, best first)."""
    token = token_str(tokenizer, token_id, as_id)
    alternatives = []
    for tid, lp in (top or [])[:k]:
        t = token_str(tokenizer, tid, as_id)
        alternatives.append({"token": t, "logprob": _lp(lp), "bytes": list(t.encode())})
    return {"token": token, "logprob": _lp(logp), "bytes": list(token.encode()),
            "top_logprobs": alternatives}  # fmt: skip


class CompletionLogprobs:
    """Completions-style log-probs (``tokens``, ``token_logprobs``, ``top_logprobs``,
    ``text_offset``) built token by token, so a stream's chunks continue each other's offsets.

    ``top_logprobs[t]`` holds the sampled token and the ``k`` best, as vLLM returns them.
    """

    def __init__(self, tokenizer, k: int, as_id: bool):
        self.tok, self.k, self.as_id = tokenizer, k, as_id
        self.offset = 0

    def add(self, token_ids, logps, tops) -> dict:
        out: dict = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, logp, top in zip(token_ids, logps, tops, strict=True):
            token = token_str(self.tok, token_id, self.as_id)
            best = {token: _lp(logp)}
            for tid, lp in (top or [])[: self.k]:
                best.setdefault(token_str(self.tok, tid, self.as_id), _lp(lp))
            out["tokens"].append(token)
            out["token_logprobs"].append(_lp(logp))
            out["top_logprobs"].append(best)
            out["text_offset"].append(self.offset)
            self.offset += len(self.tok.decode([token_id]))
        return out


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}  # fmt: skip
