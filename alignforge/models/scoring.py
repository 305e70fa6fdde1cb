"""Log-probabilities of chosen target tokens, running the LM head only where a target is scored.

    from alignforge.models.scoring import target_token_logps
    # rows[i], preds[i]: the (row, position) whose hidden state predicts token ids[i]
    logps = target_token_logps(model, input_ids, rows, preds, ids, attention_mask=mask)  # (N,)

A causal LM's head turns every position's hidden state into ``V`` logits (V = 49k for the
default model), yet a loss needs one log-prob per *target* token: the completion of SFT, the
responses of DPO. Here the decoder runs once, the hidden states at the predicting positions are
gathered, and the head is applied to those rows alone through
:func:`alignforge.losses.logprobs.linear_token_logps`, which never holds a ``(N, V)`` tensor and,
for a frozen head, needs no recomputation in backward. Models whose head is not a plain linear
layer (logit soft-capping, scaling) or that sit inside a DDP/FSDP wrapper go through their own
forward with ``logits_to_keep`` instead; both paths give the same values.
"""

from __future__ import annotations

import torch
from torch import Tensor

from alignforge.losses.logprobs import linear_token_logps
from alignforge.models.attention import attention_inputs


def decoder_and_head(model):
    """``(decoder, lm_head)`` when the head is a plain linear layer we may apply ourselves."""
    if hasattr(model, "module"):  # DDP/FSDP wrappers must see their own forward
        return None
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (
        None,
        1.0,
    ):
        return None
    decoder = getattr(lm, getattr(lm, "base_model_prefix", "model"), None)
    head = lm.get_output_embeddings()
    if decoder is None or type(head) is not torch.nn.Linear:
        return None
    return decoder, head


def target_token_logps(
    model,
    input_ids: Tensor,
    rows: Tensor,
    preds: Tensor,
    ids: Tensor,
    temperature: float = 1.0,
    **kwargs,
) -> Tensor:
    """``log softmax(logits / temperature)[ids[i]]`` at ``(rows[i], preds[i])`` -> ``(N,)``.

    ``kwargs`` go to the model (``attention_mask``, ``position_ids``) in the form its attention
    backend reads (:func:`alignforge.models.attention.attention_inputs`): a packed batch (no
    ``attention_mask``, ``position_ids`` restarting per example) keeps its examples apart under
    every backend. ``preds`` is the position *before* each target token (the causal shift is the
    caller's, made explicit). The head is linear, so ``(h W^T + b) / T = (h / T) W^T + b / T``:
    the temperature scales its inputs.
    """
    inputs = attention_inputs(model, input_ids, **kwargs)
    rows, preds = inputs.locate(rows, preds)
    input_ids, kwargs = inputs.input_ids, inputs.kwargs
    parts = decoder_and_head(model)
    if parts is None:
        keep = torch.unique(preds)
        logits = model(input_ids=input_ids, logits_to_keep=keep, use_cache=False, **kwargs).logits
        col = torch.searchsorted(keep, preds)
        lse = torch.stack([torch.logsumexp(r.float() / temperature, dim=-1) for r in logits])
        return logits[rows, col, ids].float() / temperature - lse[rows, col]
    decoder, head = parts
    hidden = decoder(input_ids=input_ids, use_cache=False, **kwargs).last_hidden_state[rows, preds]
    bias = head.bias
    if temperature != 1.0:
        hidden = hidden / temperature
        bias = None if bias is None else bias / temperature
    return linear_token_logps(hidden, head.weight, bias, ids)
