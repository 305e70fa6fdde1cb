"""Config of ``alignforge iterate``: iterative RLHF rounds (seed lesson 6)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from alignforge.annotate.config import PanelConfig
from alignforge.config.stages import RolloutEngineArgs


class IterateConfig(RolloutEngineArgs):
    """Each round samples from the *current* policy, judges, trains the RM, runs PPO, evaluates.

    ``rollout_engine: server`` draws each round's preference samples on ``alignforge serve``,
    which loads the round's policy first; PPO's own rollouts are set under ``ppo:``.
    """

    output_dir: str = Field(
        ..., description="Run directory; round_<k>/<step>/ below it. Re-running resumes."
    )
    policy: str = Field(
        ...,
        description="The merged SFT checkpoint (a full HF model dir, or `default`). Not an adapter.",
    )
    task: str = Field(
        "extraction",
        description="Task whose metric evaluates each round and can add to the PPO reward.",
    )
    prompts: str = Field(
        ..., description="Task rows (input + reference) to sample from and to run PPO on."
    )
    eval_dataset: str | None = Field(
        None, description="Held-out task rows; evaluated after every round."
    )
    eval_limit: int | None = Field(
        None, gt=0, description="Evaluate only the first N held-out rows."
    )
    rounds: int = Field(3, gt=0, description="Number of rounds.")
    prompts_per_round: int = Field(
        32, gt=0, description="Prompts sampled for judging in each round."
    )
    samples_per_prompt: int = Field(
        4, ge=2, description="One greedy + k-1 samples per prompt (lesson 3)."
    )
    temperature: float = Field(1.0, gt=0, description="Temperature of the non-greedy samples.")
    max_new_tokens: int = Field(128, gt=0, description="Longest sampled completion.")
    split_ratios: dict[str, float] = Field(
        default_factory=lambda: {"train": 0.8, "validation": 0.2},
        description="Prompt-level split made before pairing, so all pairs of a prompt stay in one split.",
    )
    judge: Literal["ai", "human", "metric", "reference"] = Field(
        "ai",
        description="ai: an LLM judge with position swap; human: the annotation app; metric: the task metric against the reference; reference: each aspect against the reference (extraction: entity F1, relation F1, format; docs/annotate.md).",
    )
    panel: PanelConfig | None = Field(
        None,
        description="judge: reference only: simulated annotators judge the pairs through the annotation queue with this noise, and their labels train the RM (docs/annotate.md, Simulated annotators).",
    )
    judge_model: str = Field(
        "default",
        description="ai judge: a local model (path or `default`) or, with judge_endpoint, the served model name.",
    )
    judge_endpoint: str | None = Field(
        None, description="ai judge: an OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1)."
    )
    min_pairs: int = Field(
        8,
        gt=0,
        description="Fewer decisive judged pairs than this: the round skips RM training and PPO uses the task reward alone.",
    )
    rm: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the reward-model config (stage rm)."
    )
    continue_rm: bool = Field(
        True, description="Start each round's RM from the previous round's RM."
    )
    ppo: dict[str, Any] = Field(
        default_factory=dict, description="Overrides of the PPO config (stage ppo)."
    )
    task_reward_weight: float = Field(
        1.0, ge=0, description="Weight of the task metric in the PPO reward (0: RM only)."
    )
    task_reward: Literal["item", "marginal"] = Field(
        "marginal",
        description="marginal: what the answer adds to the dataset metric pooled over its batch and the recent answers (e.g. micro-F1), so an answer that counts nothing earns 0; equal to item for a mean of item scores. item: each answer's own metric (e.g. its F1).",
    )
    allow_offpolicy: bool = Field(
        False,
        description="Accept preference data sampled from another checkpoint when PPO's off-policy correction is on.",
    )
    seed: int = 0

    @model_validator(mode="after")
    def _check(self):
        if abs(sum(self.split_ratios.values()) - 1.0) > 1e-6:
            raise ValueError(f"split_ratios: must sum to 1, got {self.split_ratios}")
        if "train" not in self.split_ratios:
            raise ValueError("split_ratios: needs a 'train' share")
        if self.judge == "reference" and self.task != "extraction":
            raise ValueError(
                f"judge: reference compares extraction answers with their gold; task {self.task!r} is not extraction (judge: metric scores any task)"
            )
        if self.panel is not None and self.judge != "reference":
            raise ValueError(
                f"panel: the simulated annotators answer from the reference judge; set judge: reference (got {self.judge!r})"
            )
        return self
