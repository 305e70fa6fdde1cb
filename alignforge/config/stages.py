"""Stage configs. Field names follow the ecosystem (TRL / LLaMA-Factory).

Every field is documented once here: type, default, meaning. ``validate`` errors name the field
and never rewrite a value silently.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from alignforge.config.base import INPUT_PATH, StrictModel

AttnImplementation = Literal[
    "sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention"
]


class ModelArgs(StrictModel):
    """The model: where it comes from, its chat template, how it is trained, its attention."""

    model_name_or_path: str = Field(
        "default",
        description="`default` (embedded SmolLM2-135M-Instruct), an HF dir, a PEFT adapter dir, a .gguf file or a hub id.",
        json_schema_extra=INPUT_PATH,
    )
    template: str = Field(
        "default",
        description="Chat template that formats every prompt and answer: `default` (the tokenizer's "
        "own), chatml, llama3, alpaca, empty (raw text: the messages' contents, EOS after each "
        "answer; also `none`) or a Jinja file. Saved with the model's tokenizer, so generate, eval "
        "and serve format prompts the same way.",
        json_schema_extra=INPUT_PATH,
    )
    cache_dir: str | None = Field(
        None,
        description="Where the converted default model and caches live (default $ALIGNFORGE_CACHE or ~/.cache/alignforge).",
    )
    finetuning_type: Literal["full", "lora", "qlora"] = Field(
        "lora", description="Full fine-tuning, LoRA, or QLoRA (4-bit NF4 base via bitsandbytes)."
    )
    lora_rank: int = Field(16, gt=0, description="LoRA rank r.")
    lora_alpha: int = Field(32, gt=0, description="LoRA scaling alpha (update scaled by alpha/r).")
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    lora_target: str | list[str] = Field(
        "all", description="`all` (every linear layer but the LM head) or a list of module names."
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype for training."
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in backward to save memory."
    )
    attn_implementation: AttnImplementation = Field(
        "sdpa",
        description="Attention kernel: sdpa (PyTorch's fused attention), eager (plain matmul and "
        "softmax; the one models without an sdpa path, e.g. Gemma 2, need), flash_attention_2 / "
        "flash_attention_3 (CUDA with flash-attn; packed batches run as varlen sequences, no 4-D "
        "mask; compute in bfloat16/float16) or flex_attention (torch FlexAttention, GPU).",
    )

    @field_validator("template")
    @classmethod
    def _check_template(cls, value: str) -> str:
        from alignforge.data.templating import chat_template_source

        chat_template_source(value)  # a DataError (a ValueError) lists the named templates
        return value

    @model_validator(mode="after")
    def _check_attention(self):
        # the stage configs combine ModelArgs with TrainArgs, whose bf16/fp16 autocast also counts
        if self.attn_implementation.startswith("flash") and self.dtype == "float32":
            if not (getattr(self, "bf16", False) or getattr(self, "fp16", False)):
                raise ValueError(
                    f"attn_implementation: {self.attn_implementation} computes in bfloat16 or "
                    "float16; set dtype: bfloat16 (or bf16: true), or use sdpa"
                )
        return self


def split_paths(value: str | list[str] | None) -> list[str]:
    """``"a.jsonl,b.jsonl"`` or ``["a.jsonl", "b.jsonl"]`` -> ``["a.jsonl", "b.jsonl"]``."""
    if value is None:
        return []
    parts = value.split(",") if isinstance(value, str) else value
    return [p.strip() for p in parts if p.strip()]


class DatasetMixArgs(StrictModel):
    """Several datasets (``dataset: a.jsonl,b.jsonl`` or a YAML list) mixed into one, under the
    LLaMA-Factory names."""

    mix_strategy: Literal["concat", "interleave_under", "interleave_over"] = Field(
        "concat",
        description="How several datasets become one: concat (every row of each, in turn), "
        "interleave_under (rows drawn from each in turn, or at random by interleave_probs, until "
        "the first one runs out) or interleave_over (until each one has run out at least once, "
        "the exhausted ones starting again). Deterministic under seed.",
    )
    interleave_probs: list[float] | None = Field(
        None,
        description="Chance that the next row comes from each dataset, e.g. 0.7,0.3 (one value per "
        "dataset, summing to 1; interleave strategies only). Default: one from each in turn.",
    )

    @field_validator("interleave_probs", mode="before")
    @classmethod
    def _parse_probs(cls, value):
        if isinstance(value, int | float):
            return [value]
        if isinstance(value, str):  # LLaMA-Factory's form: interleave_probs: 0.7,0.3
            try:
                return [float(v) for v in value.split(",") if v.strip()]
            except ValueError:
                raise ValueError("expected numbers separated by commas, e.g. 0.7,0.3") from None
        return value

    @property
    def datasets(self) -> list[str]:
        """The training datasets, in the order written."""
        return split_paths(self.dataset)

    @model_validator(mode="after")
    def _check_mix(self):
        n, probs = len(self.datasets), self.interleave_probs
        if n == 0:
            raise ValueError("dataset: names no dataset")
        if probs is None:
            return self
        if self.mix_strategy == "concat":
            raise ValueError(
                "interleave_probs: only mix_strategy interleave_under or interleave_over draws by "
                "probability; set one of them or drop interleave_probs"
            )
        if len(probs) != n:
            raise ValueError(
                f"interleave_probs: {len(probs)} values for {n} datasets; give one per dataset"
            )
        if min(probs) < 0 or abs(sum(probs) - 1) > 1e-6:
            raise ValueError(f"interleave_probs: must be >= 0 and sum to 1 (got {probs})")
        return self


class DataSourceArgs(DatasetMixArgs):
    """Where the rows come from, which are held out, and how long an example may be."""

    dataset: str | list[str] = Field(
        ...,
        description="Training data: a .jsonl/.json/.parquet file, a directory or a hub id; several "
        "as a list or separated by commas, mixed by mix_strategy.",
        json_schema_extra=INPUT_PATH,
    )
    eval_dataset: str | list[str] | None = Field(
        None,
        description="Held-out data (several are concatenated); if unset, `val_size` of `dataset` is held out.",
        json_schema_extra=INPUT_PATH,
    )
    val_size: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="Share of `dataset` held out for eval when `eval_dataset` is unset.",
    )
    columns: dict[str, str] | None = Field(
        None,
        description="Map our column names to the dataset's, e.g. {prompt: question, completion: answer}.",
    )
    max_length: int = Field(1024, gt=8, description="Longest example in tokens.")
    skip_bad_rows: bool = Field(
        False, description="Skip (and count) malformed rows instead of failing on the first one."
    )
    max_samples: int | None = Field(
        None, gt=0, description="Use only the first N rows (of the mixed data; quick experiments)."
    )

    @property
    def eval_datasets(self) -> list[str]:
        return split_paths(self.eval_dataset)


class DataArgs(DataSourceArgs):
    """Data whose row format is detected or chosen, and whose over-long examples are handled."""

    formatting: Literal["auto", "messages", "prompt_completion", "alpaca", "sharegpt", "text"] = (
        Field("auto", description="Row format; `auto` detects it from the columns.")
    )
    truncation: Literal["truncate", "drop"] = Field(
        "truncate",
        description="What to do with examples longer than max_length: keep the first max_length "
        "tokens, or drop them. Both are counted.",
    )


class RolloutEngineArgs(StrictModel):
    """What generates a stage's samples: the model in this process, or OpenAI-compatible servers
    (the same three keys in every stage that samples; docs/serve.md)."""

    rollout_engine: Literal["transformers", "server"] = Field(
        "transformers",
        description="What generates: the model in this process (transformers), or OpenAI-compatible "
        "servers at rollout_base_url (`vllm serve`, or `alignforge serve`) given the model's "
        "weights by the stage (TRL: vllm_mode: server). docs/serve.md.",
    )
    rollout_base_url: str | list[str] | None = Field(
        None,
        description="rollout_engine server: the server's base URL ending in /v1 (TRL: "
        "vllm_server_base_url), or a list of them, over which the prompts are spread.",
    )
    rollout_model: str | None = Field(
        None,
        description="rollout_engine server: the served model's name (vllm serve "
        "--served-model-name), checked at start on every server; default: the first model each lists.",
    )

    @property
    def rollout_base_urls(self) -> list[str]:
        url = self.rollout_base_url
        return [] if url is None else [url] if isinstance(url, str) else list(url)

    @model_validator(mode="after")
    def _check_rollout_server(self):
        if self.rollout_engine == "transformers":
            for name in ("rollout_base_url", "rollout_model"):
                if getattr(self, name) is not None:
                    raise ValueError(
                        f"{name}: only read with rollout_engine: server; set that or remove {name}"
                    )
            return self
        if not self.rollout_base_urls:
            raise ValueError(
                "rollout_base_url: rollout_engine server needs the servers' base URLs, e.g. http://127.0.0.1:8000/v1"
            )
        for url in self.rollout_base_urls:
            if not url.startswith(("http://", "https://")):
                raise ValueError(f"rollout_base_url: {url!r} is not an http(s):// URL")
        return self


class RunArgs(StrictModel):
    """What every training run has: its directory, resume, optimizer, schedule, length,
    checkpoints, trackers and precision (PPO's config, whose batches are rollouts, stops here)."""

    output_dir: str = Field(
        ..., description="Run directory: config, metrics, checkpoints and the final model."
    )
    overwrite_output_dir: bool = Field(
        False, description="Allow writing into a non-empty output_dir that is not a resumable run."
    )
    resume_from_checkpoint: str | bool = Field(
        "auto",
        description="`auto` resumes from the latest checkpoint in output_dir, a path resumes from it, false starts fresh.",
        json_schema_extra=INPUT_PATH,
    )
    seed: int = Field(
        42, description="Seed of initialisation, shuffling, held-out split and dataset mixing."
    )
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float | None = Field(
        1.0, description="Clip the global gradient norm; null disables clipping."
    )
    lr_scheduler_type: Literal["linear", "cosine", "constant"] = Field(
        "cosine",
        description="Learning-rate decay after warmup: linear or cosine to 0, or constant.",
    )
    warmup_ratio: float = Field(
        0.0, ge=0, lt=1, description="Share of the training steps spent warming up from 0."
    )
    warmup_steps: int = Field(0, ge=0, description="Overrides warmup_ratio when > 0.")
    num_train_epochs: float = Field(
        1.0, gt=0, description="Passes over the training data (a fraction stops part-way)."
    )
    max_steps: int = Field(
        -1, description="If > 0, train this many optimizer steps (overrides num_train_epochs)."
    )
    save_steps: int | None = Field(None, gt=0, description="Checkpoint every N steps.")
    save_total_limit: int = Field(2, gt=0, description="Keep only the last K checkpoints.")
    report_to: (
        list[Literal["jsonl", "tensorboard", "wandb", "mlflow"]]
        | Literal["none", "jsonl", "tensorboard", "wandb", "mlflow"]
    ) = Field(
        "jsonl",
        description="Where metrics go besides metrics.jsonl: tensorboard, wandb, mlflow (each gets "
        "the resolved config too; a resumed run continues the same tracker run).",
    )
    run_name: str | None = Field(
        None,
        description="The run's name in wandb / mlflow / TensorBoard; default: output_dir's name.",
    )
    progress: bool = Field(True, description="Show a progress bar.")
    bf16: bool = Field(
        False,
        description="Mixed precision: compute in bfloat16 under autocast, weights and optimizer in their dtype.",
    )
    fp16: bool = Field(
        False, description="Mixed precision in float16 with loss scaling (GPUs without bf16)."
    )

    @property
    def mixed_precision(self) -> str | None:
        """``bf16``/``fp16`` for ``make_accelerator``; None defers to ``accelerate launch``."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else None

    @model_validator(mode="after")
    def _check_precision(self):
        if self.bf16 and self.fp16:
            raise ValueError("bf16 and fp16: choose one mixed precision, not both")
        return self


class TrainArgs(RunArgs):
    """A run over a dataset of examples or pairs: micro-batches, accumulation, eval and early stop."""

    per_device_train_batch_size: int = Field(
        4,
        gt=0,
        description="Examples (pairs, or packed rows with packing) per micro-batch per process.",
    )
    per_device_eval_batch_size: int = Field(8, gt=0, description="Eval micro-batch per process.")
    gradient_accumulation_steps: int = Field(
        1,
        gt=0,
        description="Micro-batches per optimizer step: the global batch is per_device_train_batch_size "
        "x this x processes.",
    )
    logging_steps: int = Field(1, gt=0, description="Log training metrics every N steps.")
    eval_steps: int | None = Field(
        None, gt=0, description="Evaluate every N steps (and at the end) when there is eval data."
    )
    early_stopping_patience: int | None = Field(
        None,
        gt=0,
        description="Stop when metric_for_best_model has not improved for this many evals.",
    )
    early_stopping_threshold: float = Field(
        0.0, ge=0, description="How much metric_for_best_model must improve to count."
    )
    metric_for_best_model: str = Field(
        "loss",
        description="Eval metric that early stopping and load_best_model_at_end watch: `loss`, "
        "or a statistic the stage reports (`accuracy` for rm, `rewards/accuracies` for dpo); an `eval_` prefix is allowed.",
    )
    greater_is_better: bool | None = Field(
        None, description="Whether a larger metric is better; default: false for losses, else true."
    )
    load_best_model_at_end: bool = Field(
        False,
        description="After training, restore the weights of the best evaluation (by "
        "metric_for_best_model) before the final evaluation and saving.",
    )

    @property
    def best_metric(self) -> tuple[str, bool]:
        """``(name, greater_is_better)`` of the metric early stopping watches."""
        name = self.metric_for_best_model.removeprefix("eval_")
        greater = self.greater_is_better
        return name, (not name.endswith("loss")) if greater is None else greater


class SFTConfig(ModelArgs, DataArgs, TrainArgs):
    """Supervised fine-tuning (`stage: sft`)."""

    stage: Literal["sft"] = "sft"
    packing: bool = Field(
        False,
        description="Pack examples into rows of max_length before batching, so a batch is "
        "per_device_train_batch_size rows (more examples per step, fewer steps). Off: a batch is "
        "per_device_train_batch_size examples.",
    )
    padding_free: bool = Field(
        True,
        description="Lay each batch's examples end to end (rows of at most 2 * max_length; each "
        "example attends only to itself, under every attn_implementation) instead of padding them "
        "to the longest: no compute or memory is spent on padding. Packed rows are always padding-free.",
    )

    @model_validator(mode="after")
    def _check(self):
        if self.finetuning_type == "full" and self.dtype == "float16":
            raise ValueError(
                "dtype: float16 full fine-tuning is unstable without loss scaling; use float32 or bfloat16"
            )
        return self
