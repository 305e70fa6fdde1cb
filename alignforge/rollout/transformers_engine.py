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

from collections.abc import Sequence

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
        streamer=None,
    ) -> list[list[Rollout]]:
        """``n`` rollouts for each prompt (token id lists).

        Each sample draws from its own generator, seeded from ``seed`` (one per prompt when a
        list), the prompt's position and the sample's index: a prompt's samples do not depend on
        which other prompts share its batch or its process.

        ``json_schema`` constrains the output to JSON valid for that schema (see
        :mod:`alignforge.rollout.constrained`); a list gives one schema, or ``None`` for free
        text, per prompt. ``streamer`` (a transformers streamer, one prompt and ``n=1`` only)
        receives tokens as they are made.
        """
        if streamer is not None and (len(prompts) != 1 or n != 1):
            raise ValueError("streaming needs exactly one prompt and n=1")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if not greedy and temperature <= 0:
            greedy = True  # temperature 0 means deterministic decoding (OpenAI convention)
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        seeds = _prompt_seeds(seed, len(prompts))
        rows = [(p, j) for p in range(len(prompts)) for j in range(n)]
        for p, ids in enumerate(prompts):
            if not ids:
                raise ValueError(f"prompt {p} is empty")
        # Similar lengths share a batch so left padding stays short.
        rows.sort(key=lambda r: len(prompts[r[0]]))
        out: list[list[Rollout | None]] = [[None] * n for _ in prompts]
        constraints = self._constraints(json_schema, len(prompts))
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(rows), self.batch_size):
                chunk = rows[start : start + self.batch_size]
                batch = [prompts[p] for p, _ in chunk]
                gens = [_row_generator(seeds[p], j) for p, j in chunk]
                matchers = [c.matcher() if (c := constraints[p]) is not None else None
                            for p, _ in chunk]  # fmt: skip
                results = self._generate_batch(
                    batch, temperature, top_p, max_new_tokens, greedy, matchers, streamer, gens
                )
                for (p, j), rollout in zip(chunk, results, strict=True):
                    out[p][j] = rollout
        finally:
            self.model.train(was_training)
        return out  # type: ignore[return-value]

    def _constraints(self, json_schema, n_prompts: int) -> list:
        """One compiled :class:`JsonConstraint` (or ``None``) per prompt."""
        from alignforge.rollout.constrained import json_constraint

        if not isinstance(json_schema, list):
            json_schema = [json_schema] * n_prompts
        if len(json_schema) != n_prompts:
            raise ValueError(f"{len(json_schema)} json schemas for {n_prompts} prompts")
        return [
            json_constraint(self.tokenizer, s, self.eos_ids) if s is not None else None
            for s in json_schema
        ]

    def _generate_batch(
        self, batch, temperature, top_p, max_new_tokens, greedy, matchers, streamer, gens
    ):
        from transformers import GenerationConfig, LogitsProcessorList
        from transformers.generation.logits_process import (
            TemperatureLogitsWarper,
            TopPLogitsWarper,
        )

        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for i, ids in enumerate(batch):
            input_ids[i, width - len(ids) :] = torch.tensor(ids)
            attention[i, width - len(ids) :] = 1
        processors = LogitsProcessorList()
        if any(m is not None for m in matchers):
            from alignforge.rollout.constrained import JsonLogitsProcessor

            # the mask comes first: temperature and top-p then act on the allowed tokens only
            processors.append(JsonLogitsProcessor(matchers, pad_id=self.pad_id))
        sampler = None
        if not greedy:
            warpers = []
            if temperature != 1.0:
                warpers.append(TemperatureLogitsWarper(float(temperature)))
            if top_p < 1.0:
                warpers.append(TopPLogitsWarper(float(top_p)))
            sampler = RowSampler(warpers, gens)
            processors.append(sampler)
        # A fresh config so the checkpoint's own sampling defaults (top_k=50, ...) do not leak in.
        # The RowSampler draws each row's token, so decoding picks it greedily.
        config = GenerationConfig(
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=self.eos_ids or None,
            pad_token_id=self.pad_id,
            top_k=0,
            top_p=1.0,
            temperature=1.0,
            output_scores=True,
            return_dict_in_generate=True,
        )
        gen = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            generation_config=config,
            logits_processor=processors,
            streamer=streamer,
        )
        new_tokens = gen.sequences[:, width:].cpu()
        if sampler is not None:
            step_logps = torch.stack(sampler.logps, dim=1)
        else:
            step_logps = torch.stack(
                [
                    torch.log_softmax(s.float(), dim=-1)
                    .gather(-1, new_tokens[:, t : t + 1].to(s.device))
                    .squeeze(-1)
                    .cpu()
                    for t, s in enumerate(gen.scores)
                ],
                dim=1,
            )
        return [
            self._to_rollout(
                batch[i], new_tokens[i].tolist(), step_logps[i].tolist(), temperature, top_p, greedy
            )
            for i in range(len(batch))
        ]

    def _to_rollout(self, prompt, tokens, logps, temperature, top_p, greedy) -> Rollout:
        end = next((t for t, tok in enumerate(tokens) if tok in self.eos_ids), None)
        finish = "stop" if end is not None else "length"
        keep = len(tokens) if end is None else end + 1
        completion = tokens[:keep]
        return Rollout(
            prompt_ids=list(prompt),
            completion_ids=completion,
            logps=[float(x) for x in logps[:keep]],
            text=self.tokenizer.decode(completion, skip_special_tokens=True),
            finish_reason=finish,
            policy_version=self.policy_version,
            temperature=0.0 if greedy else float(temperature),
            greedy=bool(greedy),
            top_p=1.0 if greedy else float(top_p),
        )


def _prompt_seeds(seed: int | list[int] | None, n: int) -> list[int]:
    """One seed per prompt: the given list, ``seed`` + the prompt's position, or drawn from torch's RNG."""
    if isinstance(seed, list | tuple):
        if len(seed) != n:
            raise ValueError(f"{len(seed)} seeds for {n} prompts")
        return [int(s) for s in seed]
    if seed is None:
        return torch.randint(0, 2**62, (n,)).tolist()
    return [int(seed) * 1_000_003 + p for p in range(n)]


def _row_generator(seed: int, sample: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 7919 + sample) % (2**63))


class RowSampler:
    """A logits processor that samples each row from its own generator after the warpers
    (temperature, top-p), records the sampled token's log-prob under that processed
    distribution, and leaves only that token possible so decoding takes it. The scores it
    receives are already masked by the JSON constraint, if any."""

    def __init__(self, warpers, generators: list[torch.Generator]):
        self.warpers, self.generators = warpers, generators
        self.logps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        for w in self.warpers:
            scores = w(input_ids, scores)
        logp = torch.log_softmax(scores.float(), dim=-1).cpu()
        probs = logp.exp()
        picks = torch.cat(
            [torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(self.generators)]
        )
        self.logps.append(logp.gather(-1, picks[:, None]).squeeze(-1))
        out = torch.full_like(scores, float("-inf"))
        out[torch.arange(len(picks)), picks.to(scores.device)] = 0.0
        return out
