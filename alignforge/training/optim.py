"""Optimizer and learning-rate schedule (the schedule is ``transformers.get_scheduler``)."""

from __future__ import annotations

import math

import torch


def build_optimizer(
    model: torch.nn.Module,
    lr: float,
    weight_decay: float = 0.0,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
) -> torch.optim.AdamW:
    """AdamW over trainable parameters; biases and norm weights (1-D tensors) get no decay."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 else decay).append(p)
    if not decay and not no_decay:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps)


def build_scheduler(optimizer, kind: str, warmup: int, total: int):
    """transformers' learning-rate schedule: ``warmup`` steps of linear warmup from 0, then
    ``kind`` (``linear`` or ``cosine`` decay to 0 at step ``total``, or ``constant``).

    ``constant`` is transformers' ``constant_with_warmup`` (with ``warmup=0`` the two agree), so
    ``warmup_steps`` / ``warmup_ratio`` apply to every kind. The schedule is a ``LambdaLR``: its
    state (step and base learning rates) is saved and restored with the checkpoint.
    """
    from transformers import get_scheduler

    name = "constant_with_warmup" if kind == "constant" else kind
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total)


def warmup_steps(total: int, warmup_steps: int, warmup_ratio: float) -> int:
    return warmup_steps if warmup_steps > 0 else int(math.ceil(total * warmup_ratio))
