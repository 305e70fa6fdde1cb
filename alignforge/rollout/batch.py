"""Rollouts as training tensors, and the behaviour model that samples them.

batch = rollout_batch(rollouts, pad_id)     # input_ids, attention_mask, mask, rollout_logps, eos
mb = trim_padding({k: v[rows] for k, v in batch.items()})
quantize_int8(model)                        # alignforge serve --quantization int8
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor, nn

from alignforge.rollout.base import Rollout


def rollout_batch(rollouts: list[Rollout], pad_id: int) -> dict[str, Tensor]:
    """Right-padded prompt+completion tensors; ``mask``/``rollout_logps`` are ``(B, L-1)``, aligned
    with ``token_logps`` (position t holds the log-prob of token t+1)."""
    seqs = [r.prompt_ids + r.completion_ids for r in rollouts]
    width = max(len(s) for s in seqs)
    B = len(seqs)
    ids = torch.full((B, width), pad_id, dtype=torch.long)
    attn = torch.zeros((B, width), dtype=torch.long)
    mask = torch.zeros((B, width - 1))
    behaviour = torch.zeros((B, width - 1))
    for i, (r, s) in enumerate(zip(rollouts, seqs, strict=True)):
        ids[i, : len(s)] = torch.tensor(s)
        attn[i, : len(s)] = 1
        p, c = len(r.prompt_ids), len(r.completion_ids)
        mask[i, p - 1 : p - 1 + c] = 1
        behaviour[i, p - 1 : p - 1 + c] = torch.tensor(r.logps, dtype=torch.float32)
    eos = torch.tensor([r.finish_reason == "stop" for r in rollouts])
    return {
        "input_ids": ids,
        "attention_mask": attn,
        "mask": mask,
        "rollout_logps": behaviour,
        "eos": eos,
    }


def trim_padding(batch: dict) -> dict:
    """The batch cut to its longest row: right padding past every row's end is dropped.

    Tensors are ``(B, L)`` (ids, attention) or ``(B, L-1)`` (per-token values); others pass.
    """
    width = int(batch["attention_mask"].sum(-1).max())
    L = batch["attention_mask"].shape[1]
    if width == L:
        return batch
    cut = {L: width, L - 1: width - 1}
    return {
        k: v[:, : cut[v.shape[1]]] if torch.is_tensor(v) and v.dim() == 2 else v
        for k, v in batch.items()
    }


def behaviour_model(policy, precision: str, adapter: str = "default"):
    """The model that samples: the policy itself, or a merged bf16 / int8 copy of it.

    The copies differ numerically from the trainer, like a vLLM engine does; int8 uses
    ``torch.ao.quantization.quantize_dynamic`` on every linear layer (CPU only).
    """
    if precision == "same":
        return policy
    merged = copy.deepcopy(policy).merge_and_unload(adapter_names=[adapter]).eval()
    merged.requires_grad_(False)
    if precision == "bfloat16":
        return merged.to(torch.bfloat16)
    return torch.ao.quantization.quantize_dynamic(merged.cpu(), {nn.Linear}, dtype=torch.qint8)


class Int8Linear(nn.Linear):
    """A linear layer whose product runs in torch's dynamic int8 kernel (the one
    ``quantize_dynamic`` uses: int8 weights, activations quantised per call), while staying an
    ``nn.Linear`` with its float weight, so that peft still wraps it with float LoRA adapters, as
    an inference engine applies LoRA over quantised base weights. CPU only."""

    def __init__(self, linear: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        quantized = torch.ao.quantization.quantize_dynamic(
            nn.Sequential(linear), {nn.Linear}, dtype=torch.qint8
        )[0]
        # a plain attribute, outside the module tree: peft loads adapters with load_state_dict,
        # where a quantised submodule would demand its packed weights among the adapter's keys
        self.int8_product = quantized.forward

    def forward(self, x: Tensor) -> Tensor:
        return self.int8_product(x)


def quantize_int8(model: nn.Module) -> nn.Module:
    """Every ``nn.Linear`` of ``model`` (on the CPU, float32) becomes an :class:`Int8Linear`, in
    place; returns ``model``."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if type(child) is nn.Linear:
                setattr(module, name, Int8Linear(child))
    return model
