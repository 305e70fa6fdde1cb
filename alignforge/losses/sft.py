"""Supervised fine-tuning loss: token-mean cross entropy of a causal LM's next-token predictions.

    >>> import torch
    >>> from alignforge.losses.sft import sft_loss
    >>> logits = torch.randn(2, 6, 13, requires_grad=True)        # (B, T, V)
    >>> labels = torch.tensor([[-100, -100, 1, 2, 3, 4], [-100, 5, 6, 7, -100, -100]])
    >>> out = sft_loss(logits, labels)
    >>> out.loss.backward(); int(out.n_tokens)
    7

With gradient accumulation, pass ``num_tokens`` = the number of label tokens in the whole
optimizer step (all micro-batches, all ranks) and sum the micro-batch losses: the result is the
same as one big batch (see :func:`alignforge.losses.reduce.aggregate_loss`).
"""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

from alignforge.losses.logprobs import shifted_token_logps
from alignforge.losses.reduce import aggregate_loss, masked_count


class SFTLossOutput(NamedTuple):
    loss: Tensor  # scalar
    n_tokens: Tensor  # label tokens in this batch (detached, int64)


def sft_loss(
    logits: Tensor,
    labels: Tensor,
    ignore_index: int = -100,
    num_tokens: int | float | Tensor | None = None,
) -> SFTLossOutput:
    """Negative log-likelihood of the next token, averaged over label tokens.

    ``loss = -sum_{b,t} m[b,t] log p(labels[b,t+1] | tokens <= t) / N``, with ``m`` true where the
    shifted label is not ``ignore_index`` and ``N = num_tokens`` if given, else ``sum m``.

    Shapes: ``logits (B, T, V)``, ``labels (B, T)`` (unshifted; the function shifts) -> scalar.
    Identical to ``F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())`` when
    ``num_tokens`` is None, without the ``(B, T, V)`` log-softmax copy.
    """
    logps, mask = shifted_token_logps(logits, labels, ignore_index=ignore_index)
    loss = aggregate_loss(-logps, mask, mode="token_mean", num_tokens=num_tokens)
    return SFTLossOutput(loss, masked_count(mask).long().detach())
