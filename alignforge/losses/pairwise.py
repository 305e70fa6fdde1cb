"""Bradley-Terry loss for reward models trained on preference pairs.

    >>> import torch
    >>> from alignforge.losses.pairwise import bradley_terry_loss
    >>> out = bradley_terry_loss(torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0]), center_coef=0.01)
    >>> round(float(out.loss), 4), float(out.accuracy)
    (0.6599, 0.5)

Paper: Bradley & Terry (1952); used for LM reward models by Stiennon et al. (2020) and Ouyang et
al. (2022, eq. 1). Optional margin as in Llama 2 (Touvron et al. 2023, eq. 2). Reward centering
(Eisenstein et al. 2023, "Helping or Herding?") adds ``eta * (r_c + r_r)^2`` so rewards stay near
zero: the Bradley-Terry likelihood only sees differences, leaving the offset free to drift.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class PairwiseLossOutput(NamedTuple):
    loss: Tensor  # scalar
    accuracy: Tensor  # share of pairs with r_c > r_r (ties count as wrong)
    reward_margin: Tensor  # mean(r_c - r_r)
    chosen_mean: Tensor  # mean(r_c)
    rejected_mean: Tensor  # mean(r_r)


def bradley_terry_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    margin: float | Tensor | None = None,
    center_coef: float = 0.0,
    num_pairs: int | float | Tensor | None = None,
) -> PairwiseLossOutput:
    """Pairwise logistic loss of a reward model.

    ``loss = (1/N) sum_b [ -log sigmoid(r_c - r_r - m) + center_coef * (r_c + r_r)^2 ]``

    Shapes: ``chosen_rewards (B,)``, ``rejected_rewards (B,)``, ``margin`` scalar or ``(B,)``
    (e.g. how strongly annotators preferred the chosen answer). ``N = num_pairs`` if given (pairs in
    the whole optimizer step, so micro-batch losses can be summed), else ``B``. Statistics are
    detached batch means.
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.dim() != 1:
        raise ValueError(
            f"chosen_rewards {tuple(chosen_rewards.shape)} and rejected_rewards "
            f"{tuple(rejected_rewards.shape)} must both be (B,)"
        )
    diff = chosen_rewards - rejected_rewards
    logits = diff if margin is None else diff - margin
    per_pair = -F.logsigmoid(logits)
    if center_coef:
        per_pair = per_pair + center_coef * (chosen_rewards + rejected_rewards) ** 2
    n = chosen_rewards.shape[0] if num_pairs is None else num_pairs
    loss = per_pair.sum() / torch.as_tensor(n, dtype=per_pair.dtype, device=per_pair.device)
    with torch.no_grad():
        return PairwiseLossOutput(
            loss=loss,
            accuracy=(diff > 0).float().mean(),
            reward_margin=diff.mean(),
            chosen_mean=chosen_rewards.mean(),
            rejected_mean=rejected_rewards.mean(),
        )
