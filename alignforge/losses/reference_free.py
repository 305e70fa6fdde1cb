"""Preference losses without a reference model: SimPO and ORPO.

    >>> import torch
    >>> from alignforge.losses.reference_free import orpo_loss, simpo_loss
    >>> out = simpo_loss(torch.tensor([-0.5]), torch.tensor([-1.5]), beta=2.0, gamma=1.0)
    >>> round(float(out.loss), 4)      # -log sigmoid(2 * (-0.5 + 1.5) - 1)
    0.3133
    >>> round(float(orpo_loss(torch.tensor([-0.5]), torch.tensor([-1.5]), beta=0.1).loss), 4)
    0.5171

Both take **length-averaged** log-probs, ``logps = (1 / |y|) sum_t log pi(y_t | x, y_<t)``
``(B,)`` (``sequence_logps(..., average=True)``; the DPO recipe divides summed log-probs by the
answer's token count): SimPO's reward is defined on them, and ORPO's odds need a per-token
probability ``exp(logps)`` in (0, 1). Implicit rewards are ``beta * logps`` (as TRL reports
them); ``nll`` is the length-averaged negative log-likelihood of the chosen answer.

Deviations from the papers are listed in ``docs/papers.md``. In short: the NLL term (ORPO's SFT
loss, SimPO's optional ``cpo_alpha`` term) is averaged over the answer's tokens per pair, then
over pairs, as both papers write it; TRL takes one token mean over the whole batch and, for ORPO,
includes the prompt tokens.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class ReferenceFreeLossOutput(NamedTuple):
    loss: Tensor  # scalar: sum(losses) / N
    losses: Tensor  # (B,) per-pair loss (with grad)
    chosen_rewards: Tensor  # (B,) beta * logps_chosen, detached
    rejected_rewards: Tensor  # (B,) beta * logps_rejected, detached
    accuracies: Tensor  # (B,) 1.0 where chosen_rewards > rejected_rewards
    margins: Tensor  # (B,) chosen_rewards - rejected_rewards
    nll: Tensor  # (B,) -logps_chosen, detached
    logits: Tensor  # (B,) the argument of log sigmoid (SimPO: beta h - gamma; ORPO: log odds ratio)


def _check(logps_chosen: Tensor, logps_rejected: Tensor, beta: float) -> None:
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    if logps_chosen.ndim != 1 or logps_chosen.shape != logps_rejected.shape:
        raise ValueError(
            "logps_chosen and logps_rejected must have the same shape (B,); got "
            f"{tuple(logps_chosen.shape)} and {tuple(logps_rejected.shape)}"
        )


def _output(losses, logits, logps_chosen, logps_rejected, beta, num_pairs):
    n = losses.shape[0] if num_pairs is None else num_pairs
    loss = losses.sum() / torch.as_tensor(n, dtype=losses.dtype, device=losses.device)
    chosen = (beta * logps_chosen).detach()
    rejected = (beta * logps_rejected).detach()
    return ReferenceFreeLossOutput(
        loss=loss,
        losses=losses,
        chosen_rewards=chosen,
        rejected_rewards=rejected,
        accuracies=(chosen > rejected).to(losses.dtype),
        margins=chosen - rejected,
        nll=(-logps_chosen).detach(),
        logits=logits.detach(),
    )


def simpo_loss(
    logps_chosen: Tensor,
    logps_rejected: Tensor,
    beta: float = 2.0,
    gamma: float = 0.5,
    cpo_alpha: float = 0.0,
    num_pairs: int | float | Tensor | None = None,
) -> ReferenceFreeLossOutput:
    """SimPO (Meng, Xia & Chen 2024, "SimPO: Simple Preference Optimization with a
    Reference-Free Reward", NeurIPS 2024, arXiv:2405.14734, eq. 6).

    ``losses = -log sigmoid(beta * (logps_chosen - logps_rejected) - gamma)
    + cpo_alpha * (-logps_chosen)``, ``loss = sum(losses) / N`` (``N = num_pairs`` or ``B``).

    ``gamma`` is the target reward margin (TRL's and LLaMA-Factory's ``simpo_gamma``; TRL writes
    it as ``beta * (h - gamma / beta)``, the same number). ``cpo_alpha > 0`` adds the chosen
    answer's NLL as in TRL's CPO-SimPO; the paper uses 0. Shapes: ``(B,)`` length-averaged
    log-probs -> ``losses (B,)``.
    """
    _check(logps_chosen, logps_rejected, beta)
    if cpo_alpha < 0:
        raise ValueError(f"cpo_alpha={cpo_alpha} must be >= 0")
    logits = beta * (logps_chosen - logps_rejected) - gamma
    losses = -F.logsigmoid(logits)
    if cpo_alpha:
        losses = losses - cpo_alpha * logps_chosen
    return _output(losses, logits, logps_chosen, logps_rejected, beta, num_pairs)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate on both sides of ``-log 2`` (Maechler 2012).

    Each branch gets its input clamped to the side where it is used, so the branch
    ``torch.where`` discards is finite and passes no NaN into the gradient.
    """
    t = -0.6931471805599453
    far = torch.log1p(-torch.exp(torch.clamp(x, max=t)))
    near = torch.log(-torch.expm1(torch.clamp(x, min=t)))
    return torch.where(x < t, far, near)


def orpo_loss(
    logps_chosen: Tensor,
    logps_rejected: Tensor,
    beta: float = 0.1,
    num_pairs: int | float | Tensor | None = None,
) -> ReferenceFreeLossOutput:
    """ORPO (Hong, Lee & Thorne 2024, "ORPO: Monolithic Preference Optimization without
    Reference Model", EMNLP 2024, arXiv:2403.07691, eqs. 6-7).

    With ``odds(y) = p / (1 - p)`` and ``p = exp(logps)`` (a per-token probability):
    ``log_odds = (logps_c - logps_r) - (log(1 - exp(logps_c)) - log(1 - exp(logps_r)))``,
    ``losses = -logps_chosen - beta * log sigmoid(log_odds)``: the SFT loss on the chosen answer
    plus ``beta`` (the paper's ``lambda``, TRL's ``beta``) times the odds-ratio loss.
    ``loss = sum(losses) / N``. Shapes: ``(B,)`` length-averaged log-probs (< 0) -> ``(B,)``.
    """
    _check(logps_chosen, logps_rejected, beta)
    c, r = logps_chosen.float(), logps_rejected.float()  # log1mexp loses digits in half precision
    log_odds = (c - r) - (log1mexp(c) - log1mexp(r))
    losses = -c - beta * F.logsigmoid(log_odds)
    return _output(losses, log_odds, logps_chosen, logps_rejected, beta, num_pairs)
