"""A warning before a run is likely to run out of memory, from the model's shape and the batch.

    warn_if_memory_short(lm.config, cfg, sequences_per_batch=2 * cfg.per_device_train_batch_size)

Training memory on one device is the weights plus the optimizer state of the trainable ones
plus the activations kept for backward; on a small model the activations dominate. They grow
with every token of a micro-batch in every layer, and attention adds a ``T x T`` score matrix per
head. The constants below were measured on the default model (SmolLM2-135M, 30 layers, hidden
576, 9 heads), LoRA, float32, CPU: the reward model at ``max_length`` 512 and 256 with 4 pairs
(8 sequences) per micro-batch peaked at about 15 and 6 GB (docs/results.md), which these two
constants reproduce within 1.5 GB. It is an estimate, printed with its inputs; gradient
checkpointing keeps about one layer's activations instead of all.
"""

from __future__ import annotations

import os
import warnings

PER_TOKEN_HIDDEN = 16  # float32 activations kept per token per layer, in units of hidden size
PER_SCORE = 4  # float32 values kept per head per (query, key) pair (scores, softmax, dropout)
SHARE = 0.5  # warn above this share of the device's memory


def device_memory_bytes() -> int:
    """Total memory of the training device: the GPU's, else the machine's RAM."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def activation_bytes(config, sequences: int, length: int, checkpointing: bool) -> float:
    """Estimated activations kept for backward by one micro-batch of ``sequences`` rows of
    ``length`` tokens, in bytes (float32)."""
    layers = config.num_hidden_layers
    per_layer = (
        sequences
        * length
        * (PER_TOKEN_HIDDEN * config.hidden_size + PER_SCORE * config.num_attention_heads * length)
    )
    kept_layers = 1 if checkpointing else layers
    # checkpointing still keeps each layer's input: one hidden state per token per layer
    inputs = sequences * length * config.hidden_size * layers if checkpointing else 0
    return 4.0 * (per_layer * kept_layers + inputs)


def warn_if_memory_short(config, cfg, sequences_per_batch: int) -> float:
    """Warn when the estimate for ``cfg``'s micro-batch (``sequences_per_batch`` rows of up to
    ``cfg.max_length`` tokens) passes ``SHARE`` of the device's memory; returns the estimate."""
    need = activation_bytes(config, sequences_per_batch, cfg.max_length, cfg.gradient_checkpointing)
    total = device_memory_bytes()
    if need > SHARE * total:
        warnings.warn(
            f"per_device_train_batch_size {cfg.per_device_train_batch_size} x max_length "
            f"{cfg.max_length}: about {need / 2**30:.0f} GiB of activations for backward, "
            f"{total / 2**30:.0f} GiB on this device; this will likely run out of memory. Lower "
            "max_length or per_device_train_batch_size (raise gradient_accumulation_steps to keep "
            "the batch), or set gradient_checkpointing: true",
            stacklevel=2,
        )
    return need
