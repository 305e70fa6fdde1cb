"""Advantage estimators: GAE (with a critic), GRPO, RLOO and REINFORCE++ (without one).

    >>> import torch
    >>> from alignforge.rl.advantages import gae, grpo_advantages, compute_advantages
    >>> rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]])     # score on the last response token
    >>> values = torch.tensor([[0.5, 0.6, 0.7, 0.0]])
    >>> mask = torch.tensor([[1, 1, 1, 0]])                 # right padding
    >>> [round(a, 4) for a in gae(rewards, values, mask, gamma=1.0, lam=1.0).advantages[0].tolist()]
    [0.5, 0.4, 0.3, 0.0]
    >>> adv = grpo_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), group_size=2)
    >>> [round(a, 4) for a in adv.tolist()]
    [0.7071, -0.7071, -0.7071, 0.7071]

Padding: every estimator skips tokens outside ``mask`` as if they were not there, so left
padding, right padding and holes (e.g. tool output inside a response) all work; advantages and
returns are 0 outside the mask.

``ADVANTAGE_ESTIMATORS`` maps a config name to an adapter with one signature,
``(token_rewards, mask, values=None, group_size=None, gamma=1.0, lam=0.95) -> AdvantageOutput``
with token-level ``(B, T)`` outputs; :func:`compute_advantages` dispatches by name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from alignforge.losses.reduce import masked_sum, masked_whiten


class AdvantageOutput(NamedTuple):
    advantages: Tensor  # (B, T), 0 outside the mask (or (B,) for the sequence-level functions)
    returns: Tensor  # (B, T) value targets / discounted returns, 0 outside the mask


def _check_bt(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or any(s != first for s in shapes.values()):
        raise ValueError(f"expected tensors of one shape (B, T); got {shapes}")


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95
) -> AdvantageOutput:
    """Generalised advantage estimation (Schulman et al. 2016, eq. 16), a backward scan over T.

    Over the valid tokens ``t_1 < t_2 < ... < t_n`` of each row (masked positions are skipped,
    and the value after the last valid token is 0 since the episode ends there):
    ``delta_k = r_k + gamma * V_{k+1} - V_k``, ``A_k = delta_k + gamma * lam * A_{k+1}``,
    ``returns_k = A_k + V_k``. Vectorised over the batch; one step per position.

    Shapes: ``rewards``, ``values``, ``mask`` ``(B, T)`` -> advantages, returns ``(B, T)``.
    Inputs are treated as constants (computed under ``no_grad``).
    """
    _check_bt(rewards=rewards, values=values, mask=mask)
    with torch.no_grad():
        valid = mask.bool()
        rewards, values = rewards.float(), values.float()
        advantages = torch.zeros_like(rewards)
        next_value = rewards.new_zeros(rewards.shape[0])
        next_adv = rewards.new_zeros(rewards.shape[0])
        for t in reversed(range(rewards.shape[1])):
            m = valid[:, t]
            delta = rewards[:, t] + gamma * next_value - values[:, t]
            adv_t = delta + gamma * lam * next_adv
            advantages[:, t] = torch.where(m, adv_t, 0.0)
            # a masked position is "not there": the carry passes through it unchanged
            next_value = torch.where(m, values[:, t], next_value)
            next_adv = torch.where(m, adv_t, next_adv)
        returns = torch.where(valid, advantages + values, 0.0)
        return AdvantageOutput(advantages, returns)


def discounted_returns(rewards: Tensor, mask: Tensor, gamma: float = 1.0) -> Tensor:
    """Reward-to-go ``G_t = sum_{k >= t} gamma^(k - t) r_k`` over valid tokens; ``(B, T)``.

    Equal to :func:`gae` with zero values and ``lam = 1``.
    """
    return gae(rewards, torch.zeros_like(rewards), mask, gamma=gamma, lam=1.0).returns


def _groups(scores: Tensor, group_size: int) -> Tensor:
    if scores.dim() != 1:
        raise ValueError(f"scores must be (B,), got {tuple(scores.shape)}")
    if group_size < 1 or scores.shape[0] % group_size:
        raise ValueError(
            f"group_size={group_size} must be >= 1 and divide the batch size {scores.shape[0]}; "
            "scores must hold group_size consecutive samples per prompt"
        )
    return scores.float().view(-1, group_size)


def grpo_advantages(
    scores: Tensor, group_size: int, eps: float = 1e-6, scale: bool = True
) -> Tensor:
    """Group-normalised advantages of GRPO (Shao et al. 2024, section 4.1.2).

    ``A_i = (s_i - mean_g(s)) / (std_g(s) + eps)`` over the ``group_size`` samples of the same
    prompt (consecutive in ``scores``); ``std`` is the unbiased sample std as in TRL.
    ``scale=False`` drops the division (Dr. GRPO, Liu et al. 2025), which removes the
    up-weighting of prompts whose answers all score alike.

    Shapes: ``scores (B,)`` with ``B = n_prompts * group_size`` -> ``(B,)``.
    """
    groups = _groups(scores, group_size)
    if scale and group_size < 2:
        raise ValueError("group_size must be >= 2 to normalise by the group std (or scale=False)")
    centred = groups - groups.mean(dim=1, keepdim=True)
    if scale:
        centred = centred / (groups.std(dim=1, keepdim=True) + eps)
    return centred.view(-1)


def rloo_advantages(scores: Tensor, group_size: int) -> Tensor:
    """REINFORCE leave-one-out advantages (Ahmadian et al. 2024, eq. 5; Kool et al. 2019).

    ``A_i = s_i - (1 / (k - 1)) sum_{j != i} s_j = k / (k - 1) * (s_i - mean(s))`` over the
    ``k = group_size`` samples of a prompt. Shapes: ``scores (B,)`` -> ``(B,)``.
    """
    groups = _groups(scores, group_size)
    if group_size < 2:
        raise ValueError("group_size must be >= 2 for a leave-one-out baseline")
    baseline = (groups.sum(dim=1, keepdim=True) - groups) / (group_size - 1)
    return (groups - baseline).view(-1)


def reinforce_pp_advantages(
    token_rewards: Tensor, mask: Tensor, gamma: float = 1.0
) -> AdvantageOutput:
    """REINFORCE++ (Hu 2025): discounted returns, then whitened across the whole batch.

    ``G_t = sum_{k >= t} gamma^(k - t) r_k`` (the rewards already carry the per-token KL
    penalty, see :func:`alignforge.rl.rewards.shape_rewards`), ``A = (G - mean(G)) / std(G)``
    over every valid token of the batch. Shapes: ``(B, T)`` -> advantages, returns ``(B, T)``.
    """
    _check_bt(token_rewards=token_rewards, mask=mask)
    returns = discounted_returns(token_rewards, mask, gamma=gamma)
    return AdvantageOutput(masked_whiten(returns, mask), returns)


def _broadcast(per_seq: Tensor, mask: Tensor) -> Tensor:
    return torch.where(mask.bool(), per_seq.unsqueeze(-1), 0.0)


def _gae_estimator(token_rewards, mask, values=None, group_size=None, gamma=1.0, lam=0.95):
    if values is None:
        raise ValueError("advantage estimator 'gae' needs values from a critic")
    return gae(token_rewards, values, mask, gamma=gamma, lam=lam)


def _group_estimator(fn: Callable[[Tensor, int], Tensor], name: str):
    def estimator(token_rewards, mask, values=None, group_size=None, gamma=1.0, lam=0.95):
        if group_size is None:
            raise ValueError(f"advantage estimator {name!r} needs group_size")
        scores = masked_sum(token_rewards.float(), mask, dim=-1)
        return AdvantageOutput(_broadcast(fn(scores, group_size), mask), _broadcast(scores, mask))

    estimator.__doc__ = f"Sequence-level {name} advantage broadcast to every valid token."
    return estimator


def _reinforce_pp_estimator(token_rewards, mask, values=None, group_size=None, gamma=1.0, lam=0.95):
    return reinforce_pp_advantages(token_rewards, mask, gamma=gamma)


ADVANTAGE_ESTIMATORS: dict[str, Callable[..., AdvantageOutput]] = {
    "gae": _gae_estimator,
    "grpo": _group_estimator(grpo_advantages, "grpo"),
    "rloo": _group_estimator(rloo_advantages, "rloo"),
    "reinforce_pp": _reinforce_pp_estimator,
}


def compute_advantages(
    estimator: str,
    token_rewards: Tensor,
    mask: Tensor,
    values: Tensor | None = None,
    group_size: int | None = None,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> AdvantageOutput:
    """Token-level advantages ``(B, T)`` by the estimator named in the config.

    ``gae`` needs ``values``; ``grpo`` and ``rloo`` need ``group_size`` and use the summed
    ``token_rewards`` of each sequence as its score (so keep the KL penalty out of the rewards
    for them, as GRPO puts it in the loss); ``reinforce_pp`` uses the token rewards directly.
    """
    if estimator not in ADVANTAGE_ESTIMATORS:
        raise ValueError(
            f"advantage estimator {estimator!r} is not one of {', '.join(ADVANTAGE_ESTIMATORS)}"
        )
    return ADVANTAGE_ESTIMATORS[estimator](
        token_rewards, mask, values=values, group_size=group_size, gamma=gamma, lam=lam
    )
