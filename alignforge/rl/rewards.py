"""Turn sequence scores into per-token PPO rewards with a KL penalty.

    >>> import torch
    >>> from alignforge.rl.rewards import shape_rewards
    >>> scores = torch.tensor([1.0, 2.0])
    >>> logps = torch.tensor([[-1.0, -1.0, 0.0], [0.0, -2.0, -1.0]])
    >>> ref_logps = torch.tensor([[-1.5, -1.0, 0.0], [0.0, -1.0, -1.0]])
    >>> mask = torch.tensor([[1, 1, 0], [0, 1, 1]])             # right- and left-padded rows
    >>> out = shape_rewards(scores, logps, ref_logps, mask, kl_coef=0.1,
    ...                     eos_found=torch.tensor([True, False]), missing_eos_penalty=1.0)
    >>> [[round(r, 3) for r in row] for row in out.token_rewards.tolist()]
    [[-0.05, 1.0, 0.0], [0.0, 0.1, 1.0]]

Ziegler et al. (2019) and Ouyang et al. (2022): ``R(x, y) = r(x, y) - beta * KL``, with the KL
spread over tokens and the score credited to the last token; the missing-EOS penalty is TRL's
``missing_eos_penalty`` (a truncated answer is worse than a finished one).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from alignforge.losses.reduce import masked_sum
from alignforge.rl.kl import KLKind, kl_penalty


class ShapedRewards(NamedTuple):
    token_rewards: Tensor  # (B, T): -kl_coef * kl on every valid token, + score on the last one
    kl: Tensor  # (B, T): per-token KL estimate, 0 outside the mask
    non_score_reward: Tensor  # (B,): -kl_coef * sum_t kl, the part of the return not from scores


def last_valid_index(mask: Tensor) -> Tensor:
    """Index of the last position where ``mask`` is set, per row: ``(B, T) -> (B,)`` int64.

    Works for left padding, right padding and holes. Raises if a row has no valid token.
    """
    valid = mask.bool()
    empty = ~valid.any(dim=-1)
    if empty.any():
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(f"mask rows {rows} have no valid token: no place to put the score")
    positions = torch.arange(valid.shape[-1], device=valid.device).expand_as(valid)
    return torch.where(valid, positions, -1).max(dim=-1).values


def shape_rewards(
    scores: Tensor,
    logps: Tensor,
    ref_logps: Tensor,
    mask: Tensor,
    kl_coef: float,
    kl_kind: KLKind = "k1",
    eos_found: Tensor | None = None,
    missing_eos_penalty: float | None = None,
) -> ShapedRewards:
    """Per-token rewards ``r_t = -kl_coef * KL_t + [t = last] * (score - penalty)``.

    ``KL_t = kl_penalty(logps, ref_logps, kl_kind)`` on valid tokens; ``penalty`` is
    ``missing_eos_penalty`` for rows where ``eos_found`` is False (the answer was cut off), else 0.
    Computed without gradient (rewards are constants for the policy update).

    Shapes: ``scores (B,)``, ``logps``, ``ref_logps``, ``mask`` ``(B, T)``, ``eos_found (B,)``
    bool -> ``ShapedRewards``.
    """
    if missing_eos_penalty is not None and eos_found is None:
        raise ValueError("missing_eos_penalty needs eos_found (B,) telling which rows ended in EOS")
    if scores.dim() != 1 or scores.shape[0] != logps.shape[0]:
        raise ValueError(f"scores {tuple(scores.shape)} must be (B,) with B = {logps.shape[0]}")
    with torch.no_grad():
        valid = mask.bool()
        kl = torch.where(valid, kl_penalty(logps.float(), ref_logps.float(), kl_kind), 0.0)
        non_score = torch.where(valid, -kl_coef * kl, 0.0)
        scores = scores.float()
        if missing_eos_penalty is not None:
            scores = torch.where(eos_found.bool(), scores, scores - missing_eos_penalty)
        last = last_valid_index(mask)
        token_rewards = non_score.clone()
        rows = torch.arange(scores.shape[0], device=scores.device)
        token_rewards[rows, last] += scores
        return ShapedRewards(token_rewards, kl, masked_sum(non_score, valid, dim=-1))
