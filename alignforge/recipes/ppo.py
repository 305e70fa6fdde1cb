"""PPO RLHF (``stage: ppo``): a LoRA policy on a merged SFT model, a reward model and/or a
programmatic reward, a critic on a second adapter, off-policy correction and a reward-drift monitor.

    alignforge merge runs/sft/final --output runs/sft-merged      # the reference must be merged
    alignforge train examples/ppo.yaml
    alignforge train examples/ppo.yaml rollout_precision=int8 offpolicy_correction=truncate

One iteration, top to bottom:

1. **rollout**: the behaviour policy samples ``num_generations`` answers per prompt and returns
   per-token log-probs (``rollout_logps``). It is the policy itself, a bf16 or int8 copy
   (``rollout_precision``), or a batch sampled ``rollout_staleness`` iterations ago.
2. **score**: reward model (read at the final token) times its weight plus ``reward_fn``.
3. **prepare**: the trainer recomputes ``old_logps`` (policy), ``ref_logps`` (same model, adapter
   disabled = the merged SFT checkpoint) and values (the ``value`` adapter + value head: the
   critic shares the base weights, adapters are hot-swapped). Off-policy weights
   ``pi_old / mu`` and their diagnostics; per-token KL-shaped rewards; advantages (GAE, GRPO,
   RLOO, REINFORCE++).
4. **train**: ``ppo_epochs`` passes of mini-batches with the clipped policy loss (importance
   weights and the rejection mask applied) and the clipped value loss.
5. **monitor**: KL controller update, drift monitor (warn / restore + lower lr / stop),
   metrics, checkpoints.

The reference policy is the loaded checkpoint with the adapter disabled, so a PEFT adapter
directory is refused: its reference would silently be its *base* model.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
import time
import warnings
from collections import deque
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from alignforge.config import ConfigError
from alignforge.config.rlhf import PPOConfig
from alignforge.data import DataError
from alignforge.losses.importance import importance_weights, offpolicy_diagnostics
from alignforge.losses.logprobs import selective_log_softmax
from alignforge.losses.ppo import ppo_policy_loss, ppo_value_loss
from alignforge.losses.reduce import masked_mean, masked_whiten
from alignforge.models import (
    disabled_adapter,
    is_adapter_dir,
    load_model,
    load_tokenizer,
    resolve_model_path,
)
from alignforge.models.heads import (
    ScalarHead,
    final_hidden_states,
    position_ids_from_mask,
)
from alignforge.models.scoring import target_token_logps
from alignforge.recipes.common import load_splits, peak_memory_mb, write_summary
from alignforge.rl.advantages import compute_advantages
from alignforge.rl.drift import DriftAction, RewardDriftMonitor, decide
from alignforge.rl.kl import AdaptiveKLController, FixedKLController, kl_penalty
from alignforge.rl.rewards import shape_rewards
from alignforge.rollout import Rollout, TransformersEngine, chat_prompt_ids
from alignforge.training import NonFiniteLossError
from alignforge.training.checkpoint import CheckpointManager
from alignforge.training.optim import build_optimizer, build_scheduler, warmup_steps
from alignforge.training.rundir import prepare_output_dir
from alignforge.training.tracking import MetricsLogger

CONFIG = PPOConfig
MIN_DRIFT_REFERENCE = 10  # RewardDriftMonitor needs at least this many reference scores
POLICY, VALUE = "default", "value"  # adapter names: "default" saves the policy at the top of a dir


# ---------------------------------------------------------------- rollouts --


def _make_engine(model, tokenizer, policy_version: str, batch_size: int) -> TransformersEngine:
    """The rollout engine (in process). Another engine only needs the same ``generate``."""
    return TransformersEngine(
        model, tokenizer, policy_version=policy_version, batch_size=batch_size
    )


def behaviour_model(policy, precision: str):
    """The model that samples: the policy itself, or a merged bf16 / int8 copy of it.

    The copies differ numerically from the trainer, like a vLLM engine does; int8 uses
    ``torch.ao.quantization.quantize_dynamic`` on every linear layer.
    """
    if precision == "same":
        return policy
    merged = copy.deepcopy(policy).merge_and_unload(adapter_names=[POLICY]).eval()
    merged.requires_grad_(False)
    if precision == "bfloat16":
        return merged.to(torch.bfloat16)
    return torch.ao.quantization.quantize_dynamic(merged, {nn.Linear}, dtype=torch.qint8)


# ------------------------------------------------------------------ models --


def check_reference(model_name_or_path: str, cache: str | None) -> str:
    """Refuse an unmerged adapter: with it the reference (adapter disabled) would be the base."""
    path = resolve_model_path(model_name_or_path, cache)
    if is_adapter_dir(path):
        raise ConfigError(
            f"model_name_or_path: {model_name_or_path} is an unmerged PEFT adapter. PPO's reference policy is "
            "this model with the adapter disabled, which would silently be the adapter's BASE model, not your "
            f"SFT model. Merge it first: `alignforge merge {model_name_or_path} --output <dir>` and point "
            "model_name_or_path at <dir>."
        )
    return path


def build_policy(cfg: PPOConfig, with_critic: bool):
    """The merged SFT model with a trainable LoRA policy adapter (+ a ``value`` adapter and head)."""
    from peft import LoraConfig, get_peft_model

    path = check_reference(cfg.model_name_or_path, cfg.cache_dir)
    quant = cfg.finetuning_type == "qlora"
    base = load_model(path, dtype=cfg.dtype, quantize_4bit=quant, cache=cfg.cache_dir)
    if quant:
        from peft import prepare_model_for_kbit_training

        base = prepare_model_for_kbit_training(
            base, use_gradient_checkpointing=cfg.gradient_checkpointing
        )
    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules="all-linear" if cfg.lora_target == "all" else list(cfg.lora_target),
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora, adapter_name=POLICY)
    head = None
    if with_critic:
        model.add_adapter(VALUE, copy.deepcopy(lora))
        head = ScalarHead(model.config.hidden_size)
        use_adapter(model, POLICY)
        _enable_adapter_grads(model)  # add_adapter leaves the new adapter frozen
    return model, head


def _enable_adapter_grads(model) -> None:
    for name, p in model.named_parameters():
        if "lora_" in name:
            p.requires_grad_(True)


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
    """What the optimizer and the checkpoints hold: both LoRA adapters and the value head."""

    def __init__(self, policy, value_head):
        super().__init__()
        self.policy, self.value_head = policy, value_head


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
    return logps.new_zeros(mask.shape).index_put((rows, preds), logps)


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


def token_values(model, head: ScalarHead, batch: dict) -> Tensor:
    """Critic values ``(B, L-1)``: value at t is the state before token t+1 is generated."""
    with critic(model):
        hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
    return head(hidden[:, :-1])


# ------------------------------------------------------------------ data ----


def prompt_messages(row: dict, where: str):
    if "prompt" in row and isinstance(row["prompt"], str | list):
        return row["prompt"]
    if isinstance(row.get("instruction"), str):  # alpaca rows
        return (row["instruction"] + ("\n" + row["input"] if row.get("input") else "")).strip()
    if isinstance(
        row.get("conversations"), list
    ):  # sharegpt rows: the human turns before the answer
        conv = row["conversations"]
        conv = conv[:-1] if conv and conv[-1].get("from") in ("gpt", "assistant") else conv
        return [
            {
                "role": "user" if m.get("from") in ("human", "user") else m.get("from", "user"),
                "content": m.get("value", ""),
            }
            for m in conv
        ]
    if "messages" in row and isinstance(row["messages"], list):
        msgs = list(row["messages"])
        return msgs[:-1] if msgs and msgs[-1].get("role") == "assistant" else msgs
    raise DataError(
        f"{where}: needs a `prompt` (string or messages) or `messages`; row has {sorted(row)}"
    )


def encode_prompt(tokenizer, prompt, max_length: int) -> list[int]:
    """Prompt ids with the chat template's generation prompt; the last ``max_length`` are kept."""
    return chat_prompt_ids(tokenizer, prompt)[-max_length:]


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


# ---------------------------------------------------------------- rewards ---


def load_reward_fn(spec: str):
    """``module:function`` -> the function; errors say what is wrong with the spec."""
    if ":" not in spec:
        raise ConfigError(f"reward_fn: {spec!r} must look like `package.module:function`")
    mod_name, fn_name = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"reward_fn: cannot load {spec!r}: {e}") from e
    if not callable(fn):
        raise ConfigError(f"reward_fn: {spec!r} is not callable")
    return fn


def token_fraction(prompts, completions, completion_ids, target_ids: list[int]) -> list[float]:
    """Share of completion tokens that are one of ``target_ids`` (a simple learnable reward)."""
    target = set(target_ids)
    return [sum(t in target for t in ids) / max(len(ids), 1) for ids in completion_ids]


def length_reward(prompts, completions, completion_ids, target_length: int) -> list[float]:
    """``1 - |len - target| / target``: answers of ``target_length`` tokens score 1."""
    return [1.0 - abs(len(ids) - target_length) / target_length for ids in completion_ids]


class Scorer:
    """RM score x weight + reward_fn x weight, per rollout."""

    def __init__(self, cfg: PPOConfig):
        from alignforge.models.heads import load_reward_model

        self.rm = (
            load_reward_model(cfg.reward_model, cache=cfg.cache_dir) if cfg.reward_model else None
        )
        self.fn = load_reward_fn(cfg.reward_fn) if cfg.reward_fn else None
        self.fn_kwargs = cfg.reward_fn_kwargs
        self.w_rm, self.w_fn = cfg.reward_model_weight, cfg.reward_fn_weight

    def __call__(self, prompts: list, rollouts: list[Rollout]):
        """(total (B,), rm scores (B,) or None, reward_fn scores (B,) or None)."""
        texts = [r.text for r in rollouts]
        total = torch.zeros(len(rollouts))
        rm_scores = fn_scores = None
        if self.rm is not None:
            rm_scores = torch.tensor(self.rm.score(prompts, texts), dtype=torch.float32)
            total += self.w_rm * rm_scores
        if self.fn is not None:
            ids = [r.completion_ids for r in rollouts]
            values = self.fn(
                prompts=prompts, completions=texts, completion_ids=ids, **self.fn_kwargs
            )
            fn_scores = torch.tensor([float(v) for v in values], dtype=torch.float32)
            if fn_scores.shape != total.shape or not torch.isfinite(fn_scores).all():
                raise ValueError(
                    f"reward_fn returned {values!r}: need one finite float per completion"
                )
            total += self.w_fn * fn_scores
        return total, rm_scores, fn_scores


# ------------------------------------------------------------------ loop ----


class PPORun:
    """The outer loop: rollout -> score -> prepare -> epochs of mini-batch updates -> monitor."""

    def __init__(self, cfg: PPOConfig, callbacks=()):
        self.cfg, self.callbacks = cfg, list(callbacks)
        self.out = prepare_output_dir(cfg)
        torch.manual_seed(cfg.seed)
        self.tokenizer = load_tokenizer(
            check_reference(cfg.model_name_or_path, cfg.cache_dir), cfg.cache_dir
        )
        rows, _ = load_splits(cfg.dataset, None, 0.0, cfg.seed, cfg.max_samples)
        self.prompts = [prompt_messages(r, f"{cfg.dataset} row {i}") for i, r in enumerate(rows)]
        if not self.prompts:
            raise DataError(f"{cfg.dataset}: no prompts")
        self.prompt_ids = [encode_prompt(self.tokenizer, p, cfg.max_length) for p in self.prompts]
        self.use_critic = cfg.advantage_estimator == "gae"
        self.model, self.value_head = build_policy(cfg, self.use_critic)
        self.modules = Trainables(self.model, self.value_head)
        self.scorer = Scorer(cfg)
        per_epoch = math.ceil(len(self.prompts) / cfg.rollout_batch_size)
        self.total_steps = (
            cfg.max_steps if cfg.max_steps > 0 else math.ceil(per_epoch * cfg.num_train_epochs)
        )
        self.optimizer = build_optimizer(
            self.modules,
            cfg.learning_rate,
            cfg.weight_decay,
            (cfg.adam_beta1, cfg.adam_beta2),
            cfg.adam_epsilon,
        )
        warm = warmup_steps(self.total_steps, cfg.warmup_steps, cfg.warmup_ratio)
        self.scheduler = build_scheduler(
            self.optimizer, cfg.lr_scheduler_type, warm, self.total_steps
        )
        self.kl_ctl = (
            AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
            if cfg.adaptive_kl
            else FixedKLController(cfg.kl_coef)
        )
        self.monitor = self._make_monitor()
        self.ckpt = CheckpointManager(self.out, keep=cfg.save_total_limit)
        self.logger = MetricsLogger(self.out, cfg.report_to)
        self.step, self.generated, self.restores, self.lr_scale = 0, 0, 0, 1.0
        self.queue: deque[list[Rollout]] = deque()
        self.events: list[dict] = []
        self.stopped: str | None = None

    def _make_monitor(self) -> RewardDriftMonitor | None:
        cfg = self.cfg
        ref = cfg.drift_reference or (
            str(Path(cfg.reward_model) / "reward_scores_eval.json") if cfg.reward_model else None
        )
        if ref is None:
            return None
        if not Path(ref).exists():
            raise ConfigError(
                f"drift_reference: {ref} does not exist (the RM stage writes reward_scores_eval.json next to its model)"
            )
        scores = json.loads(Path(ref).read_text())
        if len(scores) < MIN_DRIFT_REFERENCE:
            warnings.warn(
                f"drift monitor off: {ref} holds {len(scores)} reward scores, fewer than "
                f"{MIN_DRIFT_REFERENCE}; a distribution cannot be compared with so few (give the RM more eval pairs)",
                stacklevel=2,
            )
            return None
        return RewardDriftMonitor(
            scores,
            window=cfg.drift_window,
            max_outlier_frac=cfg.drift_max_outlier_frac,
            psi_threshold=cfg.drift_psi_threshold,
            min_samples=cfg.drift_min_samples,
        )

    # -- rollouts --------------------------------------------------------------
    def _prompt_indices(self, gen_index: int) -> list[int]:
        """The prompts of the ``gen_index``-th rollout batch: a fixed permutation per epoch."""
        bs, n = self.cfg.rollout_batch_size, len(self.prompts)
        out = []
        for k in range(gen_index * bs, (gen_index + 1) * bs):
            epoch, j = divmod(k, n)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.cfg.seed + epoch))
            out.append(int(perm[j]))
        return out

    def _sample(self) -> list[Rollout]:
        cfg = self.cfg
        idx = self._prompt_indices(self.generated)
        engine = _make_engine(
            behaviour_model(self.model, cfg.rollout_precision),
            self.tokenizer,
            str(self.step),
            max(cfg.per_device_eval_batch_size, 1),
        )
        groups = engine.generate(
            [self.prompt_ids[i] for i in idx],
            n=cfg.num_generations,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed * 1_000_003 + self.generated,
        )
        self.generated += 1
        return [(i, r) for i, g in zip(idx, groups, strict=True) for r in g]

    def next_rollouts(self) -> list[tuple[int, Rollout]]:
        """This iteration's batch: fresh, or ``rollout_staleness`` iterations old."""
        while len(self.queue) < self.cfg.rollout_staleness:
            self.queue.append(self._sample())
        self.queue.append(self._sample())
        return self.queue.popleft()

    # -- prepare -------------------------------------------------------------------
    @torch.no_grad()
    def score_batch(self, batch: dict) -> tuple[Tensor, Tensor, Tensor | None]:
        """Policy and reference log-probs and values ``(B, L-1)``, ``mini_batch_size`` rows at a
        time, rows of similar length together, each chunk cut to its own longest row."""
        model, mask = self.model, batch["mask"]
        out = [torch.zeros(mask.shape) for _ in range(3 if self.use_critic else 2)]
        order = batch["attention_mask"].sum(-1).argsort()
        model.eval()
        for chunk in order.split(self.cfg.mini_batch_size):
            mb = trim_padding({k: v[chunk] for k, v in batch.items()})
            w = mb["mask"].shape[1]
            out[0][chunk, :w] = token_logps(model, mb, self.cfg.temperature)
            with disabled_adapter(model):
                out[1][chunk, :w] = token_logps(model, mb, self.cfg.temperature)
            if self.use_critic:
                out[2][chunk, :w] = token_values(model, self.value_head, mb) * mb["mask"]
        model.train()
        return out[0], out[1], out[2] if self.use_critic else None

    @torch.no_grad()
    def prepare(self, batch: dict, scores: Tensor) -> tuple[dict, dict]:
        """old/ref log-probs, values, importance weights, shaped rewards and advantages."""
        cfg = self.cfg
        mask = batch["mask"]
        trainer_old, ref, values = self.score_batch(batch)
        if cfg.offpolicy_correction != "none":
            iw = importance_weights(
                trainer_old,
                batch["rollout_logps"],
                mask,
                level=cfg.offpolicy_level,
                mode=cfg.offpolicy_correction,
                lower=cfg.offpolicy_lower,
                upper=cfg.offpolicy_upper,
            )
            weights, loss_mask, diag = iw.weights, iw.mask, iw.diagnostics
        else:
            weights, loss_mask = None, mask
            diag = offpolicy_diagnostics(
                trainer_old, batch["rollout_logps"], mask, level=cfg.offpolicy_level
            )
        old = batch["rollout_logps"] if cfg.offpolicy_old_logps == "bypass" else trainer_old
        kl_in_reward = cfg.advantage_estimator in ("gae", "reinforce_pp")
        shaped = shape_rewards(
            scores,
            trainer_old,
            ref,
            mask,
            kl_coef=self.kl_ctl.value if kl_in_reward else 0.0,
            kl_kind=cfg.kl_estimator,
            eos_found=batch["eos"],
            missing_eos_penalty=cfg.missing_eos_penalty,
        )
        kl_tokens = kl_penalty(trainer_old, ref, cfg.kl_estimator) * mask
        adv = compute_advantages(
            cfg.advantage_estimator,
            shaped.token_rewards,
            mask,
            values=values,
            group_size=cfg.num_generations,
            gamma=cfg.gamma,
            lam=cfg.lam,
        )
        advantages = adv.advantages
        if cfg.whiten_advantages and self.use_critic:
            advantages = masked_whiten(advantages, mask) * mask
        prepared = dict(
            batch,
            old_logps=old,
            ref_logps=ref,
            values=values,
            returns=adv.returns,
            advantages=advantages,
            weights=weights,
            loss_mask=loss_mask,
        )
        stats = {
            "kl": float(kl_tokens.sum(-1).mean()),
            "kl_coef": self.kl_ctl.value,
            "reward/non_score": float(shaped.non_score_reward.mean()),
            **diag.as_dict(),
        }
        return prepared, stats

    # -- train --------------------------------------------------------------------
    def minibatch_loss(self, mb: dict) -> tuple[Tensor, dict]:
        """Policy loss (+ value loss, + KL loss for grpo/rloo) of one mini-batch."""
        cfg = self.cfg
        n_tokens = mb["loss_mask"].sum()
        logps = token_logps(self.model, mb, cfg.temperature)
        stats: dict[str, float] = {"policy/loss_tokens": float(n_tokens)}
        loss = logps.sum() * 0.0
        if n_tokens > 0:  # every token rejected: nothing to learn from this mini-batch
            pol = ppo_policy_loss(
                logps,
                mb["old_logps"],
                mb["advantages"],
                mb["loss_mask"],
                clip_eps=cfg.cliprange,
                is_weights=mb["weights"],
                num_tokens=n_tokens,
            )
            loss = loss + pol.loss
            stats.update(
                {
                    "policy/loss": float(pol.loss.detach()),
                    "policy/clipfrac": float(pol.clipfrac),
                    "policy/approx_kl": float(pol.approx_kl),
                    "policy/ratio_max": float(pol.ratio_max),
                }
            )
            if cfg.advantage_estimator in ("grpo", "rloo") and self.kl_ctl.value > 0:
                kl = masked_mean(kl_penalty(logps, mb["ref_logps"], "k3"), mb["loss_mask"])
                loss = loss + self.kl_ctl.value * kl
        if self.use_critic:
            values = token_values(self.model, self.value_head, mb)
            vl = ppo_value_loss(
                values, mb["values"], mb["returns"], mb["mask"], clip_eps=cfg.cliprange_value
            )
            loss = loss + cfg.vf_coef * vl.loss
            stats.update(
                {
                    "value/loss": float(vl.loss.detach()),
                    "value/clipfrac": float(vl.clipfrac),
                    "value/explained_variance": float(vl.explained_variance),
                }
            )
        return loss, stats

    def update(self, prepared: dict) -> dict:
        cfg = self.cfg
        B = prepared["input_ids"].shape[0]
        g = torch.Generator().manual_seed(cfg.seed * 7919 + self.step)
        sums: dict[str, list[float]] = {}
        for epoch in range(cfg.ppo_epochs):
            for chunk in torch.randperm(B, generator=g).split(cfg.mini_batch_size):
                mb = trim_padding(
                    {k: (v[chunk] if torch.is_tensor(v) else v) for k, v in prepared.items()}
                )
                loss, stats = self.minibatch_loss(mb)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(self._nan_message(f"loss is {loss.item()}"))
                loss.backward()
                stats["grad_norm"] = self._clip()
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                if epoch > 0:
                    stats.pop("policy/loss_tokens")
                for k, v in stats.items():
                    sums.setdefault(k, []).append(v)
        self.scheduler.step()
        out = {k: float(np.mean(v)) for k, v in sums.items()}
        out["policy/loss_tokens"] = float(np.sum(sums["policy/loss_tokens"]))
        return out

    def _clip(self) -> float:
        params = [p for p in self.modules.parameters() if p.grad is not None]
        if not params:
            return 0.0
        if self.cfg.max_grad_norm:
            norm = float(torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm))
        else:
            norm = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        if not math.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            raise NonFiniteLossError(self._nan_message(f"gradient norm is {norm}"))
        return norm

    def _nan_message(self, what: str) -> str:
        last = self.ckpt.latest()
        keep = (
            f"the last good checkpoint {last} is intact"
            if last
            else "no checkpoint was written yet"
        )
        return f"{what} at PPO step {self.step + 1}; training stopped and {keep}. Lower learning_rate or kl_coef, or check the reward."

    # -- one iteration ------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed + self.step)  # dropout etc.: a resumed run replays the same step
        t0 = time.time()
        pairs = self.next_rollouts()
        rollouts = [r for _, r in pairs]
        t1 = time.time()
        total, rm_scores, fn_scores = self.scorer([self.prompts[i] for i, _ in pairs], rollouts)
        t2 = time.time()
        batch = rollout_batch(rollouts, self.tokenizer.pad_token_id)
        prepared, prep_stats = self.prepare(batch, total)
        t3 = time.time()
        train_stats = self.update(prepared)
        t4 = time.time()
        self.kl_ctl.update(prep_stats["kl"], n_steps=len(rollouts))
        self.step += 1
        n_resp = float(batch["mask"].sum())
        row = {
            "step": self.step,
            "split": "train",
            "lr": self.scheduler.get_last_lr()[0],
            "reward/mean": float(total.mean()),
            "reward/std": float(total.std()) if len(total) > 1 else 0.0,
            **({"reward/rm_mean": float(rm_scores.mean())} if rm_scores is not None else {}),
            **({"reward/fn_mean": float(fn_scores.mean())} if fn_scores is not None else {}),
            "response_length": n_resp / len(rollouts),
            "response_tokens": n_resp,
            "eos_frac": float(batch["eos"].float().mean()),
            "staleness": self.step - 1 - int(rollouts[0].policy_version),
            **prep_stats,
            **train_stats,
            "time/generate": t1 - t0,
            "time/score": t2 - t1,
            "time/prepare": t3 - t2,
            "time/train": t4 - t3,
            "tokens_per_s": n_resp / max(t4 - t0, 1e-9),
        }
        drift_scores = rm_scores if rm_scores is not None else total
        row.update(self._drift(drift_scores, rollouts))
        return row

    def _drift(self, scores: Tensor, rollouts: list[Rollout]) -> dict:
        with open(self.out / "reward_scores_policy.jsonl", "a") as fh:
            fh.write(
                json.dumps(
                    {
                        "step": self.step,
                        "policy_version": rollouts[0].policy_version,
                        "scores": [round(float(s), 6) for s in scores],
                    }
                )
                + "\n"
            )
        if self.monitor is None:
            return {}
        rep = self.monitor.update(scores.numpy())
        self._last_drift = rep
        return {
            "drift/breached": float(rep.breached),
            "drift/outlier_frac": rep.outlier_frac,
            "drift/psi": rep.psi,
            "drift/ks_stat": rep.ks_stat,
            "drift/mean": rep.mean,
            "drift/reference_mean": rep.reference_mean,
        }

    def act_on_drift(self) -> None:
        """warn / restore the last checkpoint with a lower learning rate / stop."""
        if self.monitor is None or self.cfg.drift_action == "none":
            return
        action = decide(self._last_drift, self.cfg.drift_action)
        if action is None:
            return
        reasons = "; ".join(self._last_drift.reasons)
        event = {
            "step": self.step,
            "split": "event",
            "event": f"drift_{action.value}",
            "reasons": reasons,
        }
        if action == DriftAction.WARN:
            warnings.warn(f"reward drift at PPO step {self.step}: {reasons}", stacklevel=2)
        elif action == DriftAction.STOP or self.restores >= self.cfg.drift_max_restores:
            self.stopped = (
                f"reward drift at PPO step {self.step}: {reasons}. The policy's reward-model scores left the "
                f"RM's eval distribution; stopped (drift_action={self.cfg.drift_action}, "
                f"restores so far {self.restores}). Last checkpoint: {self.ckpt.latest()}."
            )
            event["event"] = "drift_stop"
        else:
            self.restores += 1
            self.lr_scale *= self.cfg.drift_lr_factor
            last = self.ckpt.latest()
            if last is not None:
                restores, lr_scale = self.restores, self.lr_scale
                self.load(last)  # brings back the checkpoint's own counters: keep this run's
                self.restores, self.lr_scale = restores, lr_scale
                self.logger.truncate_after(self.step)
            self._apply_lr_scale()
            event.update(restored_from=str(last), restored_step=self.step, lr_scale=self.lr_scale)
        self.events.append(event)
        self.logger.log(event)

    def _apply_lr_scale(self) -> None:
        sched = self.scheduler
        sched.base_lrs = [self.cfg.learning_rate * self.lr_scale for _ in sched.base_lrs]
        lrs = [
            b * f(sched.last_epoch) for b, f in zip(sched.base_lrs, sched.lr_lambdas, strict=True)
        ]
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr
        sched._last_lr = lrs

    # -- checkpoints ------------------------------------------------------------------
    def save(self) -> None:
        extra = {
            "kl": self.kl_ctl.state_dict(),
            "drift": self.monitor.state_dict() if self.monitor else None,
            "queue": [[(i, dataclasses.asdict(r)) for i, r in b] for b in self.queue],
            "generated": self.generated,
            "lr_scale": self.lr_scale,
            "restores": self.restores,
        }
        self.ckpt.save(self.step, self.modules, self.optimizer, self.scheduler, {}, extra)

    def load(self, path) -> None:
        state, extra = CheckpointManager.load(path, self.modules, self.optimizer, self.scheduler)
        _enable_adapter_grads(self.model)
        self.step = state["step"]
        self.kl_ctl.load_state_dict(extra["kl"])
        if self.monitor and extra["drift"]:
            self.monitor.load_state_dict(extra["drift"])
        self.queue = deque([[(i, Rollout(**r)) for i, r in b] for b in extra["queue"]])
        self.generated = extra["generated"]
        self.lr_scale, self.restores = extra["lr_scale"], extra["restores"]
        self._apply_lr_scale()

    def resume(self) -> Path | None:
        target = self.cfg.resume_from_checkpoint
        path = (
            self.ckpt.latest() if target in ("auto", True) else (Path(target) if target else None)
        )
        if path is None:
            return None
        self.load(path)
        self.logger.truncate_after(self.step)
        scores = self.out / "reward_scores_policy.jsonl"
        if scores.exists():
            rows = [json.loads(x) for x in scores.read_text().splitlines() if x.strip()]
            scores.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= self.step))
        return path

    def fit(self) -> dict:
        from tqdm.auto import tqdm

        resumed = self.resume()
        bar = tqdm(
            total=self.total_steps, initial=self.step, disable=not self.cfg.progress, desc="ppo"
        )
        start = time.time()
        while self.step < self.total_steps and self.stopped is None:
            row = self.train_step()
            self.logger.log(row)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward/mean']:.3f}", kl=f"{row['kl']:.3f}")
            n_events = len(self.events)
            self.act_on_drift()  # before saving: a restore must not land on the drifted state
            restored = len(self.events) > n_events and self.events[-1]["event"] == "drift_restore"
            if restored:
                bar.n = self.step
                bar.refresh()
            elif self.cfg.save_steps and self.step % self.cfg.save_steps == 0:
                self.save()
            for cb in self.callbacks:
                cb(self, row)
        bar.close()
        return {
            "steps": self.step,
            "total_steps": self.total_steps,
            "resumed_from": str(resumed) if resumed else None,
            "train_seconds": time.time() - start,
        }


# ------------------------------------------------------------- the recipe ---


def save_final(run: PPORun) -> Path:
    """``final/``: the policy adapter (loadable; merge it for deployment) and ``final/value``."""
    from safetensors.torch import save_file

    final = run.out / "final"
    run.model.save_pretrained(final, selected_adapters=[POLICY], safe_serialization=True)
    run.tokenizer.save_pretrained(final)
    if run.use_critic:
        run.model.save_pretrained(
            final, selected_adapters=[VALUE], safe_serialization=True
        )  # -> final/value
        head = {k: v.detach().cpu().contiguous() for k, v in run.value_head.state_dict().items()}
        save_file(head, final / VALUE / "value_head.safetensors")
    return final


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in rows if r.get("split") == "train"]
    if not rows:
        return
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, key in zip(axes, ("reward/mean", "kl", "offpolicy/kl_k3"), strict=True):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows])
        ax.set_title(key)
        ax.set_xlabel("PPO step")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def quarter_means(values: list[float]) -> tuple[float, float]:
    """Mean of the first and of the last quarter (at least one value each)."""
    q = max(1, len(values) // 4)
    return float(np.mean(values[:q])), float(np.mean(values[-q:]))


def run(cfg: PPOConfig, callbacks=()) -> dict:
    t0 = time.time()
    ppo = PPORun(cfg, callbacks)
    result = ppo.fit()
    final = save_final(ppo)
    rows = [r for r in ppo.logger.rows() if r.get("split") == "train"]
    rewards = [r["reward/mean"] for r in rows]
    first, last = quarter_means(rewards) if rewards else (float("nan"), float("nan"))
    timing = (
        {
            k: float(np.mean([r[k] for r in rows]))
            for k in ("time/generate", "time/score", "time/prepare", "time/train")
        }
        if rows
        else {}
    )
    summary = {
        "stage": "ppo",
        "model": cfg.model_name_or_path,
        "reference": "model_name_or_path with the policy adapter disabled",
        "advantage_estimator": cfg.advantage_estimator,
        "rollout_precision": cfg.rollout_precision,
        "rollout_staleness": cfg.rollout_staleness,
        "offpolicy_correction": cfg.offpolicy_correction,
        **result,
        "reward_first_quarter": first,
        "reward_last_quarter": last,
        "final_kl": rows[-1]["kl"] if rows else None,
        "kl_estimator": cfg.kl_estimator,
        "mean_step_seconds": timing,
        "drift_events": ppo.events,
        "stopped": ppo.stopped,
        "final_model": str(final),
        "seconds": time.time() - t0,
        "peak_memory_mb": peak_memory_mb(),
    }
    plot_curves(ppo.logger.rows(), ppo.out / "ppo_curves.png", f"PPO {cfg.model_name_or_path}")
    write_summary(ppo.out, summary)
    ppo.logger.close()
    print_summary(summary)
    return summary


def _fmt_kl(kl: float | None, estimator: str | None) -> str:
    if kl is None:
        return "n/a"
    if estimator == "k1":  # mean of log(pi/pi_ref) over sampled tokens: unbiased, not >= 0
        return f"{kl:.4f} (k1 estimate: unbiased, so a small policy shift can read below 0)"
    return f"{kl:.4f} ({estimator} estimate)"


def print_summary(s: dict) -> None:
    lines = [
        f"PPO finished in {s['seconds']:.0f}s: {s['steps']}/{s['total_steps']} steps",
        f"  reward: first quarter {s['reward_first_quarter']:.4f} -> last quarter {s['reward_last_quarter']:.4f}",
        f"  KL to the reference, last batch: {_fmt_kl(s['final_kl'], s.get('kl_estimator'))}",
        "  mean seconds per step: "
        + ", ".join(f"{k[5:]} {v:.2f}" for k, v in s["mean_step_seconds"].items()),
    ]
    if s["drift_events"]:
        lines.append(f"  reward-drift events: {[e['event'] for e in s['drift_events']]}")
    if s["stopped"]:
        lines.append(f"  STOPPED: {s['stopped']}")
    lines.append(f"  policy adapter: {s['final_model']}")
    print("\n".join(lines))
