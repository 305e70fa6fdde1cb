"""From scored rollouts to what PPO's mini-batches train on: old/ref log-probs, values,
importance weights, KL-shaped rewards and advantages.

    prepared, stats = prepare_rollouts(model, head, batch, scores, settings, reduce_sum)

``reduce_sum`` sums a tensor over processes (identity on one), so batch-level statistics
(advantage whitening, the logged KL) are those of the global batch: N processes compute what one
process would on their union. Everything here is computed without gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from alignforge.losses.importance import importance_weights, offpolicy_diagnostics
from alignforge.models import disabled_adapter
from alignforge.rl.advantages import compute_advantages, discounted_returns
from alignforge.rl.kl import kl_penalty
from alignforge.rl.policy import token_logps, token_values
from alignforge.rl.rewards import shape_rewards
from alignforge.rollout.batch import trim_padding


@dataclass(frozen=True)
class PrepareSettings:
    """What preparation needs to know (explicit, not the whole config)."""

    estimator: str  # gae | grpo | rloo | reinforce_pp
    group_size: int
    temperature: float
    chunk_size: int
    kl_coef: float
    kl_estimator: str
    kl_in_reward: bool
    gamma: float = 1.0
    lam: float = 0.95
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = None
    correction: str = "none"  # none | truncate | mask
    level: str = "token"
    lower: float | None = None
    upper: float | None = 2.0
    old_logps: str = "decoupled"  # decoupled | bypass
    reference: bool = True  # False: no reference pass (nothing reads the KL: coefficient 0, fixed)


def global_whiten(x: Tensor, mask: Tensor, reduce_sum, eps: float = 1e-8) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` with the mean and unbiased variance of the masked
    elements of every process (``masked_whiten`` of the global batch); 0 outside the mask."""
    m = mask.float()
    n = reduce_sum(m.sum())
    mean = reduce_sum((x * m).sum()) / n
    var = reduce_sum((((x - mean) * m) ** 2).sum()) / (n - 1).clamp_min(1)
    return torch.where(mask.bool(), (x - mean) * torch.rsqrt(var + eps), 0.0)


@torch.no_grad()
def score_batch(model, head, batch: dict, temperature: float, chunk_size: int, reference=True):
    """Policy and reference log-probs and values ``(B, L-1)``, ``chunk_size`` rows at a time,
    rows of similar length together, each chunk cut to its own longest row. Without
    ``reference`` (or ``head``) that output is None and its forward pass is not run."""
    mask = batch["mask"]
    out = [torch.zeros(mask.shape, device=mask.device) for _ in range(3)]
    order = batch["attention_mask"].sum(-1).argsort()
    was_training = model.training
    model.eval()
    for chunk in order.split(chunk_size):
        mb = trim_padding({k: v[chunk] for k, v in batch.items()})
        w = mb["mask"].shape[1]
        out[0][chunk, :w] = token_logps(model, mb, temperature)
        if reference:
            with disabled_adapter(model):
                out[1][chunk, :w] = token_logps(model, mb, temperature)
        if head is not None:
            out[2][chunk, :w] = token_values(model, head, mb) * mb["mask"]
    model.train(was_training)
    return out[0], out[1] if reference else None, out[2] if head is not None else None


def _correction(trainer_old: Tensor, batch: dict, s: PrepareSettings):
    mask = batch["mask"]
    if s.correction == "none":
        diag = offpolicy_diagnostics(trainer_old, batch["rollout_logps"], mask, level=s.level)
        return None, mask, diag
    iw = importance_weights(
        trainer_old, batch["rollout_logps"], mask, level=s.level, mode=s.correction,
        lower=s.lower, upper=s.upper,
    )  # fmt: skip
    return iw.weights, iw.mask, iw.diagnostics


@torch.no_grad()
def prepare_rollouts(model, head, batch: dict, scores: Tensor, s: PrepareSettings, reduce_sum):
    """The tensors of one PPO iteration and its statistics (global over processes)."""
    mask = batch["mask"]
    trainer_old, ref, values = score_batch(
        model, head, batch, s.temperature, s.chunk_size, s.reference
    )
    weights, loss_mask, diag = _correction(trainer_old, batch, s)
    old = batch["rollout_logps"] if s.old_logps == "bypass" else trainer_old
    shaped = shape_rewards(
        scores.to(mask.device),
        trainer_old,
        trainer_old if ref is None else ref,  # no reference: the coefficient is 0
        mask,
        kl_coef=s.kl_coef if s.kl_in_reward else 0.0,
        kl_kind=s.kl_estimator,
        eos_found=batch["eos"],
        missing_eos_penalty=s.missing_eos_penalty,
    )
    if s.estimator == "reinforce_pp":  # returns whitened over the global batch
        returns = discounted_returns(shaped.token_rewards, mask, gamma=s.gamma)
        advantages = global_whiten(returns, mask, reduce_sum)
    else:
        adv = compute_advantages(
            s.estimator, shaped.token_rewards, mask, values=values, group_size=s.group_size,
            gamma=s.gamma, lam=s.lam,
        )  # fmt: skip
        returns, advantages = adv.returns, adv.advantages
        if s.whiten_advantages and s.estimator == "gae":
            advantages = global_whiten(advantages, mask, reduce_sum) * mask
    n_rows = reduce_sum(torch.tensor(float(mask.shape[0])))
    prepared = dict(
        batch, old_logps=old, ref_logps=ref, values=values, returns=returns,
        advantages=advantages, weights=weights, loss_mask=loss_mask,
    )  # fmt: skip
    stats = {
        "kl_coef": s.kl_coef,
        "reward/non_score": float(reduce_sum(shaped.non_score_reward.sum()) / n_rows),
        **diag.as_dict(),
    }
    if ref is not None:
        kl_seq = (kl_penalty(trainer_old, ref, s.kl_estimator) * mask).sum(-1)
        stats["kl"] = float(reduce_sum(kl_seq.sum()) / n_rows)
    return prepared, stats
