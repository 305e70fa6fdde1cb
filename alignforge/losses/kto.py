"""KTO: preference optimisation from answers labelled desirable or undesirable, one at a time.

    >>> import torch
    >>> from alignforge.losses.kto import kto_kl, kto_loss
    >>> z0 = kto_kl(torch.tensor([-7.0, -9.0]), torch.tensor([-7.5, -9.5]))    # mean 0.5
    >>> out = kto_loss(torch.tensor([-5.0, -9.0]), torch.tensor([-6.0, -8.0]),
    ...                torch.tensor([True, False]), z0, beta=0.1)
    >>> float(z0), round(float(out.loss), 4)   # (1 - sigmoid(0.05) + 1 - sigmoid(0.15)) / 2
    (0.5, 0.475)

Ethayarajh et al. (2024), "KTO: Model Alignment as Prospect Theoretic Optimization", ICML 2024
(arXiv:2402.01306), the KTO loss ``L_KTO = E[lambda_y - v(x, y)]`` with implicit reward
``r = logp(y|x) - ref_logp(y|x)`` (sequence log-probs) and reference point ``z0``:

    v = lambda_D * sigmoid(beta * (r - z0))     y desirable
    v = lambda_U * sigmoid(beta * (z0 - r))     y undesirable

``z0`` estimates ``KL(pi || pi_ref)`` from *mismatched* pairs: answers scored after a prompt they
do not answer, ``z0 = max(0, mean(logp(y'|x) - ref_logp(y'|x)))``, and no gradient flows through
it (the paper's and TRL's choice). Which mismatched pairs are used is the caller's: see
``docs/papers.md`` for the DPO recipe's.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class KTOLossOutput(NamedTuple):
    loss: Tensor  # scalar: sum(losses) / N
    losses: Tensor  # (B,) weighted per-answer loss lambda_y - v (with grad)
    rewards: Tensor  # (B,) beta * (logp - ref_logp), detached
    kl: Tensor  # scalar: the reference point z0 that was used (detached)
    margins: Tensor  # (B,) beta * (r - z0) for desirable, beta * (z0 - r) for undesirable


def kto_kl(kl_logps: Tensor, ref_kl_logps: Tensor) -> Tensor:
    """KTO's reference point ``z0 = max(0, mean(kl_logps - ref_kl_logps))``, detached.

    Shapes: ``(M,)`` sequence log-probs of ``M`` mismatched (prompt, answer) pairs under the
    policy and the reference -> scalar.
    """
    if kl_logps.shape != ref_kl_logps.shape or kl_logps.ndim != 1 or kl_logps.numel() == 0:
        raise ValueError(
            "kl_logps and ref_kl_logps must have the same non-empty shape (M,); got "
            f"{tuple(kl_logps.shape)} and {tuple(ref_kl_logps.shape)}"
        )
    return (kl_logps - ref_kl_logps).mean().detach().clamp(min=0)


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor,
    labels: Tensor,
    kl: Tensor | float,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    num_examples: int | float | Tensor | None = None,
) -> KTOLossOutput:
    """The KTO loss of answers labelled desirable (``labels`` True) or undesirable.

    ``r = logps - ref_logps``;
    ``losses = desirable_weight * (1 - sigmoid(beta * (r - kl)))`` where ``labels``, else
    ``undesirable_weight * (1 - sigmoid(beta * (kl - r)))``;
    ``loss = sum(losses) / N`` with ``N = num_examples`` if given (all answers of the optimizer
    step, so micro-batch losses add up), else ``B``. ``kl`` is ``z0`` (:func:`kto_kl`), taken as
    a constant. ``desirable_weight`` / ``undesirable_weight`` are the paper's ``lambda_D`` /
    ``lambda_U`` (TRL's names), which offset unequal numbers of the two kinds.

    Shapes: ``logps``, ``ref_logps`` ``(B,)`` sequence log-probs, ``labels`` ``(B,)`` bool,
    ``kl`` scalar.
    """
    if beta <= 0:
        raise ValueError(f"beta={beta} must be > 0")
    if desirable_weight <= 0 or undesirable_weight <= 0:
        raise ValueError(
            f"desirable_weight={desirable_weight} and undesirable_weight={undesirable_weight} "
            "must be > 0"
        )
    if not (logps.ndim == 1 and logps.shape == ref_logps.shape == labels.shape):
        raise ValueError(
            "logps, ref_logps and labels must have the same shape (B,); got "
            f"{tuple(logps.shape)}, {tuple(ref_logps.shape)} and {tuple(labels.shape)}"
        )
    desirable = labels.bool()
    kl = torch.as_tensor(kl, dtype=logps.dtype, device=logps.device).detach()
    r = logps - ref_logps
    z = torch.where(desirable, beta * (r - kl), beta * (kl - r))
    weight = torch.where(desirable, desirable_weight, undesirable_weight).to(logps.dtype)
    losses = weight * (1.0 - torch.sigmoid(z))
    n = losses.shape[0] if num_examples is None else num_examples
    loss = losses.sum() / torch.as_tensor(n, dtype=losses.dtype, device=losses.device)
    return KTOLossOutput(loss, losses, (beta * r).detach(), kl, z.detach())
