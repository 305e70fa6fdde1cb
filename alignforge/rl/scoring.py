"""Scores of sampled answers: a reward model, a programmatic reward function, or both.

    scorer = Scorer(reward_model=rm, reward_fn=load_reward_fn("alignforge.rl.scoring:length_reward"),
                    fn_kwargs={"target_length": 32})
    total, rm_scores, fn_scores = scorer(prompts, rollouts)

A reward function is called on the whole global batch (every process passes the same gathered
prompts and answers), so a stateful or batch-level reward (the marginal task reward) behaves the
same on 1 and N processes. The reward model scores each process's own answers.
"""

from __future__ import annotations

import importlib

import torch

from alignforge.config import ConfigError
from alignforge.rollout import Rollout


def load_reward_fn(spec: str):
    """``module:function`` -> the function; errors say what is wrong with the spec."""
    if ":" not in spec:
        raise ConfigError(f"reward_fn: {spec!r} must look like `package.module:function`")
    mod_name, fn_name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward_fn: cannot load {spec!r}: {e}") from e
    if not callable(fn):
        raise ConfigError(f"reward_fn: {spec!r} is not callable")
    return fn


def token_fraction(prompts, completions, completion_ids, target_ids: list[int]) -> list[float]:
    """Share of completion tokens that are one of ``target_ids`` (a simple learnable reward)."""
    target = set(target_ids)
    return [sum(t in target for t in ids) / max(len(ids), 1) for ids in completion_ids]


def length_reward(prompts, completions, completion_ids, target_length: int) -> list[float]:
    """``1 - |len - target| / target``: answers of ``target_length`` tokens score 1."""
    return [1.0 - abs(len(ids) - target_length) / target_length for ids in completion_ids]


def rm_input_ids(
    rm_tokenizer,
    prompt,
    text: str,
    finished: bool,
    max_length: int,
    max_prompt_length: int | None = None,
) -> list[int]:
    """What the reward model reads: a finished answer exactly as the RM was trained on pairs
    (chat template, end-of-turn included); an answer cut off at ``max_new_tokens`` without the
    end-of-turn, so the RM sees that it was truncated. Over-long inputs are cut by the rule the
    RM was trained with (:func:`alignforge.data.preference.cut`): the prompt's last
    ``max_prompt_length`` tokens, the answer's first ones."""
    from alignforge.data.preference import cut
    from alignforge.models.heads import encode_pair
    from alignforge.rollout import chat_prompt_ids

    if finished:
        return encode_pair(rm_tokenizer, prompt, text, max_length, max_prompt_length)
    p_ids = chat_prompt_ids(rm_tokenizer, prompt)
    a_ids = rm_tokenizer.encode(text, add_special_tokens=False)
    p_ids, a_ids = cut(p_ids, a_ids, max_length, max_prompt_length)
    return p_ids + a_ids  # fmt: skip


@torch.no_grad()
def rm_scores(rm, prompts: list, rollouts: list[Rollout], batch_size: int = 8) -> torch.Tensor:
    """Reward-model scores ``(B,)`` of each rollout, truncation visible to the model."""
    from alignforge.models.heads import pad_left

    ids = [
        rm_input_ids(
            rm.tokenizer,
            p,
            r.text,
            r.finish_reason == "stop",
            rm.max_length,
            rm.max_prompt_length,
        )  # fmt: skip
        for p, r in zip(prompts, rollouts, strict=True)
    ]
    device = next(rm.parameters()).device
    out = []
    for i in range(0, len(ids), batch_size):
        b = pad_left(ids[i : i + batch_size], rm.tokenizer.pad_token_id)
        out.append(rm(b["input_ids"].to(device), b["attention_mask"].to(device)).float().cpu())
    return torch.cat(out)


class Scorer:
    """RM score x weight + reward_fn x weight, per rollout."""

    def __init__(self, reward_model=None, reward_fn=None, fn_kwargs=None, w_rm=1.0, w_fn=1.0):
        self.rm, self.fn, self.fn_kwargs = reward_model, reward_fn, dict(fn_kwargs or {})
        self.w_rm, self.w_fn = w_rm, w_fn

    def state_dict(self):
        """The reward function's own state, when it keeps one (``fn.state_dict()``): a
        checkpoint holds it so a resumed run rewards exactly as the uninterrupted one."""
        return self.fn.state_dict() if hasattr(self.fn, "state_dict") else None

    def load_state_dict(self, state) -> None:
        if state is not None and hasattr(self.fn, "load_state_dict"):
            self.fn.load_state_dict(state)

    def reward_fn_scores(self, prompts: list, rollouts: list[Rollout]) -> torch.Tensor:
        texts = [r.text for r in rollouts]
        ids = [r.completion_ids for r in rollouts]
        values = self.fn(prompts=prompts, completions=texts, completion_ids=ids, **self.fn_kwargs)
        scores = torch.tensor([float(v) for v in values], dtype=torch.float32)
        if scores.shape != (len(rollouts),) or not torch.isfinite(scores).all():
            raise ValueError(f"reward_fn returned {values!r}: need one finite float per completion")
        return scores

    def __call__(self, prompts, rollouts, global_prompts=None, global_rollouts=None, offset=0):
        """(total (B,), rm scores or None, reward_fn scores or None) of this process's rollouts.

        ``global_*`` are every process's prompts and rollouts in rank order (the reward function
        sees them all) and ``offset`` is where this process's rows start among them.
        """
        total = torch.zeros(len(rollouts))
        rm = fn = None
        if self.rm is not None:
            rm = rm_scores(self.rm, prompts, rollouts)
            total += self.w_rm * rm
        if self.fn is not None:
            gp = prompts if global_prompts is None else global_prompts
            gr = rollouts if global_rollouts is None else global_rollouts
            fn = self.reward_fn_scores(gp, gr)[offset : offset + len(rollouts)]
            total += self.w_fn * fn
        return total, rm, fn


def build_scorer(
    reward_model: str | None, reward_fn: str | None, fn_kwargs: dict, w_rm: float, w_fn: float,
    cache: str | None, acc,
) -> Scorer:  # fmt: skip
    """A :class:`Scorer` from the config's names: the RM loaded and placed on ``acc``'s device."""
    from alignforge.models.heads import load_reward_model
    from alignforge.training import place_frozen

    rm = load_reward_model(reward_model, cache=cache) if reward_model else None
    fn = load_reward_fn(reward_fn) if reward_fn else None
    return Scorer(place_frozen(acc, rm), fn, fn_kwargs, w_rm, w_fn)
