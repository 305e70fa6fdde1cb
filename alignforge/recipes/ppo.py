"""PPO RLHF (``stage: ppo``): a LoRA policy on a merged SFT model, a reward model and/or a
programmatic reward, a critic on a second adapter, off-policy correction and a reward-drift monitor.

    alignforge merge runs/sft/final --output runs/sft-merged      # the reference must be merged
    alignforge train examples/ppo.yaml
    alignforge train examples/ppo.yaml rollout_precision=int8 offpolicy_correction=truncate
    alignforge train examples/ppo.yaml rollout_engine=server rollout_base_url=http://127.0.0.1:8000/v1 max_staleness=1
    torchrun --nproc_per_node 2 -m alignforge.cli train examples/ppo.yaml     # data-parallel

One iteration, top to bottom:

1. **rollout** (``rl/rollouts.py``): ``num_generations`` answers for each of the
   ``rollout_batch_size`` prompts (a prompt's group stays on one process) with per-token log-probs
   (``rollout_logps``), drawn in process by the policy itself or a bf16 / int8 copy
   (``rollout_precision``), or by vLLM / ``alignforge serve`` with the policy's adapter loaded
   (``rollout_engine: server``); with ``max_staleness: k`` each batch is drawn k steps ahead, by
   servers in the background while the trainer trains.
2. **score**: reward model times its weight plus ``reward_fn`` (called on the global batch).
3. **prepare** (``rl/prepare.py``): old log-probs (policy), reference log-probs (the same model,
   adapters disabled = the merged SFT checkpoint), values (``value`` adapter + head), off-policy
   weights, KL-shaped rewards, advantages; batch statistics are global over processes.
4. **train**: ``ppo_epochs`` passes of mini-batches, one optimizer step of the shared training
   core each (clipped policy loss, clipped value loss), token counts global over processes.
5. **monitor**: KL controller, drift monitor (warn / restore + lower lr / stop), metrics,
   checkpoints.

Dropout is off (``disable_dropout``) so old log-probs and the trained side agree at step start.
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from alignforge.config import ConfigError
from alignforge.config.rlhf import PPOConfig
from alignforge.data import read_prompts
from alignforge.data.templating import set_chat_template
from alignforge.losses.ppo import ppo_policy_loss, ppo_value_loss
from alignforge.models import load_tokenizer
from alignforge.recipes.common import peak_memory_mb, write_summary
from alignforge.rl.drift import DriftAction, decide, monitor_from_reference
from alignforge.rl.kl import AdaptiveKLController, FixedKLController, kl_penalty
from alignforge.rl.policy import (
    POLICY,
    Trainables,
    build_policy,
    check_reference,
    disable_dropout,
    save_policy,
    token_logps,
    token_values,
)
from alignforge.rl.prepare import PrepareSettings, prepare_rollouts
from alignforge.rl.rollouts import RolloutSource, Sampling, engine_factory, server_failure
from alignforge.rl.scoring import build_scorer
from alignforge.rl.summary import plot_curves, print_summary, reward_summary
from alignforge.rollout import EndpointError, Rollout, chat_prompt_ids
from alignforge.rollout.batch import rollout_batch, trim_padding
from alignforge.training import NonFiniteLossError
from alignforge.training.interrupt import stoppable
from alignforge.training.loop import TrainCore
from alignforge.training.rundir import open_run

CONFIG = PPOConfig
SUMMED = ("policy/loss", "value/loss", "policy/loss_tokens")  # over processes; others averaged
__all__ = ["PPORun", "NonFiniteLossError", "run"]


def check_parallel(cfg: PPOConfig, world: int) -> None:
    for name in ("rollout_batch_size", "mini_batch_size"):
        if getattr(cfg, name) % world:
            raise ConfigError(
                f"{name}: {getattr(cfg, name)} must be divisible by the {world} processes"
            )
    if cfg.max_staleness and cfg.offpolicy_correction == "none":
        warnings.warn(
            f"max_staleness={cfg.max_staleness} with offpolicy_correction=none: stale rollouts "
            "are trained on as if on-policy, with PPO's clip as the only correction",
            stacklevel=2,
        )
    if cfg.max_staleness and cfg.rollout_engine == "transformers":
        warnings.warn(
            f"max_staleness={cfg.max_staleness} with rollout_engine=transformers: batches are drawn "
            "ahead but not while the trainer trains (the in-process engine shares its model and "
            "cores); rollout_engine: server overlaps them",
            stacklevel=2,
        )


class PPORun:
    """The outer loop on the shared core: rollout -> score -> prepare -> mini-batch steps -> monitor."""

    def __init__(self, cfg: PPOConfig, callbacks=()):
        self.cfg, self.callbacks = cfg, list(callbacks)
        acc = open_run(cfg)
        check_parallel(cfg, acc.num_processes)
        self.out = Path(cfg.output_dir)
        path = check_reference(cfg.model_name_or_path, cfg.cache_dir)
        self.tokenizer = set_chat_template(load_tokenizer(path, cfg.cache_dir), cfg.template)
        self.prompts = read_prompts(
            cfg.datasets, cfg.formatting, cfg.columns, cfg.max_samples, cfg.skip_bad_rows,
            cfg.mix_strategy, cfg.interleave_probs, cfg.seed,
        )  # fmt: skip
        self.prompt_ids = [
            chat_prompt_ids(self.tokenizer, p)[-cfg.max_length :] for p in self.prompts
        ]
        self.use_critic = cfg.advantage_estimator == "gae"
        lora = dict(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                    target_modules="all-linear" if cfg.lora_target == "all" else list(cfg.lora_target))  # fmt: skip
        model, head = build_policy(
            path, dtype=cfg.dtype, lora=lora, with_critic=self.use_critic, cache=cfg.cache_dir,
            quantize_4bit=cfg.finetuning_type == "qlora",
            gradient_checkpointing=cfg.gradient_checkpointing,
            attn_implementation=cfg.attn_implementation,
        )  # fmt: skip
        if cfg.disable_dropout:
            disable_dropout(model)
        per_epoch = -(-len(self.prompts) // cfg.rollout_batch_size)
        total = (
            cfg.max_steps if cfg.max_steps > 0 else int(np.ceil(per_epoch * cfg.num_train_epochs))
        )
        self.scorer = build_scorer(cfg.reward_model, cfg.reward_fn, cfg.reward_fn_kwargs,
                                   cfg.reward_model_weight, cfg.reward_fn_weight, cfg.cache_dir, acc)  # fmt: skip
        self.core = TrainCore(Trainables(model, head), cfg, total, acc, frozen=[self.scorer.rm])
        self.model, self.value_head = self.core.unwrapped.policy, self.core.unwrapped.value_head
        self.total_steps = total
        self.kl_ctl = (
            AdaptiveKLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
            if cfg.adaptive_kl
            else FixedKLController(cfg.kl_coef)
        )
        self.monitor = monitor_from_reference(
            cfg.drift_reference, cfg.reward_model, window=cfg.drift_window,
            max_outlier_frac=cfg.drift_max_outlier_frac, psi_threshold=cfg.drift_psi_threshold,
            min_samples=cfg.drift_min_samples,
        )  # fmt: skip
        self.logger = self.core.logger
        self.rollouts = self._rollout_source()
        self.restores = 0
        self.events: list[dict] = []
        self.stopped: str | None = None

    @property
    def step(self) -> int:
        return self.core.step

    # -- rollouts --------------------------------------------------------------
    def _rollout_source(self) -> RolloutSource:
        from accelerate.utils import broadcast_object_list

        cfg, core, server = self.cfg, self.core, self.cfg.rollout_engine == "server"
        make, sync = engine_factory(
            cfg.rollout_engine, model=self.model, tokenizer=self.tokenizer, adapter=POLICY,
            precision=cfg.rollout_precision, batch_size=max(cfg.per_device_eval_batch_size, 1),
            base_urls=cfg.rollout_base_url, served_model=cfg.rollout_model,
            folder=self.out / "rollout_policy", keep=cfg.max_staleness + 1,
            main=core.acc.is_main_process,
        )  # fmt: skip
        sampling = Sampling(cfg.num_generations, cfg.temperature, cfg.top_p, cfg.max_new_tokens)
        return RolloutSource(
            self.prompt_ids, batch_size=cfg.rollout_batch_size, seed=cfg.seed, sampling=sampling,
            max_staleness=cfg.max_staleness, total=self.total_steps, make_engine=make, sync=sync,
            background=server, scatter=server, rank=core.rank, world=core.world,
            broadcast=lambda batch: broadcast_object_list([batch])[0],
        )  # fmt: skip

    def next_rollouts(self) -> list[tuple[int, Rollout]]:
        """This iteration's batch, drawn up to ``max_staleness`` iterations ago."""
        try:
            return self.rollouts.next(self.step)
        except EndpointError as e:
            raise server_failure(e, self.step, self.core.ckpt.latest()) from None

    def score(self, pairs: list[tuple[int, Rollout]]):
        """(total, rm, fn) scores of this process's rollouts; the reward function sees all."""
        from accelerate.utils import gather_object

        everyone = gather_object([pairs]) if self.core.world > 1 else [pairs]
        offset = sum(len(p) for p in everyone[: self.core.rank])
        flat = [x for p in everyone for x in p]
        return self.scorer(
            [self.prompts[i] for i, _ in pairs], [r for _, r in pairs],
            [self.prompts[i] for i, _ in flat], [r for _, r in flat], offset,
        )  # fmt: skip

    def _reduce_sum(self, t: Tensor) -> Tensor:
        if self.core.world == 1:
            return t
        return self.core.acc.reduce(t.to(self.core.acc.device).double(), reduction="sum").to(
            t.dtype
        )

    def prepare(self, batch: dict, scores: Tensor) -> tuple[dict, dict]:
        cfg = self.cfg
        settings = PrepareSettings(
            estimator=cfg.advantage_estimator, group_size=cfg.num_generations,
            temperature=cfg.temperature, chunk_size=cfg.mini_batch_size, kl_coef=self.kl_ctl.value,
            kl_estimator=cfg.kl_kind, kl_in_reward=cfg.kl_in_reward_resolved, gamma=cfg.gamma,
            lam=cfg.lam, whiten_advantages=cfg.whiten_advantages,
            missing_eos_penalty=cfg.missing_eos_penalty, correction=cfg.offpolicy_correction,
            level=cfg.offpolicy_level, lower=cfg.offpolicy_lower, upper=cfg.offpolicy_upper,
            old_logps=cfg.offpolicy_old_logps,
            reference=cfg.adaptive_kl or self.kl_ctl.value > 0,  # else nothing reads the KL
        )  # fmt: skip
        head = self.value_head if self.use_critic else None
        return prepare_rollouts(self.model, head, self.core.to_device(batch), scores, settings,
                                self._reduce_sum)  # fmt: skip

    # -- train --------------------------------------------------------------------
    def minibatch_loss(self, mb: dict, model=None, head=None, counts=None) -> tuple[Tensor, dict]:
        """Policy loss (+ value loss, + KL loss when the KL is not in the reward) of a mini-batch,
        each a token mean over the mini-batch's ``counts`` (global over processes)."""
        cfg, model, head = self.cfg, model or self.model, head or self.value_head
        n_tokens, n_value = counts or (mb["loss_mask"].sum(), mb["mask"].sum())
        logps = token_logps(model, mb, cfg.temperature)
        stats: dict[str, float] = {"policy/loss_tokens": float(mb["loss_mask"].sum())}
        loss = logps.sum() * 0.0
        if n_tokens > 0:  # every token rejected: nothing to learn from this mini-batch
            pol = ppo_policy_loss(
                logps, mb["old_logps"], mb["advantages"], mb["loss_mask"], clip_eps=cfg.cliprange,
                is_weights=mb["weights"], num_tokens=n_tokens,
            )  # fmt: skip
            loss = loss + pol.loss
            stats.update({"policy/loss": float(pol.loss.detach()), "policy/clipfrac": float(pol.clipfrac),
                          "policy/approx_kl": float(pol.approx_kl), "policy/ratio_max": float(pol.ratio_max)})  # fmt: skip
            if not cfg.kl_in_reward_resolved and self.kl_ctl.value > 0:
                kl = kl_penalty(logps, mb["ref_logps"], cfg.kl_kind) * mb["loss_mask"]
                loss = loss + self.kl_ctl.value * kl.sum() / n_tokens
        if self.use_critic:
            values = token_values(model, head, mb)
            vl = ppo_value_loss(values, mb["values"], mb["returns"], mb["mask"],
                                clip_eps=cfg.cliprange_value, num_tokens=n_value)  # fmt: skip
            loss = loss + cfg.vf_coef * vl.loss
            stats.update({"value/loss": float(vl.loss.detach()), "value/clipfrac": float(vl.clipfrac),
                          "value/explained_variance": float(vl.explained_variance)})  # fmt: skip
        return loss, stats

    def _step_minibatch(self, mb: dict) -> dict:
        counts = (
            self.core.global_sum(mb["loss_mask"].sum()),
            self.core.global_sum(mb["mask"].sum()),
        )
        out: dict = {}

        def loss_fn(trainables, item):
            loss, stats = trainables(
                lambda policy, head: self.minibatch_loss(item, policy, head, counts)
            )
            out.update(stats)
            return loss, {}

        self.core.accumulate([mb], loss_fn, 1.0)
        out["grad_norm"] = self.core.optimizer_step()
        return out

    def update(self, prepared: dict) -> dict:
        cfg = self.cfg
        B = prepared["input_ids"].shape[0]
        g = torch.Generator().manual_seed(cfg.seed * 7919 + self.step)
        sums: dict[str, list[float]] = {}
        for epoch in range(cfg.ppo_epochs):
            for chunk in torch.randperm(B, generator=g).split(
                cfg.mini_batch_size // self.core.world
            ):
                chunk = chunk.to(prepared["input_ids"].device)
                mb = trim_padding(
                    {k: (v[chunk] if torch.is_tensor(v) else v) for k, v in prepared.items()}
                )
                stats = self._step_minibatch(mb)
                if epoch > 0:
                    stats.pop("policy/loss_tokens")
                for k, v in stats.items():
                    sums.setdefault(k, []).append(v)
        self.core.scheduler.step()
        out = {k: float(np.mean(v)) for k, v in sums.items()}
        out["policy/loss_tokens"] = float(np.sum(sums["policy/loss_tokens"]))
        return self._global_stats(out)

    def _global_stats(self, stats: dict) -> dict:
        if self.core.world == 1:
            return stats
        summed = self.core.global_sums(stats)
        return {k: v if k in SUMMED else v / self.core.world for k, v in summed.items()}

    # -- one iteration ------------------------------------------------------------
    def train_step(self) -> dict:
        cfg = self.cfg
        torch.manual_seed(cfg.seed + self.step)  # a resumed run replays the same step
        t0 = time.time()
        pairs = self.next_rollouts()
        rollouts = [r for _, r in pairs]
        t1 = time.time()
        total, rm_scores, fn_scores = self.score(pairs)
        t2 = time.time()
        batch = rollout_batch(rollouts, self.tokenizer.pad_token_id)
        prepared, prep_stats = self.prepare(batch, total)
        t3 = time.time()
        train_stats = self.update(prepared)
        t4 = time.time()
        n_global = self.core.global_sum(len(rollouts))
        if "kl" in prep_stats:  # absent without a reference pass (kl_coef 0, not adaptive)
            self.kl_ctl.update(prep_stats["kl"], n_steps=int(n_global))
        self.core.step += 1
        n_resp = self.core.global_sum(batch["mask"].sum())
        gathered = self._gather_scores(total, rm_scores, fn_scores)
        row = {
            "step": self.step, "split": "train", "lr": self.core.lr(),
            "reward/mean": float(gathered["total"].mean()),
            "reward/std": float(gathered["total"].std()) if len(gathered["total"]) > 1 else 0.0,
            **({"reward/rm_mean": float(gathered["rm"].mean())} if rm_scores is not None else {}),
            **({"reward/fn_mean": float(gathered["fn"].mean())} if fn_scores is not None else {}),
            "response_length": n_resp / n_global, "response_tokens": n_resp,
            "eos_frac": self.core.global_sum(batch["eos"].float().sum()) / n_global,
            "staleness": self.step - 1 - int(rollouts[0].policy_version),
            **self._global_stats(prep_stats), **train_stats,
            "time/generate": t1 - t0, "time/score": t2 - t1, "time/prepare": t3 - t2,
            "time/train": t4 - t3, "tokens_per_s": n_resp / max(t4 - t0, 1e-9),
        }  # fmt: skip
        row["kl_coef"] = prep_stats["kl_coef"]
        drift_scores = gathered["rm"] if rm_scores is not None else gathered["total"]
        row.update(self._drift(drift_scores, rollouts))
        return row

    def _gather_scores(self, total, rm, fn) -> dict[str, Tensor]:
        parts = {"total": total, "rm": rm, "fn": fn}
        if self.core.world == 1:
            return parts
        return {k: self.core.acc.gather(v.to(self.core.acc.device)).cpu() if v is not None else None
                for k, v in parts.items()}  # fmt: skip

    def _drift(self, scores: Tensor, rollouts: list[Rollout]) -> dict:
        if self.core.acc.is_main_process:
            with open(self.out / "reward_scores_policy.jsonl", "a") as fh:
                rec = {"step": self.step, "policy_version": rollouts[0].policy_version,
                       "scores": [round(float(s), 6) for s in scores]}  # fmt: skip
                fh.write(json.dumps(rec) + "\n")
        if self.monitor is None:
            return {}
        rep = self.monitor.update(scores.numpy())
        self._last_drift = rep
        return {
            "drift/breached": float(rep.breached), "drift/outlier_frac": rep.outlier_frac,
            "drift/psi": rep.psi, "drift/ks_stat": rep.ks_stat, "drift/mean": rep.mean,
            "drift/reference_mean": rep.reference_mean,
        }  # fmt: skip

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
                f"restores so far {self.restores}). Last checkpoint: {self.core.ckpt.latest()}."
            )
            event["event"] = "drift_stop"
        else:
            self.restores += 1
            scale = self.core.lr_scale * self.cfg.drift_lr_factor
            last = self.core.ckpt.latest()
            if last is not None:
                restores = self.restores
                self.load(last)  # brings back the checkpoint's own counters: keep this run's
                self.restores = restores
                self.logger.truncate_after(self.step)
            self.core.set_lr_scale(scale)
            event.update(restored_from=str(last), restored_step=self.step, lr_scale=scale)
        self.events.append(event)
        self.logger.log(event)

    # -- checkpoints ------------------------------------------------------------------
    def save(self) -> None:
        extra = {"kl": self.kl_ctl.state_dict(), "drift": self.monitor.state_dict() if self.monitor else None,
                 "generated": self.rollouts.generated, "restores": self.restores, "reward_fn": self.scorer.state_dict()}  # fmt: skip
        self.core.save(extra=extra, rank_extra={"queue": self.rollouts.state()})

    def load(self, path) -> None:
        _, extra, mine = self.core.load(path)
        from alignforge.rl.policy import _enable_adapter_grads

        _enable_adapter_grads(self.model)
        self.kl_ctl.load_state_dict(extra["kl"])
        if self.monitor and extra["drift"]:
            self.monitor.load_state_dict(extra["drift"])
        self.rollouts.load_state((mine or {}).get("queue", []), extra["generated"])
        self.restores = extra["restores"]
        self.scorer.load_state_dict(extra.get("reward_fn"))

    def resume(self) -> Path | None:
        path = self.core.resume_path(self.cfg.resume_from_checkpoint)
        if path is None:
            return None
        self.load(path)
        self.logger.truncate_after(self.step)
        scores = self.out / "reward_scores_policy.jsonl"
        if self.core.acc.is_main_process and scores.exists():
            rows = [json.loads(x) for x in scores.read_text().splitlines() if x.strip()]
            scores.write_text("".join(json.dumps(r) + "\n" for r in rows if r["step"] <= self.step))
        return path

    @stoppable
    def fit(self) -> dict:
        resumed = self.resume()
        bar = self.core.progress("ppo")
        start = time.time()
        while self.step < self.total_steps and self.stopped is None:
            row = self.train_step()
            self.logger.log(row)
            bar.update(1)
            bar.set_postfix(reward=f"{row['reward/mean']:.3f}", kl=f"{row.get('kl', 0.0):.3f}")
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
            if self.step < self.total_steps and self.core.stop_requested():
                raise self.core.stop(self.save)
        bar.close()
        return {"steps": self.step, "total_steps": self.total_steps,
                "resumed_from": str(resumed) if resumed else None, "train_seconds": time.time() - start}  # fmt: skip


# ------------------------------------------------------------- the recipe ---


def save_final(run: PPORun) -> Path:
    """``final/``: the policy adapter (loadable; merge it for deployment) and ``final/value``."""
    final = run.out / "final"
    run.core.acc.wait_for_everyone()
    if run.core.acc.is_main_process:
        save_policy(run.model, run.value_head if run.use_critic else None, run.tokenizer, final)
    run.core.acc.wait_for_everyone()
    return final


def run(cfg: PPOConfig, callbacks=()) -> dict:
    t0 = time.time()
    ppo = PPORun(cfg, callbacks)
    try:
        result = ppo.fit()
        ppo.rollouts.close(unload=True)  # the servers forget this run's adapters
    finally:
        ppo.rollouts.close()
    final = save_final(ppo)
    rows = [r for r in ppo.logger.rows() if r.get("split") == "train"]
    summary = {
        "stage": "ppo",
        "model": cfg.model_name_or_path,
        "reference": "model_name_or_path with the policy adapter disabled",
        "processes": ppo.core.world,
        "advantage_estimator": cfg.advantage_estimator,
        "kl_in_reward": cfg.kl_in_reward_resolved,
        "rollout_precision": cfg.rollout_precision,
        "rollout_engine": cfg.rollout_engine,
        "max_staleness": cfg.max_staleness,
        "offpolicy_correction": cfg.offpolicy_correction,
        **result,
        **reward_summary(rows),
        "kl_estimator": cfg.kl_kind,
        "drift_events": ppo.events,
        "stopped": ppo.stopped,
        "final_model": str(final),
        "seconds": time.time() - t0,
        "peak_memory_mb": peak_memory_mb(),
    }
    if ppo.core.acc.is_main_process:
        plot_curves(ppo.logger.rows(), ppo.out / "ppo_curves.png", f"PPO {cfg.model_name_or_path}")
        write_summary(ppo.out, summary)
        print_summary(summary)
    ppo.logger.close()
    return summary
