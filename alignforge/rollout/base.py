"""The rollout interface shared by every generation engine.

    from alignforge.rollout import TransformersEngine
    engine = TransformersEngine(model, tokenizer, policy_version="sft-step-400")
    groups = engine.generate([prompt_ids], n=4, temperature=0.9, max_new_tokens=64, seed=0)
    for r in groups[0]:
        print(r.text, r.logp, r.finish_reason)

:func:`build_rollout_engine` builds either engine from explicit arguments (PPO's rollouts go
through it): in process, or over HTTP from vLLM / ``alignforge serve``
(:class:`~alignforge.rollout.server_engine.ServerEngine`)::

    engine = build_rollout_engine("server", base_urls="http://127.0.0.1:8000/v1", tokenizer=tok)

:func:`checkpoint_engine` generates as a saved checkpoint: loaded in process, or loaded by the
servers first (``alignforge serve``'s ``/v1/load_weights``), as preference sampling does::

    engine, tok = checkpoint_engine("runs/sft-merged", "server", base_urls=url, policy_version=fp)

A :class:`Rollout` carries the token ids, the *behaviour* per-token log-probs (those of the
distribution the token was actually drawn from, after temperature and top-p) and the identity
of the policy that produced it, so PPO, SPIN and preference sampling can refuse or correct
off-policy data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass
class Rollout:
    """One completion of one prompt.

    ``logps[t]`` is log pi_behaviour(completion_ids[t] | prompt, completion_ids[:t]); ``logp`` is
    their sum (the joint log-probability of the completion).
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    logps: list[float]
    text: str
    finish_reason: str  # "stop" (EOS emitted) | "length" (max_new_tokens reached)
    policy_version: str
    temperature: float
    greedy: bool
    top_p: float = 1.0
    extra: dict = field(default_factory=dict)

    @property
    def logp(self) -> float:
        return float(sum(self.logps))

    @property
    def n_tokens(self) -> int:
        return len(self.completion_ids)


@runtime_checkable
class RolloutEngine(Protocol):
    """Anything that turns prompt token ids into ``n`` rollouts per prompt."""

    policy_version: str

    def generate(
        self,
        prompts: list[list[int]],
        *,
        n: int = 1,
        temperature: float = 1.0,
        top_p: float = 1.0,
        max_new_tokens: int = 128,
        greedy: bool = False,
        seed: int | None = None,
    ) -> list[list[Rollout]]: ...


def build_rollout_engine(
    kind: str,
    *,
    model=None,
    tokenizer=None,
    base_urls: str | list[str] | None = None,
    served_model: str | None = None,
    eos_token_ids: list[int] | None = None,
    policy_version: str = "0",
    batch_size: int = 8,
    api_key: str | None = None,
) -> RolloutEngine:
    """The engine every stage that samples goes through.

    ``kind="transformers"``: ``model`` and ``tokenizer`` in this process (``batch_size`` sequences
    at a time). ``kind="server"``: the ``/v1/completions`` route of ``base_urls`` (vLLM or
    ``alignforge serve``), requests naming ``served_model`` (the served model, or the first one
    ``/v1/models`` lists) and rollouts ending at ``eos_token_ids`` (default: the tokenizer's).
    """
    if kind == "transformers":
        from alignforge.rollout.transformers_engine import TransformersEngine

        return TransformersEngine(model, tokenizer, policy_version, batch_size)
    if kind == "server":
        from alignforge.rollout.server_engine import ServerEngine, served_models

        if not base_urls:
            raise ValueError("the server rollout engine needs base_urls")
        if eos_token_ids is None:
            eos_token_ids = [tokenizer.eos_token_id]
        if served_model is None:
            first = base_urls if isinstance(base_urls, str) else base_urls[0]
            served_model = served_models(first, api_key)[0]
        return ServerEngine(base_urls, served_model, eos_token_ids, policy_version=policy_version,
                            api_key=api_key)  # fmt: skip
    raise ValueError(f"unknown rollout engine {kind!r}: expected transformers or server")


def checkpoint_engine(
    path: str,
    kind: str = "transformers",
    *,
    base_urls: str | list[str] | None = None,
    served_model: str | None = None,
    policy_version: str = "0",
    batch_size: int = 8,
    api_key: str | None = None,
) -> tuple[RolloutEngine, object]:
    """``(engine, tokenizer)`` generating as the model saved at ``path`` (a directory, adapter
    directory, ``default`` or hub id), its rollouts tagged ``policy_version``.

    ``kind="transformers"`` loads it here. ``kind="server"`` has the servers at ``base_urls``
    load it (``alignforge serve``'s ``/v1/load_weights``; ``path`` must be readable there), so
    what they sample is that checkpoint: a server that cannot load weights (vLLM's OpenAI server)
    is refused with what to do.
    """
    if kind == "transformers":
        from alignforge.rollout.server import _load_model

        model, tok = _load_model(path)
        return build_rollout_engine(kind, model=model, tokenizer=tok, batch_size=batch_size,
                                    policy_version=policy_version), tok  # fmt: skip
    if kind != "server":
        raise ValueError(f"unknown rollout engine {kind!r}: expected transformers or server")
    from alignforge.models import load_tokenizer
    from alignforge.rollout.weight_sync import WeightSync

    tok = load_tokenizer(path)
    engine = build_rollout_engine(kind, tokenizer=tok, base_urls=base_urls, api_key=api_key,
                                  served_model=served_model, policy_version=policy_version)  # fmt: skip
    engine.check()
    sync = WeightSync(base_urls, ".", adapter=None, api_key=api_key)  # loads, never saves
    sync.check(
        f"rollout_base_url: this server cannot load new weights (vLLM's OpenAI server cannot), so "
        f"it cannot be made to sample {path}; serve it with alignforge serve, or set "
        "rollout_engine: transformers"
    )
    sync.load_saved(path, policy_version)
    return engine, tok
