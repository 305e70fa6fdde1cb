"""In-process generation over a transformers (or peft) model with behaviour log-probs.

    from alignforge.rollout import TransformersEngine, chat_prompt_ids
    engine = TransformersEngine(model, tokenizer, policy_version="sft-final")
    ids = chat_prompt_ids(tokenizer, "Extract the entities: Apple bought Beats.")
    [[greedy]] = engine.generate([ids], greedy=True, max_new_tokens=64)
    samples = engine.generate([ids], n=4, temperature=0.9, top_p=0.95, seed=0)[0]

Behaviour log-probs are those of the distribution each token was actually drawn from: the
logits with the JSON constraint's mask applied (disallowed tokens at -inf; rows without a schema
unmasked), divided by the temperature, then cut to the top-p nucleus and renormalised. With
``temperature=1, top_p=1`` and no schema they equal the model's teacher-forced log-probs; with
temperature ``T`` they equal ``log_softmax(logits / T)``. Greedy rollouts report the untempered
(T=1) log-probs of the masked logits.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from alignforge.data.templating import render_chat
from alignforge.rollout.base import Rollout


def chat_prompt_ids(tokenizer, messages_or_text, *, system: str | None = None) -> list[int]:
    """Token ids of a prompt rendered with the tokenizer's chat template and generation prompt.

    ``messages_or_text`` is a user string or a list of ``{"role", "content"}`` messages. Without
    a chat template the messages are rendered as ``"role: content"`` lines ending in
    ``"assistant:"``.
    """
    if isinstance(messages_or_text, str):
        messages = [{"role": "user", "content": messages_or_text}]
    else:
        messages = list(messages_or_text)
    if system is not None and (not messages or messages[0].get("role") != "system"):
        messages = [{"role": "system", "content": system}, *messages]
    if getattr(tokenizer, "chat_template", None):
        text = render_chat(tokenizer, messages, add_generation_prompt=True)
        return list(tokenizer(text, add_special_tokens=False)["input_ids"])
    text = "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"
    return list(tokenizer(text)["input_ids"])


def eos_token_ids(model, tokenizer) -> list[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, Sequence):
            ids.update(int(v) for v in value)
    return sorted(ids)


class TransformersEngine:
    """Batched, left-padded generation returning :class:`Rollout` objects."""

    def __init__(self, model, tokenizer, policy_version: str = "0", batch_size: int = 8):
        self.model = model
        self.tokenizer = tokenizer
        self.policy_version = str(policy_version)
        self.batch_size = int(batch_size)
        self.eos_ids = eos_token_ids(model, tokenizer)
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.eos_ids[0] if self.eos_ids else 0)

    def set_policy_version(self, version: str) -> None:
        self.policy_version = str(version)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
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
        json_schema: dict | list[dict | None] | None = None,
    ) -> list[list[Rollout]]:
        """``n`` rollouts for each prompt (token id lists).

        Each sample draws from its own generator, seeded from ``seed`` (one per prompt when a
        list), the prompt's position and the sample's index: a prompt's samples do not depend on
        which other prompts share its batch or its process.

        ``json_schema`` constrains the output to JSON valid for that schema (see
        :mod:`alignforge.rollout.constrained`); a list gives one schema, or ``None`` for free
        text, per prompt.
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not isinstance(json_schema, list):
            json_schema = [json_schema] * len(prompts)
        if len(json_schema) != len(prompts):
            raise ValueError(f"{len(json_schema)} json schemas for {len(prompts)} prompts")
        seeds = row_seeds(seed, len(prompts), n)
        specs = {
            (p, j): RowSpec(ids, max_new_tokens=max_new_tokens, temperature=temperature,
                            top_p=top_p, greedy=greedy, seed=seeds[p][j], json_schema=json_schema[p])
            for p, ids in enumerate(prompts) for j in range(n)
        }  # fmt: skip
        # Similar lengths share a batch so left padding stays short.
        order = sorted(specs, key=lambda key: len(prompts[key[0]]))
        out: list[list[Rollout | None]] = [[None] * n for _ in prompts]
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            rollouts = self.generate_rows([specs[k] for k in chunk])
            for (p, j), rollout in zip(chunk, rollouts, strict=True):
                out[p][j] = rollout
        return out  # type: ignore[return-value]

    @torch.no_grad()
    def generate_rows(self, specs: list[RowSpec]) -> list[Rollout]:
        """One batch: each :class:`RowSpec` with its own prompt and settings, in one ``generate``
        call (left-padded). ``alignforge serve`` batches rows of concurrent requests this way."""
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        for i, spec in enumerate(specs):
            if not spec.prompt:
                raise ValueError(f"prompt {i} is empty")
            if not 0 < spec.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {spec.top_p}")
        width = max(len(s.prompt) for s in specs)
        input_ids = torch.full((len(specs), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(specs), width), dtype=torch.long)
        for i, s in enumerate(specs):
            input_ids[i, width - len(s.prompt) :] = torch.tensor(s.prompt)
            attention[i, width - len(s.prompt) :] = 1
        processors = LogitsProcessorList()
        if any(s.json_schema is not None for s in specs):
            from alignforge.rollout.constrained import JsonLogitsProcessor, json_constraint

            matchers = [json_constraint(self.tokenizer, s.json_schema, self.eos_ids).matcher()
                        if s.json_schema is not None else None for s in specs]  # fmt: skip
            # the mask comes first: temperature and top-p then act on the allowed tokens only
            processors.append(JsonLogitsProcessor(matchers, pad_id=self.pad_id))
        sampler = RowSampler(specs)
        processors.append(sampler)
        tracker = RowTracker(specs, sampler, self.tokenizer, self.eos_ids)
        # A fresh config so the checkpoint's own sampling defaults (top_k=50, ...) do not leak in.
        # The RowSampler draws each row's token, so decoding picks it greedily.
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=max(s.max_new_tokens for s in specs),
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.pad_id,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
        )
        was_training = self.model.training
        self.model.eval()
        try:
            input_ids, attention = input_ids.to(self.device), attention.to(self.device)
            cache = self._shared_prefill(input_ids, attention)
            self.model.generate(
                input_ids=input_ids,
                attention_mask=attention,
                **({_cache_kwarg(self.model): cache} if cache is not None else {}),
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([tracker]),
            )
        finally:
            self.model.train(was_training)
        return [tracker.rollout(i, self.policy_version) for i in range(len(specs))]

    def _shared_prefill(self, input_ids: torch.Tensor, attention: torch.Tensor):
        """The KV cache of every row's prompt but its last token, each distinct prompt run once,
        or None when no two rows share a prompt. The n samples of a prompt (a GRPO group) then
        share one prefill, which on long prompts is a large part of generating short answers;
        ``generate`` runs the last prompt token and decodes from the cache as usual."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

        # left-padded to one width: equal prompts are equal rows
        rows = [tuple(r) for r in input_ids.tolist()]
        distinct = list(dict.fromkeys(rows))
        if len(distinct) == len(rows) or input_ids.shape[1] < 2:
            return None
        cache = DynamicCache(config=self.model.config)
        if not all(type(x) in (DynamicLayer, DynamicSlidingWindowLayer) for x in cache.layers):
            return None  # recurrent or other states: leave them to generate
        first = torch.tensor([rows.index(r) for r in distinct], device=input_ids.device)
        ids, attn = input_ids[first, :-1], attention[first, :-1]
        positions = (attn.cumsum(-1) - 1).masked_fill(attn == 0, 1)  # as generate numbers them
        self.model(input_ids=ids, attention_mask=attn, position_ids=positions, use_cache=True,
                   logits_to_keep=1, **{_cache_kwarg(self.model): cache})  # fmt: skip
        where = {r: i for i, r in enumerate(distinct)}
        cache.batch_select_indices(torch.tensor([where[r] for r in rows], device=input_ids.device))
        return cache


def _cache_kwarg(model) -> str:
    """The name a KV cache is passed under: transformers 5.25 renamed ``past_key_values`` to
    ``cache`` (the old name warns, and goes in 5.40)."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


@dataclass
class RowSpec:
    """One sequence to generate and its own settings.

    ``greedy`` (or ``temperature <= 0``) takes the argmax; otherwise the row samples from a
    generator seeded with ``seed`` (drawn at random when ``None``). ``stop`` strings end the row
    when its text contains one; the text is cut before it, the tokens keep the one that completed
    it. ``top_logprobs`` keeps that many best (token id, log-prob) pairs per step. ``on_token``
    receives a :class:`TokenEvent` for each token as it is made.
    """

    prompt: list[int]
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    greedy: bool = False
    seed: int | None = None
    json_schema: dict | None = None
    stop: tuple[str, ...] = ()
    top_logprobs: int = 0
    on_token: Callable[[TokenEvent], None] | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.temperature <= 0:
            self.greedy = True  # temperature 0 means deterministic decoding (OpenAI convention)


@dataclass
class TokenEvent:
    """A token just made for one row; ``text`` is the row's whole text so far (cut before a stop
    string), ``finish_reason`` is set on its last token."""

    token_id: int
    logp: float
    top: list[tuple[int, float]] | None
    text: str
    finish_reason: str | None = None
    stop_reason: str | None = None


def row_seeds(seed: int | list[int] | None, n_prompts: int, n: int) -> list[list[int]]:
    """Each sample's generator seed, from ``seed`` (one per prompt when a list), the prompt's
    position and the sample's index."""
    return [[(s * 7919 + j) % (2**63) for j in range(n)] for s in _prompt_seeds(seed, n_prompts)]


def _prompt_seeds(seed: int | list[int] | None, n: int) -> list[int]:
    """One seed per prompt: the given list, ``seed + 1_000_003 * position``, or drawn from torch's
    RNG. A single prompt's seed is ``seed`` itself, so a one-prompt request to ``alignforge serve``
    samples what this engine samples for that prompt given the same seed in a longer list."""
    if isinstance(seed, list | tuple):
        if len(seed) != n:
            raise ValueError(f"{len(seed)} seeds for {n} prompts")
        return [int(s) for s in seed]
    if seed is None:
        return torch.randint(0, 2**62, (n,)).tolist()
    return [int(seed) + 1_000_003 * p for p in range(n)]


class RowSampler:
    """A logits processor that, for each row, applies that row's temperature then top-p, records
    the log-prob of the token it takes under that processed distribution (and the ``top_logprobs``
    best), and leaves only that token possible so decoding takes it. A greedy row takes the
    argmax of its (untempered) scores; a sampling row draws from its own seeded generator. The
    scores it receives are already masked by the JSON constraint, if any.

    Top-p follows transformers' ``TopPLogitsWarper``: drop the least likely tokens whose mass
    stays within ``1 - top_p``, always keeping the most likely one.
    """

    def __init__(self, specs: list[RowSpec]):
        self.greedy = [s.greedy for s in specs]
        self.temperature = torch.tensor([1.0 if s.greedy else s.temperature for s in specs])
        self.top_p = torch.tensor([1.0 if s.greedy else s.top_p for s in specs])
        self.generators = [
            None if s.greedy else torch.Generator().manual_seed(
                s.seed if s.seed is not None else int(torch.randint(0, 2**62, ()))
            )
            for s in specs
        ]  # fmt: skip
        self.k = max(s.top_logprobs for s in specs)
        self.logps: list[list[float]] = []  # per step, per row
        self.tops: list[list[list[tuple[int, float]]] | None] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if (self.temperature != 1.0).any():
            scores = scores / self.temperature.to(scores.device, scores.dtype)[:, None]
        if (self.top_p < 1.0).any():
            scores = _top_p(scores, self.top_p.to(scores.device))
        logp = torch.log_softmax(scores.float(), dim=-1).cpu()
        probs = logp.exp()
        argmax = scores.argmax(-1).cpu()
        picks = torch.stack([argmax[i] if g is None else torch.multinomial(probs[i], 1, generator=g)[0]
                             for i, g in enumerate(self.generators)])  # fmt: skip
        self.logps.append(logp.gather(-1, picks[:, None]).squeeze(-1).tolist())
        if self.k:
            values, ids = logp.topk(self.k, dim=-1)
            self.tops.append([list(zip(i, v, strict=True))
                              for i, v in zip(ids.tolist(), values.tolist(), strict=True)])  # fmt: skip
        else:
            self.tops.append(None)
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(picks)), picks.to(scores.device)] = 0.0
        return out


def _top_p(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Per-row top-p (``(B,)``), exactly ``TopPLogitsWarper``'s rule; rows at 1.0 untouched."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove = (cumulative <= (1 - top_p)[:, None]) & (top_p < 1.0)[:, None]
    remove[..., -1:] = False
    return scores.masked_fill(remove.scatter(1, sorted_indices, remove), float("-inf"))


class RowTracker:
    """Follows each row as ``generate`` runs (a stopping criterion, called after each token):
    its tokens and log-probs, its text when it has stop strings or an ``on_token``, and when and
    why it ends: EOS (``"stop"``), a stop string (``"stop"``, text cut before it) or its own
    ``max_new_tokens`` (``"length"``). Rows it has ended get padding it ignores."""

    def __init__(self, specs: list[RowSpec], sampler: RowSampler, tokenizer, eos_ids):
        self.specs, self.sampler, self.tok, self.eos = specs, sampler, tokenizer, set(eos_ids)
        n = len(specs)
        self.tokens: list[list[int]] = [[] for _ in range(n)]
        self.logps: list[list[float]] = [[] for _ in range(n)]
        self.tops: list[list] = [[] for _ in range(n)]
        self.text: list[str | None] = [None] * n
        self.finish: list[str | None] = [None] * n
        self.stop_reason: list[str | None] = [None] * n

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        logps, tops = self.sampler.logps[-1], self.sampler.tops[-1]
        for i, token in enumerate(input_ids[:, -1].tolist()):
            spec = self.specs[i]
            if self.finish[i] is not None:
                continue
            self.tokens[i].append(token)
            self.logps[i].append(float(logps[i]))
            top = tops[i][: spec.top_logprobs] if tops is not None and spec.top_logprobs else None
            self.tops[i].append(top)
            finish = "stop" if token in self.eos else None
            if spec.stop or spec.on_token is not None:
                text = self.tok.decode(self.tokens[i], skip_special_tokens=True)
                hits = [(text.find(s), s) for s in spec.stop if s in text]
                if hits and finish is None:
                    at, self.stop_reason[i] = min(hits)
                    text, finish = text[:at], "stop"
                self.text[i] = text
            if finish is None and len(self.tokens[i]) >= spec.max_new_tokens:
                finish = "length"
            self.finish[i] = finish
            if spec.on_token is not None:
                spec.on_token(TokenEvent(token, float(logps[i]), top, self.text[i], finish,
                                         self.stop_reason[i]))  # fmt: skip
        return torch.tensor([f is not None for f in self.finish], device=input_ids.device)

    def rollout(self, i: int, policy_version: str) -> Rollout:
        spec, tokens = self.specs[i], self.tokens[i]
        extra: dict = {}
        if self.stop_reason[i] is not None:
            extra["stop_reason"] = self.stop_reason[i]
        if spec.top_logprobs:
            extra["top_logprobs"] = self.tops[i]
        text = self.text[i] if self.stop_reason[i] is not None else None
        return Rollout(
            prompt_ids=list(spec.prompt),
            completion_ids=list(tokens),
            logps=list(self.logps[i]),
            text=text if text is not None else self.tok.decode(tokens, skip_special_tokens=True),
            finish_reason=self.finish[i] or "length",
            policy_version=policy_version,
            temperature=0.0 if spec.greedy else float(spec.temperature),
            greedy=bool(spec.greedy),
            top_p=1.0 if spec.greedy else float(spec.top_p),
            extra=extra,
        )
