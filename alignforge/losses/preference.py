"""Direct preference losses: the DPO family and SPIN.

    >>> import torch
    >>> from alignforge.losses.preference import dpo_loss, PREFERENCE_LOSSES
    >>> sorted(PREFERENCE_LOSSES)
    ['conservative', 'hinge', 'ipo', 'robust', 'sigmoid']
    >>> out = dpo_loss(torch.tensor([-5.0]), torch.tensor([-9.0]),
    ...                torch.tensor([-6.0]), torch.tensor([-8.0]), beta=0.1)
    >>> round(float(out.loss), 4), float(out.accuracies[0])    # -log sigmoid(0.1 * 2)
    (0.5981, 1.0)

Every variant is a function of the log-ratio difference

    h = [logp(y_c) - ref_logp(y_c)] - [logp(y_r) - ref_logp(y_r)]        (B,)

where each ``logp`` is a sequence log-probability (see
:func:`alignforge.losses.logprobs.sequence_logps`). Each variant is one small function with the
signature ``(h, beta, label_smoothing, margin) -> losses (B,)``; ``PREFERENCE_LOSSES`` maps the
``loss_type`` name to it, and :func:`dpo_loss` dispatches through that dict, so each variant can be
called and tested directly. A variant refuses arguments it does not use (``label_smoothing`` for
``sigmoid``, ``margin`` for ``ipo``) rather than ignoring them.

Deviations from the papers are listed in ``docs/papers.md``. In short: SLiC's hinge is applied
to the reference-adjusted ``h`` (as TRL does; pass zero reference log-probs for the original), and
IPO takes whatever log-probs it is given (the IPO paper uses sums; TRL length-averages for IPO, and
our DPO recipe does too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Margin = float | Tensor | None


class PreferenceLossOutput(NamedTuple):
    loss: Tensor  # scalar: sum(losses) / N
    losses: Tensor  # (B,) per-pair loss (with grad)
    chosen_rewards: Tensor  # (B,) beta * (logp_c - ref_logp_c), detached
    rejected_rewards: Tensor  # (B,) beta * (logp_r - ref_logp_r), detached
    accuracies: Tensor  # (B,) 1.0 where chosen_rewards > rejected_rewards
    margins: Tensor  # (B,) chosen_rewards - rejected_rewards


def _logits(h: Tensor, beta: float, margin: Margin) -> Tensor:
    return beta * h if margin is None else beta * h - margin


def _no_smoothing(name: str, label_smoothing: float) -> None:
    if label_smoothing:
        raise ValueError(
            f"label_smoothing={label_smoothing} is not used by loss_type={name!r}; "
            "use loss_type='conservative' (cDPO) or 'robust' (rDPO) for noisy labels"
        )


def sigmoid_loss(h: Tensor, beta: float, label_smoothing: float = 0.0, margin: Margin = None):
    """DPO (Rafailov et al. 2023, eq. 7): ``-log sigmoid(beta * h - m)``.

    ``m`` (default 0) is an offset as in ODPO (Amini et al. 2024). Shapes: ``h (B,)`` -> ``(B,)``.
    """
    _no_smoothing("sigmoid", label_smoothing)
    return -F.logsigmoid(_logits(h, beta, margin))


def conservative_loss(h: Tensor, beta: float, label_smoothing: float = 0.0, margin: Margin = None):
    """cDPO (Mitchell 2023): DPO against labels flipped with probability ``eps``.

    ``-(1 - eps) log sigmoid(z) - eps log sigmoid(-z)`` with ``z = beta * h - m`` and
    ``eps = label_smoothing`` in ``[0, 0.5]``. ``eps = 0`` is DPO. Shapes: ``(B,)`` -> ``(B,)``.
    """
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 0.5] for cDPO")
    z = _logits(h, beta, margin)
    return -(1.0 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def robust_loss(h: Tensor, beta: float, label_smoothing: float = 0.0, margin: Margin = None):
    """rDPO (Chowdhury et al. 2024, "Provably Robust DPO"): unbiased DPO loss under label-flip rate ``eps``.

    ``[-(1 - eps) log sigmoid(z) + eps log sigmoid(-z)] / (1 - 2 eps)`` with ``z = beta * h - m``
    and ``eps = label_smoothing`` in ``[0, 0.5)``. Its expectation over noisy labels equals the DPO
    loss on clean labels. ``eps = 0`` is DPO. Shapes: ``(B,)`` -> ``(B,)``.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing={label_smoothing} must lie in [0, 0.5) for rDPO")
    z = _logits(h, beta, margin)
    eps = label_smoothing
    return (-(1.0 - eps) * F.logsigmoid(z) + eps * F.logsigmoid(-z)) / (1.0 - 2.0 * eps)


def hinge_loss(h: Tensor, beta: float, label_smoothing: float = 0.0, margin: Margin = None):
    """SLiC-HF calibration (Zhao et al. 2023) on reference-adjusted h: ``relu(1 - (beta h - m))``.

    ``1 / beta`` plays SLiC's margin ``delta`` in units of ``h``. Shapes: ``(B,)`` -> ``(B,)``.
    """
    _no_smoothing("hinge", label_smoothing)
    return torch.relu(1.0 - _logits(h, beta, margin))


def ipo_loss(h: Tensor, beta: float, label_smoothing: float = 0.0, margin: Margin = None):
    """IPO (Azar et al. 2023, eq. 17): ``(h - 1 / (2 beta))^2``; ``beta`` is the paper's ``tau``.

    The paper writes ``h`` with sequence log-probs; TRL length-averages them for IPO because the
    squared loss otherwise scales with length. Pass ``sequence_logps(..., average=True)`` for
    TRL's behaviour. Shapes: ``(B,)`` -> ``(B,)``.
    """
    _no_smoothing("ipo", label_smoothing)
    if margin is not None:
        raise ValueError("margin is not defined for loss_type='ipo' (its target is 1 / (2 beta))")
    return (h - 1.0 / (2.0 * beta)) ** 2


PreferenceLossFn = Callable[[Tensor, float, float, Margin], Tensor]

PREFERENCE_LOSSES: dict[str, PreferenceLossFn] = {
    "sigmoid": sigmoid_loss,
    "ipo": ipo_loss,
    "hinge": hinge_loss,
    "robust": robust_loss,
    "conservative": conservative_loss,
}


def _check_pair_shapes(**tensors: Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 1 or any(s != first for s in shapes.values()):
        raise ValueError(f"all log-prob tensors must have the same shape (B,); got {shapes}")


def dpo_loss(
    logps_chosen: Tensor,
    logps_rejected: Tensor,
    ref_logps_chosen: Tensor,
    ref_logps_rejected: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    margin: Margin = None,
    num_pairs: int | float | Tensor | None = None,
) -> PreferenceLossOutput:
    """Preference loss of the DPO family, averaged over pairs.

    ``h = (logps_chosen - ref_logps_chosen) - (logps_rejected - ref_logps_rejected)``;
    ``losses = PREFERENCE_LOSSES[loss_type](h, beta, label_smoothing, margin)``;
    ``loss = sum(losses) / N`` with ``N = num_pairs`` if given (all pairs of the optimizer step, so
    micro-batch losses are summed), else ``B``. Implicit rewards ``beta * (logp - ref_logp)``.

    Shapes: all four log-prob tensors ``(B,)`` (sequence log-probs); ``margin`` scalar or ``(B,)``.
    """
    if loss_type not in PREFERENCE_LOSSES:
        raise ValueError(
            f"loss_type={loss_type!r} is not one of {', '.join(sorted(PREFERENCE_LOSSES))}"
        )
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    _check_pair_shapes(
        logps_chosen=logps_chosen,
        logps_rejected=logps_rejected,
        ref_logps_chosen=ref_logps_chosen,
        ref_logps_rejected=ref_logps_rejected,
    )
    chosen_logratio = logps_chosen - ref_logps_chosen
    rejected_logratio = logps_rejected - ref_logps_rejected
    h = chosen_logratio - rejected_logratio
    losses = PREFERENCE_LOSSES[loss_type](h, beta, label_smoothing, margin)
    n = losses.shape[0] if num_pairs is None else num_pairs
    loss = losses.sum() / torch.as_tensor(n, dtype=losses.dtype, device=losses.device)
    chosen_rewards = (beta * chosen_logratio).detach()
    rejected_rewards = (beta * rejected_logratio).detach()
    return PreferenceLossOutput(
        loss=loss,
        losses=losses,
        chosen_rewards=chosen_rewards,
        rejected_rewards=rejected_rewards,
        accuracies=(chosen_rewards > rejected_rewards).to(losses.dtype),
        margins=chosen_rewards - rejected_rewards,
    )


def spin_loss(
    policy_real_logps: Tensor,
    policy_generated_logps: Tensor,
    opponent_real_logps: Tensor,
    opponent_generated_logps: Tensor,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    num_pairs: int | float | Tensor | None = None,
) -> PreferenceLossOutput:
    """SPIN (Chen et al. 2024, eq. 4.7 and the official code): DPO where the opponent is the
    reference, the ground truth is chosen and the opponent's own generation is rejected.

    ``h = [logp_theta(y_real) - logp_opp(y_real)] - [logp_theta(y_gen) - logp_opp(y_gen)]``,
    ``loss = mean(l(beta * h))`` with ``l(t) = log(1 + exp(-t))`` for ``loss_type="sigmoid"``
    (the paper's logistic loss; ``beta`` is its ``lambda``). ``p_opp`` is the previous iteration
    ``p_theta_t``, frozen; ``y_gen ~ p_theta_t``. Shapes: all four ``(B,)`` sequence log-probs.

    The opponent term of the real answer is ``opponent_real_logps``, a forward pass of the opponent
    on the **ground truth**, not on the generation: passing the generated log-probs twice scores
    the real answer against the opponent's likelihood of a different sequence, which is no longer
    SPIN's objective (its minimiser is not the data distribution).
    """
    return dpo_loss(
        logps_chosen=policy_real_logps,
        logps_rejected=policy_generated_logps,
        ref_logps_chosen=opponent_real_logps,
        ref_logps_rejected=opponent_generated_logps,
        beta=beta,
        loss_type=loss_type,
        num_pairs=num_pairs,
    )
