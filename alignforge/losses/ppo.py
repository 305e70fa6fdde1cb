"""PPO clipped policy loss and clipped value loss, per token with a mask.

    >>> import torch
    >>> from alignforge.losses.ppo import ppo_policy_loss, ppo_value_loss
    >>> logps = torch.tensor([[-1.0, -2.0, -0.5]], requires_grad=True)
    >>> old_logps = torch.tensor([[-1.0, -2.5, -0.5]])
    >>> adv, mask = torch.tensor([[1.0, 1.0, -1.0]]), torch.tensor([[1, 1, 0]])
    >>> out = ppo_policy_loss(logps, old_logps, adv, mask, clip_eps=0.2)
    >>> round(out.loss.item(), 4), out.clipfrac.item()        # (-1 + -1.2) / 2; token 2 clipped
    (-1.1, 0.5)

Sign convention: the functions return losses to *minimise*, i.e. the negated PPO objective.
Deviations from Schulman et al. (2017) are listed in ``docs/papers.md``: token-level ratios
(as every LM implementation), asymmetric clipping (``clip_eps_high``, DAPO's "clip-higher"),
dual clipping for negative advantages (Ye et al. 2020), and importance weights for off-policy
rollouts (see :mod:`alignforge.losses.importance`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from alignforge.losses.reduce import (
    AggregationMode,
    aggregate_loss,
    masked_mean,
    masked_var,
)


class PolicyLossOutput(NamedTuple):
    loss: Tensor  # scalar
    clipfrac: Tensor  # share of masked tokens where the ratio clip cut the gradient
    approx_kl: Tensor  # k3 estimate of KL(old || new) over masked tokens
    ratio_mean: Tensor  # mean of exp(logps - old_logps) over masked tokens
    ratio_max: Tensor  # max of the ratio over masked tokens (0 if none)
    dual_clipfrac: Tensor  # share of masked tokens bounded by the dual clip


class ValueLossOutput(NamedTuple):
    loss: Tensor  # scalar
    clipfrac: Tensor  # share of masked tokens where the clipped error was the larger one
    explained_variance: Tensor  # 1 - Var(R - v) / Var(R) over masked tokens


def _masked_max(x: Tensor, mask: Tensor) -> Tensor:
    m = mask.bool()
    if not m.any():
        return torch.zeros((), dtype=x.dtype, device=x.device)
    return x[m].max()


def ppo_policy_loss(
    logps: Tensor,
    old_logps: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_eps: float = 0.2,
    clip_eps_high: float | None = None,
    dual_clip: float | None = None,
    is_weights: Tensor | None = None,
    num_tokens: int | float | Tensor | None = None,
    mode: AggregationMode = "token_mean",
) -> PolicyLossOutput:
    """Clipped surrogate loss (Schulman et al. 2017, eq. 7), per token.

    ``rho = exp(logps - old_logps)``,
    ``L = max(-A rho, -A clip(rho, 1 - eps_low, 1 + eps_high))`` with ``eps_low = clip_eps`` and
    ``eps_high = clip_eps_high or clip_eps``. With ``dual_clip = c > 1`` tokens with ``A < 0`` are
    further bounded, ``L = min(L, -c A)``, so a huge ratio on a bad token cannot blow up the loss.
    ``is_weights`` (off-policy correction, detached here) multiply ``L``. The per-token loss is
    reduced by :func:`aggregate_loss` with ``mode`` and ``num_tokens``.

    Shapes: ``logps``, ``old_logps``, ``advantages``, ``mask``, ``is_weights`` all ``(B, T)``
    -> scalar loss plus detached statistics over masked tokens.
    """
    if clip_eps <= 0 or (clip_eps_high is not None and clip_eps_high <= 0):
        raise ValueError(f"clip_eps={clip_eps} and clip_eps_high={clip_eps_high} must be > 0")
    if dual_clip is not None and dual_clip <= 1.0:
        raise ValueError(f"dual_clip={dual_clip} must be > 1 (Ye et al. 2020)")
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    advantages = advantages.detach()
    log_ratio = logps - old_logps.detach()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    per_token = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(per_token, dtype=torch.bool)
    if dual_clip is not None:
        bound = -advantages * dual_clip
        dual = (advantages < 0) & (per_token > bound)
        per_token = torch.where(dual, bound, per_token)
    if is_weights is not None:
        per_token = per_token * is_weights.detach()
    loss = aggregate_loss(per_token, mask, mode=mode, num_tokens=num_tokens)
    with torch.no_grad():
        return PolicyLossOutput(
            loss=loss,
            clipfrac=masked_mean((clipped > unclipped).float(), mask),
            approx_kl=masked_mean(ratio - 1.0 - log_ratio, mask),
            ratio_mean=masked_mean(ratio, mask),
            ratio_max=_masked_max(ratio, mask),
            dual_clipfrac=masked_mean(dual.float(), mask),
        )


def ppo_value_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_eps: float | None = 0.2,
    num_tokens: int | float | Tensor | None = None,
) -> ValueLossOutput:
    """Clipped value loss (as in OpenAI baselines' PPO2 and Ziegler et al. 2019).

    ``v_clip = old_values + clip(values - old_values, -eps, eps)``,
    ``L = 0.5 * max((values - R)^2, (v_clip - R)^2)``, reduced as a token mean (``num_tokens`` as
    in :func:`aggregate_loss`). ``clip_eps=None`` gives the plain ``0.5 (values - R)^2``.
    ``old_values`` and ``returns`` are targets and are detached.

    Shapes: all ``(B, T)`` -> scalar loss; ``explained_variance`` of the returns by ``values``.
    """
    old_values, returns = old_values.detach(), returns.detach()
    unclipped = (values - returns) ** 2
    if clip_eps is None:
        per_token, was_clipped = unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    else:
        if clip_eps <= 0:
            raise ValueError(f"clip_eps={clip_eps} must be > 0 (or None to disable clipping)")
        v_clip = old_values + torch.clamp(values - old_values, -clip_eps, clip_eps)
        clipped = (v_clip - returns) ** 2
        per_token, was_clipped = torch.maximum(unclipped, clipped), clipped > unclipped
    loss = 0.5 * aggregate_loss(per_token, mask, mode="token_mean", num_tokens=num_tokens)
    with torch.no_grad():
        var_returns = masked_var(returns, mask)
        residual_var = masked_var(returns - values, mask)
        explained = torch.where(
            var_returns > 0, 1.0 - residual_var / var_returns.clamp_min(1e-12), 0.0
        )
        return ValueLossOutput(loss, masked_mean(was_clipped.float(), mask), explained)
