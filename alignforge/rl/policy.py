"""The PPO policy: a merged SFT model with a LoRA ``default`` adapter (the policy) and, for GAE, a
``value`` adapter with a scalar head (the critic). Both adapters share one copy of the base
weights; the reference policy is the same model with the adapters disabled.

    model, head = build_policy(path, dtype="float32", lora=dict(r=16, ...), with_critic=True)
    logps = token_logps(model, batch, temperature=1.0)        # (B, L-1) under the policy
    values = token_values(model, head, batch)                 # (B, L-1) under the critic
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from pathlib import Path

from torch import Tensor, nn

from alignforge.config import ConfigError
from alignforge.losses.logprobs import selective_log_softmax
from alignforge.models import is_adapter_dir, load_model, resolve_model_path
from alignforge.models.heads import ScalarHead, final_hidden_states, position_ids_from_mask
from alignforge.models.scoring import target_token_logps

POLICY, VALUE = "default", "value"  # adapter names: "default" saves the policy at the top of a dir


def check_reference(model_name_or_path: str, cache: str | None) -> str:
    """Refuse an unmerged adapter: with it the reference (adapter disabled) would be the base."""
    path = resolve_model_path(model_name_or_path, cache)
    if is_adapter_dir(path):
        raise ConfigError(
            f"model_name_or_path: {model_name_or_path} is an unmerged PEFT adapter. PPO's reference "
            "policy is this model with the adapter disabled, which would silently be the adapter's "
            f"BASE model, not your SFT model. Merge it first: `alignforge merge {model_name_or_path} "
            "--output <dir>` and point model_name_or_path at <dir>."
        )
    return path


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere (LoRA dropout included), as TRL does in RL and preference training:
    old log-probs, values and the reference are computed without dropout, so the trained side
    must be too, or the PPO ratio is not 1 on the first mini-batch."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0


def build_policy(
    path: str,
    *,
    dtype: str,
    lora: dict,
    with_critic: bool,
    quantize_4bit: bool = False,
    gradient_checkpointing: bool = False,
    cache: str | None = None,
    attn_implementation: str | None = None,
):
    """The model at ``path`` with a trainable LoRA policy adapter (+ a ``value`` adapter and head).

    ``lora`` holds peft's ``LoraConfig`` arguments (r, lora_alpha, lora_dropout, target_modules).
    """
    from peft import LoraConfig, get_peft_model

    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    base = load_model(path, dtype=dtype, quantize_4bit=quantize_4bit, cache=cache, **kwargs)
    if quantize_4bit:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=gradient_checkpointing
        )
    elif gradient_checkpointing:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
        base.enable_input_require_grads()
    config = LoraConfig(task_type="CAUSAL_LM", **lora)
    model = get_peft_model(base, config, adapter_name=POLICY)
    head = None
    if with_critic:
        model.add_adapter(VALUE, copy.deepcopy(config))
        head = ScalarHead(model.config.hidden_size)
        use_adapter(model, POLICY)
        _enable_adapter_grads(model)  # add_adapter leaves the new adapter frozen
    return model, head


def _enable_adapter_grads(model) -> None:
    """Both adapters trainable, except the critic's LoRA on the LM head: the critic reads the
    hidden states, never the logits, so those weights get no gradient (and DDP would stop)."""
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(not ("lm_head" in name and f".{VALUE}." in name))


def use_adapter(model, name: str) -> None:
    """Make ``name`` the active adapter; both adapters stay trainable (peft would freeze the other)."""
    if name in getattr(model, "peft_config", {}) and model.active_adapter != name:
        model.set_adapter(name)
        _enable_adapter_grads(model)


@contextmanager
def critic(model):
    use_adapter(model, VALUE)
    try:
        yield model
    finally:
        use_adapter(model, POLICY)


class Trainables(nn.Module):
    """What the optimizer, DDP and the checkpoints hold: both LoRA adapters and the value head.

    ``trainables(fn)`` runs ``fn(policy, value_head)`` inside the module's forward, so a prepared
    (DDP) wrapper sees the whole mini-batch loss and syncs every trained parameter once.
    """

    def __init__(self, policy, value_head):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, fn):
        return fn(self.policy, self.value_head)


def token_logps(model, batch: dict, temperature: float) -> Tensor:
    """Log-probs ``(B, L-1)`` of ``input_ids[:, 1:]`` under the active adapter, at ``temperature``.

    With a response ``mask`` in ``batch`` only the masked positions are scored (the LM head runs
    on response tokens alone, not on the prompt); the others hold 0 and are masked downstream.
    """
    ids, attn = batch["input_ids"], batch["attention_mask"]
    kwargs = dict(attention_mask=attn, position_ids=position_ids_from_mask(attn))
    mask = batch.get("mask")
    if mask is None:
        logits = model(input_ids=ids, use_cache=False, **kwargs).logits[:, :-1]
        return selective_log_softmax(logits.float() / temperature, ids[:, 1:])
    rows, preds = mask.nonzero(as_tuple=True)
    logps = target_token_logps(model, ids, rows, preds, ids[rows, preds + 1], temperature, **kwargs)
    return logps.new_zeros(mask.shape).index_put((rows, preds), logps.float())


def token_values(model, head: ScalarHead, batch: dict) -> Tensor:
    """Critic values ``(B, L-1)``: value at t is the state before token t+1 is generated."""
    with critic(model):
        hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    return head(hidden[:, :-1]).float()


def save_policy(model, head, tokenizer, final) -> None:
    """The policy adapter at the top of ``final`` (loadable, merge it to deploy) with the
    tokenizer; with a critic, its adapter and value head in ``final/value``."""
    from safetensors.torch import save_file

    model.save_pretrained(final, selected_adapters=[POLICY], safe_serialization=True)
    tokenizer.save_pretrained(final)
    if head is not None:
        model.save_pretrained(final, selected_adapters=[VALUE], safe_serialization=True)
        state = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
        save_file(state, Path(final) / VALUE / "value_head.safetensors")
