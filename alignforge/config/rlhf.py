"""Configs of the reward-model (``stage: rm``) and PPO (``stage: ppo``) recipes.

Every field is documented once here. ``validate`` errors name the field and never rewrite a value.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignforge.config.base import INPUT_PATH
from alignforge.config.preference import PromptLengthArgs
from alignforge.config.stages import (
    DataArgs,
    DatasetMixArgs,
    ModelArgs,
    RolloutEngineArgs,
    RunArgs,
    TrainArgs,
)


class RMConfig(ModelArgs, DataArgs, TrainArgs, PromptLengthArgs):
    """Reward model on preference pairs (``stage: rm``): a scalar head on a (merged SFT) model.

    Rows are read like DPO's (``formatting``, ``columns``; an ``agreement`` column is read too),
    and an over-long pair is cut by the rule every preference stage shares: the end of the
    prompt and the start of each answer are kept (``max_prompt_length``; docs/data.md). The
    score is read at the last kept token.
    """

    stage: Literal["rm"] = "rm"
    formatting: Literal["auto", "sharegpt", "explicit", "implicit"] = Field(
        "auto",
        description="Preference row format, as for DPO: sharegpt, explicit (prompt/chosen/rejected) "
        "or implicit (chosen/rejected conversations sharing a prefix); auto detects it.",
    )
    center_rewards_coef: float = Field(
        0.0,
        ge=0.0,
        description="Reward centering (Eisenstein et al. 2023): adds coef * (r_c + r_r)^2 per pair; 0 disables.",
    )
    use_margin: bool = Field(
        True,
        description="Subtract the row's `margin` column (if present) inside the Bradley-Terry sigmoid.",
    )
    length_control: bool = Field(
        False,
        description="Add gamma * (log len_c - log len_r) inside the sigmoid, gamma fitted on the training "
        "pairs' lengths alone before training, so the score learns what answer length does not explain "
        "(length-controlled Bradley-Terry; docs/rlhf.md). The saved score has no length term.",
    )
    agreement_ceiling: float | None = Field(
        None,
        gt=0.0,
        le=1.0,
        description="Inter-annotator agreement: the best accuracy an RM can reach on this data (reported beside the accuracy). "
        "Unset: the mean of the eval rows' `agreement_ceiling` column (each label's expected accuracy for a "
        "perfect model, written by `alignforge annotate export`), else of their `agreement` column.",
    )
    bootstrap_samples: int = Field(
        1000, ge=100, description="Bootstrap resamples for the accuracy's 95% intervals."
    )

    @model_validator(mode="after")
    def _check(self):
        self._check_prompt_length()
        return self


class PromptArgs(DatasetMixArgs):
    """Prompts to sample answers for: every row format SFT reads, the answer (if any) dropped."""

    dataset: str | list[str] = Field(
        ...,
        description="Prompts: a .jsonl/.json/.parquet file, a directory or a hub id; several as a "
        "list or separated by commas, mixed by mix_strategy.",
        json_schema_extra=INPUT_PATH,
    )
    formatting: Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt", "text"] = (
        Field("auto", description="Row format; `auto` detects it from the columns.")
    )
    columns: dict[str, str] | None = Field(
        None, description="Map our column names to the dataset's, e.g. {prompt: question}."
    )
    max_length: int = Field(
        1024, gt=8, description="Prompt tokens kept (the end of a longer prompt)."
    )
    skip_bad_rows: bool = Field(False, description="Skip malformed rows instead of failing.")
    max_samples: int | None = Field(
        None, gt=0, description="Use only the first N rows (of the mixed data)."
    )
    per_device_eval_batch_size: int = Field(
        8, gt=0, description="Sequences generated together by the in-process rollout engine."
    )


class PPOConfig(ModelArgs, PromptArgs, RunArgs, RolloutEngineArgs):
    """PPO RLHF (``stage: ppo``): a LoRA policy on a merged SFT model; reference = adapter disabled.

    ``dataset`` holds prompts (``prompt`` as a string or message list, or ``messages`` whose last
    assistant turn is dropped). One optimizer step of TrainArgs is here one PPO *iteration*:
    rollout, scoring, and ``ppo_epochs`` passes of mini-batch updates. With ``rollout_engine:
    server`` the policy's LoRA adapter is loaded on the servers after each update (docs/rlhf.md).
    """

    stage: Literal["ppo"] = "ppo"
    # -- rewards --
    reward_model: str | None = Field(
        None,
        description="A reward model saved by `stage: rm` (its `final` dir).",
        json_schema_extra=INPUT_PATH,
    )
    reward_model_weight: float = Field(1.0, description="Weight of the RM score in the reward.")
    reward_fn: str | None = Field(
        None,
        description="A programmatic reward `module:function`, called as fn(prompts=[str], completions=[str], "
        "completion_ids=[[int]], **reward_fn_kwargs) -> [float]. Replaces or adds to the RM.",
    )
    reward_fn_kwargs: dict = Field(
        default_factory=dict, description="Extra keyword arguments of reward_fn."
    )
    reward_fn_weight: float = Field(1.0, description="Weight of reward_fn in the reward.")
    missing_eos_penalty: float | None = Field(
        None, ge=0.0, description="Subtracted from the score of answers cut off at max_new_tokens."
    )
    # -- rollouts --
    rollout_batch_size: int = Field(8, gt=0, description="Prompts per PPO iteration.")
    num_generations: int = Field(
        1, gt=0, description="Samples per prompt (the group size of grpo / rloo)."
    )
    max_new_tokens: int = Field(32, gt=0, description="Longest sampled answer.")
    temperature: float = Field(1.0, gt=0.0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling of the rollouts.")
    rollout_precision: Literal["same", "bfloat16", "int8"] = Field(
        "same",
        description="The behaviour policy that samples: the trained policy itself, a bf16 copy, or an int8 "
        "dynamically-quantised copy (numerically different from the trainer, like a vLLM engine).",
    )
    max_staleness: int = Field(
        0,
        ge=0,
        description="Draw each batch k PPO steps ahead, by the policy of k steps before the one "
        "that trains on it (asynchronous RL): with rollout_engine server in the background while "
        "the trainer trains; in process, on the spot. 0: on-policy.",
    )
    # -- PPO --
    advantage_estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = Field(
        "gae", description="gae uses the critic; the others need no value model."
    )
    ppo_epochs: int = Field(2, gt=0, description="Passes over each rollout batch.")
    mini_batch_size: int = Field(4, gt=0, description="Sequences per PPO optimizer step.")
    gamma: float = Field(1.0, ge=0.0, le=1.0, description="Discount of GAE.")
    lam: float = Field(0.95, ge=0.0, le=1.0, description="GAE lambda.")
    cliprange: float = Field(0.2, gt=0.0, description="PPO ratio clip epsilon.")
    cliprange_value: float | None = Field(0.2, gt=0.0, description="Value clip; null disables.")
    vf_coef: float = Field(0.1, ge=0.0, description="Weight of the value loss.")
    whiten_advantages: bool = Field(True, description="Whiten GAE advantages over the batch.")
    kl_coef: float = Field(0.05, ge=0.0, description="Initial KL penalty coefficient beta.")
    kl_estimator: Literal["k1", "k2", "k3"] | None = Field(
        None,
        description="Per-token KL estimator (Schulman 2020): k1 log-ratio, k2 squared, k3 "
        "exp(r) - 1 - r. Default: k1 when the KL is in the reward, k3 when it is in the loss.",
    )
    kl_in_reward: bool | None = Field(
        None,
        description="Subtract beta * KL from the reward (Ziegler et al.; the RLOO paper, TRL and OpenRLHF) "
        "or add it to the loss (GRPO). Default: in the reward for gae, rloo and reinforce_pp, "
        "in the loss for grpo.",
    )
    disable_dropout: bool = Field(
        True,
        description="Turn dropout off (LoRA dropout included), as TRL does: old log-probs, values and "
        "the reference are computed without it, so the PPO ratio starts at 1.",
    )
    adaptive_kl: bool = Field(
        False, description="Adapt beta toward kl_target (Ziegler et al. 2019)."
    )
    kl_target: float = Field(
        6.0, gt=0.0, description="Target sequence KL of the adaptive controller."
    )
    kl_horizon: int = Field(
        10000, gt=0, description="Horizon (samples) of the adaptive controller."
    )
    # -- off-policy correction --
    offpolicy_correction: Literal["none", "truncate", "mask"] = Field(
        "none",
        description="Importance correction between trainer and behaviour log-probs: TIS (truncate) or MIS/IcePop (mask).",
    )
    offpolicy_level: Literal["token", "sequence", "geometric"] = Field(
        "token", description="Ratio per token, per sequence, or the per-sequence geometric mean."
    )
    offpolicy_lower: float | None = Field(
        None, ge=0.0, description="Lower bound of the weight band."
    )
    offpolicy_upper: float | None = Field(
        2.0, gt=0.0, description="Upper bound (truncation level)."
    )
    offpolicy_old_logps: Literal["decoupled", "bypass"] = Field(
        "decoupled",
        description="decoupled: recompute old log-probs with the trainer; bypass: use the behaviour log-probs as old.",
    )
    # -- reward drift --
    drift_action: Literal["none", "warn", "restore", "stop"] = Field(
        "warn",
        description="On a reward-distribution breach: log a warning, restore the last checkpoint "
        "with a lower learning rate, or stop. `none` only logs drift/*.",
    )
    drift_reference: str | None = Field(
        None,
        description="JSON list of reference scores; default: reward_scores_eval.json of reward_model.",
        json_schema_extra=INPUT_PATH,
    )
    drift_window: int = Field(256, gt=0, description="Rolling window of policy scores.")
    drift_min_samples: int = Field(32, gt=0, description="Scores needed before a breach can fire.")
    drift_max_outlier_frac: float = Field(
        0.1, gt=0.0, le=1.0, description="Outlier share that breaches."
    )
    drift_psi_threshold: float = Field(0.25, gt=0.0, description="PSI that breaches.")
    drift_lr_factor: float = Field(
        0.5, gt=0.0, lt=1.0, description="restore: multiply the learning rate by this factor."
    )
    drift_max_restores: int = Field(3, ge=0, description="restore: stop after this many restores.")

    @property
    def kl_in_reward_resolved(self) -> bool:
        if self.kl_in_reward is not None:
            return self.kl_in_reward
        return self.advantage_estimator != "grpo"

    @property
    def kl_kind(self) -> str:
        if self.kl_estimator is not None:
            return self.kl_estimator
        return "k1" if self.kl_in_reward_resolved else "k3"

    @model_validator(mode="after")
    def _check(self):
        if self.finetuning_type == "full":
            raise ValueError(
                "finetuning_type: ppo trains a LoRA policy whose reference is the adapter-disabled model; use lora or qlora"
            )
        if self.reward_model is None and self.reward_fn is None:
            raise ValueError("reward_model / reward_fn: set at least one source of reward")
        if self.advantage_estimator in ("grpo", "rloo") and self.num_generations < 2:
            raise ValueError(
                f"num_generations: advantage_estimator={self.advantage_estimator} needs groups of >= 2 samples per prompt"
            )
        if (
            self.offpolicy_correction == "mask"
            and self.offpolicy_lower is None
            and self.offpolicy_upper is None
        ):
            raise ValueError(
                "offpolicy_lower / offpolicy_upper: mode mask needs at least one bound"
            )
        if self.offpolicy_correction == "truncate" and self.offpolicy_upper is None:
            raise ValueError("offpolicy_upper: truncate needs the truncation level (e.g. 2.0)")
        if self.rollout_engine == "server" and self.rollout_precision != "same":
            raise ValueError(
                "rollout_precision: a server samples in its own precision (vllm serve --dtype); "
                "leave rollout_precision at same with rollout_engine: server"
            )
        if self.offpolicy_old_logps == "bypass" and self.offpolicy_correction != "none":
            raise ValueError(
                "offpolicy_correction: bypass mode already uses the behaviour log-probs as old_logps "
                "(PPO's clip is the only correction); set offpolicy_correction: none or offpolicy_old_logps: decoupled"
            )
        no_reference = self.reward_model is None and self.drift_reference is None
        if "drift_action" in self.model_fields_set and self.drift_action != "none" and no_reference:
            raise ValueError(
                f"drift_action: {self.drift_action!r} needs reference scores: set reward_model or drift_reference (or drift_action: none)"
            )
        if self.drift_action == "restore" and not self.save_steps:
            raise ValueError("save_steps: drift_action restore needs checkpoints to restore from")
        return self
