"""The rollout interface shared by every generation engine.

    from alignforge.rollout import TransformersEngine
    engine = TransformersEngine(model, tokenizer, policy_version="sft-step-400")
    groups = engine.generate([prompt_ids], n=4, temperature=0.9, max_new_tokens=64, seed=0)
    for r in groups[0]:
        print(r.text, r.logp, r.finish_reason)

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
