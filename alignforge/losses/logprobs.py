"""Per-token log-probabilities from logits without materialising a full log-softmax.

    >>> import torch
    >>> from alignforge.losses.logprobs import shifted_token_logps, sequence_logps
    >>> logits = torch.randn(2, 5, 11)               # (B, T, V) from a causal LM
    >>> labels = torch.tensor([[-100, -100, 3, 4, 5], [-100, 7, 8, -100, -100]])
    >>> out = shifted_token_logps(logits, labels)   # position t predicts label t+1
    >>> out.logps.shape, out.mask.tolist()
    (torch.Size([2, 4]), [[False, True, True, True], [True, True, False, False]])
    >>> sequence_logps(out.logps, out.mask).shape
    torch.Size([2])

Memory: ``torch.log_softmax(logits, -1)`` allocates another ``(B, T, V)`` tensor (V is 50k-150k
for current tokenizers, so several GiB at 4k tokens). We need one value per position, so we take
``logit[index] - logsumexp(logits)`` and compute the ``logsumexp`` one row at a time.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from alignforge.losses.reduce import masked_mean, masked_sum


class TokenLogps(NamedTuple):
    """Per-token log-probabilities of the labels and the mask of positions that count."""

    logps: Tensor  # (B, T-1)
    mask: Tensor  # (B, T-1) bool


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """``log_softmax(logits, -1).gather(-1, index)`` without the full log-softmax copy.

    ``logp[b, t] = logits[b, t, index[b, t]] - logsumexp_v logits[b, t, v]``.

    Shapes: ``logits (B, T, V)``, ``index (B, T)`` (int64, every entry a valid vocabulary id) ->
    ``(B, T)`` in the dtype of ``logits``. For float32/float64 the ``logsumexp`` is taken one row
    (one sequence) at a time, so peak extra memory is ``(T, V)`` instead of ``(B, T, V)``. For
    half precision, where ``logit - logsumexp`` loses digits, each row goes through
    ``log_softmax`` in its own dtype, which is what an unfused computation would return.
    """
    if logits.shape[:-1] != index.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and index {tuple(index.shape)} disagree: "
            "expected logits (B, T, V) and index (B, T)"
        )
    if logits.dtype in (torch.float32, torch.float64):
        selected = torch.gather(logits, -1, index.unsqueeze(-1)).squeeze(-1)
        lse = torch.stack([torch.logsumexp(row, dim=-1) for row in logits])
        return selected - lse
    rows = []
    for row_logits, row_index in zip(logits, index, strict=True):
        row_logps = torch.log_softmax(row_logits, dim=-1)
        rows.append(row_logps.gather(-1, row_index.unsqueeze(-1)).squeeze(-1))
    return torch.stack(rows)


def shifted_token_logps(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> TokenLogps:
    """Log-probability of each next token under a causal LM.

    A causal LM's logits at position ``t`` predict the token at ``t + 1``, so
    ``logps[b, t] = log p(labels[b, t+1] | tokens <= t)`` for ``t = 0 .. T-2``.

    Shapes: ``logits (B, T, V)``, ``labels (B, T)`` (usually the input ids with prompt and padding
    set to ``ignore_index``) -> ``TokenLogps(logps (B, T-1), mask (B, T-1) bool)``. ``logps`` is 0
    wherever ``mask`` is False.
    """
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits (B, T, V) and labels (B, T); got {tuple(logits.shape)} "
            f"and {tuple(labels.shape)}"
        )
    next_logits = logits[:, :-1, :]
    next_labels = labels[:, 1:]
    mask = next_labels != ignore_index
    safe_labels = torch.where(mask, next_labels, torch.zeros_like(next_labels))
    logps = selective_log_softmax(next_logits, safe_labels)
    logps = torch.where(mask, logps, torch.zeros_like(logps))
    return TokenLogps(logps, mask)


def sequence_logps(token_logps: Tensor, mask: Tensor, average: bool = False) -> Tensor:
    """Log-probability of each sequence: ``sum_t m_t logp_t`` (or the mean when ``average``).

    Shapes: ``token_logps (B, T)``, ``mask (B, T)`` -> ``(B,)``. ``average=True`` gives the
    length-normalised log-probability (IPO as implemented in TRL, SimPO).
    """
    if average:
        return masked_mean(token_logps, mask, dim=-1)
    return masked_sum(token_logps, mask, dim=-1)


class _FrozenHeadLogps(torch.autograd.Function):
    """Token log-probs through a frozen linear head, gradient w.r.t. ``hidden`` computed in forward.

    For ``z = h W^T + b`` and ``logp = z_y - logsumexp(z)``:
    ``d logp / d h = W_y - softmax(z) W``. Each chunk's ``(chunk, V)`` logits are used once and
    freed; only the ``(N, H)`` gradient is kept, and backward scales its rows by the incoming
    gradient. No logits are recomputed, and no ``(N, V)`` tensor outlives its chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, ids, chunk):
        logps, grads = [], []
        for s in range(0, hidden.shape[0], chunk):
            h, y = hidden[s : s + chunk], ids[s : s + chunk]
            z = torch.nn.functional.linear(h, weight, bias).float()
            lse = torch.logsumexp(z, dim=-1)
            logps.append(z.gather(-1, y[:, None])[:, 0] - lse)
            p = torch.exp(z.sub_(lse[:, None])).to(weight.dtype)  # softmax, in place of z
            grads.append(weight[y] - p @ weight)
        ctx.save_for_backward(torch.cat(grads) if grads else hidden.new_zeros(hidden.shape))
        return torch.cat(logps) if logps else hidden.new_zeros(0, dtype=torch.float32)

    @staticmethod
    def backward(ctx, grad_out):
        (dlogp_dh,) = ctx.saved_tensors
        return (grad_out[:, None] * dlogp_dh).to(dlogp_dh.dtype), None, None, None, None


def _chunk_logps(hidden, weight, bias, ids):
    logits = torch.nn.functional.linear(hidden, weight, bias).float()
    return logits.gather(-1, ids[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)


def linear_token_logps(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, ids: Tensor, chunk: int = 1024
) -> Tensor:
    """``log_softmax(hidden @ weight.T + bias)[i, ids[i]]`` for each row, without ``(N, V)`` logits.

    Shapes: ``hidden (N, H)``, ``weight (V, H)``, ``bias (V,)`` or None, ``ids (N,)`` -> ``(N,)``
    float32. The head is applied ``chunk`` rows at a time. When the head is frozen (LoRA, tied
    embeddings) the gradient w.r.t. ``hidden`` is computed in the same pass
    (``W_y - softmax(z) W``), so backward costs nothing extra; when the head trains, each chunk
    is recomputed in backward (activation checkpointing). Peak extra memory is one
    ``(chunk, V)`` block either way.
    """
    head_trains = weight.requires_grad or (bias is not None and bias.requires_grad)
    if torch.is_grad_enabled() and hidden.requires_grad and not head_trains:
        return _FrozenHeadLogps.apply(hidden, weight, bias, ids, chunk)
    if torch.is_grad_enabled() and (hidden.requires_grad or head_trains):
        from functools import partial

        from torch.utils.checkpoint import checkpoint

        score = partial(checkpoint, _chunk_logps, use_reentrant=False)
    else:
        score = _chunk_logps
    out = [score(hidden[s : s + chunk], weight, bias, ids[s : s + chunk])
           for s in range(0, hidden.shape[0], chunk)]  # fmt: skip
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)
