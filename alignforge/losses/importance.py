"""Off-policy correction between the rollout engine and the trainer.

The engine that sampled a response (vLLM, a server, an older checkpoint) assigns it log-probs
``rollout_logps`` (behaviour policy ``mu``) that differ from the trainer's ``old_logps``
(``pi_old``): other kernels, other precision, a stale weight version. PPO's ratio
``pi / pi_old`` assumes the samples came from ``pi_old``; they came from ``mu``. The correction
multiplies the loss by ``w = pi_old / mu`` (Yao et al. 2025, "Your efficient RL framework secretly
brings you off-policy RL training"), tamed in one of three ways:

* ``mode="truncate"`` (TIS): ``w = min(ratio, upper)``, V-trace style truncation (Espeholt et al.
  2018). Every token stays in the loss.
* ``mode="mask"`` (MIS / IcePop): tokens (level ``token``) or whole sequences (``sequence``,
  ``geometric``) whose ratio falls outside ``[lower, upper]`` are **removed from the loss mask**,
  so they leave the denominator of the token mean instead of counting as zero-loss tokens. The
  kept tokens get ``w = ratio`` (IcePop's masked ratio ``M(k) = k`` inside the band) or ``w = 1``
  with ``keep_ratio=False`` (pure rejection).
* ``mode="none"``: ``w = ratio``, for diagnostics or a custom scheme; ``lower``/``upper`` unused.

    >>> import torch
    >>> from alignforge.losses.importance import importance_weights
    >>> old = torch.log(torch.tensor([[0.5, 0.9, 0.2]]))
    >>> rollout = torch.log(torch.tensor([[0.5, 0.3, 0.4]]))
    >>> out = importance_weights(old, rollout, torch.ones(1, 3), mode="truncate", upper=2.0)
    >>> [round(w, 3) for w in out.weights[0].tolist()]          # ratios 1, 3, 0.5
    [1.0, 2.0, 0.5]
    >>> out = importance_weights(old, rollout, torch.ones(1, 3), mode="mask", lower=0.8, upper=2.0)
    >>> out.mask.tolist(), round(out.diagnostics.frac_masked.item(), 3)
    ([[1.0, 0.0, 0.0]], 0.667)

Then pass ``weights`` as ``is_weights`` and ``mask`` as the loss mask to
:func:`alignforge.losses.ppo.ppo_policy_loss`, and log ``diagnostics.as_dict()``.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from torch import Tensor

from alignforge.losses.reduce import masked_count, masked_mean, masked_sum

Level = Literal["token", "sequence", "geometric"]
Mode = Literal["truncate", "mask", "none"]
LEVELS: tuple[str, ...] = ("token", "sequence", "geometric")
MODES: tuple[str, ...] = ("truncate", "mask", "none")
# exp(20) ~ 5e8: far beyond any sensible bound, and keeps a long sequence's summed log-ratio
# from overflowing to inf (which would turn weight statistics into inf/nan).
_MAX_LOG_RATIO = 20.0


class OffPolicyDiagnostics(NamedTuple):
    """How far the behaviour policy is from the trainer, and what the correction did.

    All fields are detached 0-d tensors; ``as_dict`` turns them into floats for a logger.
    Weight statistics are over tokens for ``level="token"`` and over sequences otherwise, and
    only over the tokens (sequences) the loss keeps: a rejected one is out of the loss, not a
    sample of weight 0. The KL, delta-p and perplexity fields cover every valid token.
    """

    kl_k1: Tensor  # mean(rollout_logps - old_logps): k1 estimate of KL(mu || pi_old)
    kl_k3: Tensor  # mean(exp(r) - 1 - r), r = old_logps - rollout_logps: k3 estimate (>= 0)
    weight_mean: Tensor
    weight_std: Tensor
    weight_min: Tensor
    weight_max: Tensor
    ess: Tensor  # (sum w)^2 / (N sum w^2) in (0, 1]; 1 = as good as on-policy
    frac_truncated: Tensor  # share of valid tokens whose weight was cut by truncation
    frac_masked: Tensor  # share of valid tokens removed from the loss mask
    delta_p_max: Tensor  # max |exp(old_logps) - exp(rollout_logps)|
    delta_p_mean: Tensor  # mean |exp(old_logps) - exp(rollout_logps)|
    log_ppl_diff: Tensor  # mean over sequences of log-ppl(pi_old) - log-ppl(mu)

    def as_dict(self, prefix: str = "offpolicy/") -> dict[str, float]:
        return {f"{prefix}{name}": float(value) for name, value in self._asdict().items()}


class ImportanceOutput(NamedTuple):
    weights: Tensor  # (B, T) detached; 0 outside the returned mask
    mask: Tensor  # (B, T) the loss mask with rejected tokens / sequences removed
    diagnostics: OffPolicyDiagnostics


def _level_log_ratio(log_ratio: Tensor, mask: Tensor, level: str) -> Tensor:
    if level == "token":
        return log_ratio
    if level == "sequence":
        per_seq = masked_sum(log_ratio, mask, dim=-1)
    else:
        per_seq = masked_mean(log_ratio, mask, dim=-1)
    return per_seq.unsqueeze(-1).expand_as(log_ratio)


def _check_bounds(mode: str, lower: float | None, upper: float | None) -> None:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(MODES)}")
    if lower is not None and lower < 0:
        raise ValueError(f"lower={lower} must be >= 0")
    if upper is not None and upper <= 0:
        raise ValueError(f"upper={upper} must be > 0")
    if lower is not None and upper is not None and lower >= upper:
        raise ValueError(f"lower={lower} must be smaller than upper={upper}")
    if mode == "mask" and lower is None and upper is None:
        raise ValueError("mode='mask' needs lower and/or upper: nothing would be masked")
    if mode == "truncate" and upper is None:
        raise ValueError("mode='truncate' needs upper (the truncation level, e.g. 2.0)")


def importance_weights(
    old_logps: Tensor,
    rollout_logps: Tensor,
    mask: Tensor,
    level: Level = "token",
    mode: Mode = "truncate",
    lower: float | None = None,
    upper: float | None = 2.0,
    keep_ratio: bool = True,
) -> ImportanceOutput:
    """Importance weights ``pi_old / mu`` for rollouts sampled by a behaviour policy ``mu``.

    ``r_t = old_logps_t - rollout_logps_t`` on valid tokens. The ratio is
    ``token``: ``exp(r_t)``; ``sequence``: ``exp(sum_t r_t)`` (exact sequence ratio, high
    variance); ``geometric``: ``exp(mean_t r_t)`` (length-normalised), the last two broadcast over
    the sequence. ``truncate``: ``w = clip(ratio, lower, upper)`` (``lower`` optional);
    ``mask``: tokens/sequences with ratio outside ``[lower, upper]`` leave the mask, the rest get
    ``w = ratio`` (or 1 with ``keep_ratio=False``); ``none``: ``w = ratio``.

    Shapes: ``old_logps``, ``rollout_logps``, ``mask`` ``(B, T)`` -> weights ``(B, T)`` (detached,
    0 outside the new mask), the new mask in the dtype of ``mask``, and diagnostics.
    """
    if level not in LEVELS:
        raise ValueError(f"level={level!r} is not one of {', '.join(LEVELS)}")
    _check_bounds(mode, lower, upper)
    with torch.no_grad():
        valid = mask.bool()
        log_ratio = torch.where(valid, (old_logps - rollout_logps).float(), 0.0)
        level_lr = _level_log_ratio(log_ratio, valid, level)
        ratio = torch.exp(level_lr.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
        keep = valid
        truncated = torch.zeros_like(valid)
        if mode == "truncate":
            weights = ratio.clamp(min=lower, max=upper)
            truncated = valid & (weights != ratio)
        elif mode == "mask":
            inside = torch.ones_like(valid)
            if lower is not None:
                inside &= ratio >= lower
            if upper is not None:
                inside &= ratio <= upper
            keep = valid & inside
            weights = ratio if keep_ratio else torch.ones_like(ratio)
        else:
            weights = ratio
        weights = torch.where(keep, weights, 0.0)
        diagnostics = offpolicy_diagnostics(
            old_logps, rollout_logps, mask, weights, keep, level=level, truncated=truncated
        )
        return ImportanceOutput(weights, keep.to(mask.dtype), diagnostics)


def _weight_units(weights: Tensor, valid: Tensor, level: str) -> Tensor:
    """Weights as samples: one per valid token (token level) or per non-empty sequence."""
    if level == "token":
        return weights[valid]
    has_tokens = valid.any(dim=-1)
    return masked_mean(weights, valid, dim=-1)[has_tokens]


def _weight_stats(units: Tensor) -> tuple[Tensor, ...]:
    if units.numel() == 0:
        zero = units.new_zeros(())
        return zero, zero, zero, zero, zero
    sum_sq = (units**2).sum()
    ess = torch.where(sum_sq > 0, units.sum() ** 2 / (units.numel() * sum_sq), 0.0)
    return units.mean(), units.std(correction=0), units.min(), units.max(), ess


def offpolicy_diagnostics(
    old_logps: Tensor,
    rollout_logps: Tensor,
    mask: Tensor,
    weights: Tensor | None = None,
    new_mask: Tensor | None = None,
    level: Level = "token",
    truncated: Tensor | None = None,
) -> OffPolicyDiagnostics:
    """Mismatch statistics between trainer (``old_logps``) and behaviour (``rollout_logps``).

    With ``r = old_logps - rollout_logps`` on valid tokens (samples drawn from ``mu``):
    ``kl_k1 = mean(-r)`` and ``kl_k3 = mean(exp(r) - 1 - r)`` estimate ``KL(mu || pi_old)``
    (Schulman 2020); ``ess = (sum w)^2 / (N sum w^2)``; ``delta_p = |exp(old) - exp(rollout)|``;
    ``log_ppl_diff = mean_b [mean_t(-old) - mean_t(-rollout)]``. ``weights`` default to the token
    ratio ``exp(r)``; ``new_mask`` (the mask after rejection) gives ``frac_masked`` and limits the
    weight statistics (mean, std, min, max, ESS) to the kept tokens (verl's rollout correction
    likewise never counts a rejected token as a weight of 0); ``truncated`` (bool ``(B, T)``)
    gives ``frac_truncated``. Shapes: all ``(B, T)``.
    """
    with torch.no_grad():
        valid = mask.bool()
        r = torch.where(valid, (old_logps - rollout_logps).float(), 0.0)
        if weights is None:
            weights = torch.exp(r.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
        kept = valid if new_mask is None else valid & new_mask.bool()
        w_mean, w_std, w_min, w_max, ess = _weight_stats(
            _weight_units(weights.float(), kept, level)
        )
        n_valid = masked_count(valid)
        frac_masked = r.new_zeros(())
        if new_mask is not None:
            n_kept = masked_count(kept)
            frac_masked = torch.where(n_valid > 0, 1.0 - n_kept / n_valid.clamp_min(1.0), 0.0)
        frac_truncated = r.new_zeros(())
        if truncated is not None:
            frac_truncated = masked_mean(truncated.float(), valid)
        delta_p = (old_logps.float().exp() - rollout_logps.float().exp()).abs()
        has_tokens = valid.any(dim=-1)
        per_seq_ppl_diff = masked_mean(-r, valid, dim=-1)[has_tokens]
        k3 = torch.exp(r.clamp(max=_MAX_LOG_RATIO)) - 1.0 - r
        return OffPolicyDiagnostics(
            kl_k1=masked_mean(-r, valid),
            kl_k3=masked_mean(k3, valid),
            weight_mean=w_mean,
            weight_std=w_std,
            weight_min=w_min,
            weight_max=w_max,
            ess=ess,
            frac_truncated=frac_truncated,
            frac_masked=frac_masked,
            delta_p_max=delta_p[valid].max() if valid.any() else r.new_zeros(()),
            delta_p_mean=masked_mean(delta_p, valid),
            log_ppl_diff=per_seq_ppl_diff.mean() if has_tokens.any() else r.new_zeros(()),
        )
