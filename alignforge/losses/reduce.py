"""Masked reductions and loss aggregation shared by every loss in alignforge.

    >>> import torch
    >>> from alignforge.losses.reduce import aggregate_loss, masked_mean
    >>> x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    >>> mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    >>> float(masked_mean(x, mask))
    2.0
    >>> float(aggregate_loss(x, mask, mode="seq_mean_token_mean"))
    2.25

Masks follow the project convention: ``mask`` is 1 (or True) where an element counts, 0 where it
is padding, prompt, or was rejected. Masks may be bool, integer or floating point. Elements outside
the mask never reach the result, even when they hold NaN or inf (they are selected away with
``torch.where`` rather than multiplied by zero, because ``nan * 0 == nan``). Counts are taken in at
least float32 so a bf16 mask does not round 257 tokens to 256.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor

AggregationMode = Literal["token_mean", "seq_mean_token_sum", "seq_mean_token_mean"]
AGGREGATION_MODES: tuple[str, ...] = ("token_mean", "seq_mean_token_sum", "seq_mean_token_mean")


def _count_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def masked_sum(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Sum of ``x`` over the elements where ``mask`` is set: ``sum_i m_i x_i``.

    Shapes: ``x`` and ``mask`` broadcastable, e.g. both ``(B, T)``. ``dim=None`` sums everything
    (0-d result); ``dim=-1`` gives one sum per sequence ``(B,)``.
    """
    selected = torch.where(mask.bool(), x, torch.zeros((), dtype=x.dtype, device=x.device))
    return selected.sum() if dim is None else selected.sum(dim)


def masked_count(
    mask: Tensor, dim: int | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Number of elements where ``mask`` is set (as ``dtype``), over ``dim`` or everything."""
    m = mask.bool().to(dtype)
    return m.sum() if dim is None else m.sum(dim)


def masked_mean(x: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean over the masked elements: ``sum_i m_i x_i / max(sum_i m_i, 1)``.

    Shapes as in :func:`masked_sum`. A row (or batch) with no element in the mask gives 0 rather
    than NaN, so a fully padded micro-batch cannot poison a gradient step.
    """
    total = masked_sum(x.to(_count_dtype(x)), mask, dim)
    count = masked_count(mask, dim, dtype=total.dtype)
    return (total / count.clamp_min(1.0)).to(torch.promote_types(x.dtype, total.dtype))


def masked_var(x: Tensor, mask: Tensor, dim: int | None = None, unbiased: bool = True) -> Tensor:
    """Variance over the masked elements.

    ``var = sum_i m_i (x_i - mean)^2 / (n - 1)`` with ``n = sum_i m_i`` when ``unbiased`` (Bessel's
    correction, applied only where ``n > 1``), else divided by ``n``. Shapes as in
    :func:`masked_sum`; with ``dim`` the mean is taken per slice.
    """
    mean = masked_mean(x, mask, dim)
    centred = x - (mean if dim is None else mean.unsqueeze(dim))
    var = masked_mean(centred**2, mask, dim)
    if unbiased:
        n = masked_count(mask, dim, dtype=var.dtype)
        var = torch.where(n > 1, var * n / (n - 1).clamp_min(1.0), var)
    return var


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """Whiten ``x`` with the statistics of its masked elements (whole tensor, not per row).

    ``(x - mean) / sqrt(var + eps)``; with ``shift_mean=False`` the mean is added back, i.e. only
    the scale changes (what PPO implementations do to rewards). ``var`` is the unbiased masked
    variance. Elements outside the mask are returned as 0. Shape: same as ``x``, e.g. ``(B, T)``.
    """
    mean = masked_mean(x, mask)
    var = masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask.bool(), whitened, torch.zeros_like(whitened))


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: AggregationMode = "token_mean",
    num_tokens: int | float | Tensor | None = None,
    num_sequences: int | float | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss ``(B, T)`` to a scalar.

    Modes (``m`` the mask, ``L`` the per-token loss):

    * ``"token_mean"``: ``sum_{b,t} m L / N`` where ``N`` is ``num_tokens`` if given, else the
      number of masked tokens in this batch. Every token weighs the same (DAPO, Dr. GRPO).
    * ``"seq_mean_token_sum"``: ``sum_b (sum_t m L) / S``: each sequence's summed loss, averaged
      over ``S`` sequences (``num_sequences`` if given, else ``B``).
    * ``"seq_mean_token_mean"``: ``sum_b (sum_t m L / sum_t m) / S``: each sequence's mean, averaged
      over sequences (the original GRPO form; long answers weigh as much as short ones).

    Why ``num_tokens``: with gradient accumulation or data parallelism a batch is cut into
    micro-batches/shards holding different numbers of tokens. Averaging each micro-batch's own
    token mean and then averaging those means weighs a token in a short micro-batch more than one
    in a long micro-batch, so the gradient depends on how the batch was split. Dividing every
    micro-batch's token *sum* by the same global count ``N`` (all tokens in all micro-batches on
    all ranks) makes each call return that shard's share of the global mean; the shares **summed**
    equal the full-batch token mean exactly, whatever the split (as OpenRLHF's ``aggregate_loss``).
    Callers must therefore sum, not average, the shares: undo frameworks that average (DDP divides
    gradients by the world size; ``accelerate``'s ``backward`` divides by the accumulation steps)
    by multiplying the loss by that factor. ``num_sequences`` does the same for the sequence modes.
    """
    if mode not in AGGREGATION_MODES:
        raise ValueError(f"mode={mode!r} is not one of {', '.join(AGGREGATION_MODES)}")
    if mode == "token_mean":
        if num_sequences is not None:
            raise ValueError("num_sequences applies to the seq_mean_* modes; use num_tokens")
        total = masked_sum(per_token.to(_count_dtype(per_token)), mask)
        denom = masked_count(mask, dtype=total.dtype) if num_tokens is None else num_tokens
        return total / torch.as_tensor(denom, dtype=total.dtype, device=total.device).clamp_min(1.0)
    if num_tokens is not None:
        raise ValueError(f"num_tokens applies to mode='token_mean', not mode={mode!r}")
    if mode == "seq_mean_token_sum":
        per_seq = masked_sum(per_token.to(_count_dtype(per_token)), mask, dim=-1)
    else:
        per_seq = masked_mean(per_token, mask, dim=-1)
    denom = per_seq.shape[0] if num_sequences is None else num_sequences
    denom_t = torch.as_tensor(denom, dtype=per_seq.dtype, device=per_seq.device).clamp_min(1.0)
    return per_seq.sum() / denom_t
