"""Configs of the preference stages: DPO (`stage: dpo`) and SPIN (`stage: spin`).

Every field is documented once here; errors name the field and never rewrite a value.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from alignforge.config.base import StrictModel
from alignforge.config.stages import DataArgs, ModelArgs, RolloutEngineArgs, TrainArgs


class PromptLengthArgs(StrictModel):
    """How an over-long pair is cut: one rule for every preference stage (RM, DPO, SPIN)."""

    max_prompt_length: int | None = Field(
        None,
        gt=0,
        description="Prompt tokens an over-long pair keeps at least (its last ones); its answers keep "
        "their first max_length - prompt tokens. Default max_length // 2. See docs/data.md.",
    )

    def _check_prompt_length(self):
        limit = self.max_prompt_length
        if limit is not None and limit >= self.max_length:
            raise ValueError(
                f"max_prompt_length: {limit} leaves no answer token within max_length "
                f"{self.max_length}; set it below max_length"
            )


class PreferenceArgs(StrictModel):
    """How preference pairs are batched (shared by DPO and SPIN)."""

    padding_free: bool = Field(
        True,
        description="Pack chosen and rejected sequences into rows, each attending only to itself "
        "(no padding waste). False gives TRL's layout: 2B right-padded rows.",
    )
    share_prompt: bool = Field(
        False,
        description="Encode each pair's prompt once: one segment = prompt + chosen + rejected, rejected tokens "
        "masked from the chosen ones and positioned after the prompt. Needs padding_free.",
    )
    pack_length: int | None = Field(
        None,
        gt=8,
        description="Longest packed row in tokens (default 2 * max_length: a pair fits in one row).",
    )

    def _check_layout(self):
        if self.share_prompt and not self.padding_free:
            raise ValueError(
                "share_prompt: needs padding_free=true (the shared layout is a packed one)"
            )
        attn = getattr(self, "attn_implementation", "sdpa")
        if self.share_prompt and attn.startswith("flash"):
            raise ValueError(
                f"share_prompt: the shared layout needs a custom attention mask, which {attn} does "
                "not take; use share_prompt: false (packed pairs run as varlen sequences) or "
                "attn_implementation: sdpa, eager or flex_attention"
            )


class DPOConfig(ModelArgs, DataArgs, TrainArgs, PreferenceArgs, PromptLengthArgs):
    """Direct preference optimisation (`stage: dpo`; Rafailov et al. 2023) and its variants,
    reference-free ones (SimPO, ORPO) and KTO on answers labelled one at a time."""

    stage: Literal["dpo"] = "dpo"
    formatting: Literal["auto", "sharegpt", "explicit", "implicit"] = Field(
        "auto",
        description="Preference row format: sharegpt (conversations + chosen/rejected messages), explicit "
        "(prompt/chosen/rejected) or implicit (chosen/rejected conversations sharing a prefix); auto detects it.",
    )
    learning_rate: float = Field(5e-5, gt=0, description="Peak learning rate.")
    beta: float = Field(
        0.1,
        gt=0,
        description="Strength of the KL constraint to the reference (DPO's and KTO's beta); "
        "SimPO's reward scale; ORPO's lambda, the weight of its odds-ratio term.",
    )
    loss_type: Literal[
        "sigmoid", "ipo", "hinge", "robust", "conservative", "simpo", "orpo", "kto"
    ] = Field(
        "sigmoid",
        description="sigmoid (DPO), ipo (IPO, on length-averaged log-probs), hinge (SLiC), robust (rDPO), "
        "conservative (cDPO), simpo (SimPO) and orpo (ORPO: no reference model, length-averaged "
        "log-probs; ORPO adds the chosen answer's NLL), kto (KTO: prompt/completion/label rows or "
        "pairs, each answer on its own). See docs/papers.md.",
    )
    simpo_gamma: float = Field(
        0.5,
        ge=0,
        description="SimPO's target reward margin gamma: loss -log sigmoid(beta * h - gamma) on "
        "length-averaged log-probs (the paper uses beta 2-2.5 with gamma/beta about 0.5).",
    )
    cpo_alpha: float = Field(
        0.0,
        ge=0,
        description="loss_type simpo: weight of the chosen answer's NLL added to the loss "
        "(TRL's CPO-SimPO); 0 is SimPO.",
    )
    desirable_weight: float = Field(
        1.0, gt=0, description="loss_type kto: weight lambda_D of desirable answers' losses."
    )
    undesirable_weight: float = Field(
        1.0,
        gt=0,
        description="loss_type kto: weight lambda_U of undesirable answers' losses; KTO's paper "
        "keeps lambda_D * n_desirable / (lambda_U * n_undesirable) between 1 and 4/3.",
    )
    label_smoothing: float = Field(
        0.0,
        ge=0,
        lt=0.5,
        description="Assumed label-flip rate for loss_type robust / conservative.",
    )
    use_margin: bool = Field(
        True, description="Use the data's `margin` column as the offset m in the loss when present."
    )
    precompute_ref_logps: bool = Field(
        False,
        description="Compute reference log-probs once before training and cache them on disk "
        "(keyed by model fingerprint, data hash, max_length and chat template); later runs reuse them.",
    )

    @model_validator(mode="after")
    def _check(self):
        self._check_layout()
        self._check_prompt_length()
        if self.label_smoothing and self.loss_type not in ("robust", "conservative"):
            raise ValueError(
                f"label_smoothing: only loss_type robust or conservative use it (loss_type is {self.loss_type})"
            )
        if self.finetuning_type == "full" and self.dtype == "float16":
            raise ValueError("dtype: float16 full fine-tuning is unstable without loss scaling")
        if self.precompute_ref_logps and self.loss_type in ("simpo", "orpo"):
            raise ValueError(
                f"precompute_ref_logps: loss_type {self.loss_type} uses no reference model; "
                "set precompute_ref_logps=false"
            )
        if self.cpo_alpha and self.loss_type != "simpo":
            raise ValueError(
                f"cpo_alpha: only loss_type simpo uses it (loss_type is {self.loss_type}); "
                "orpo adds its NLL term itself"
            )
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) != 1.0 and self.loss_type != "kto":
                raise ValueError(
                    f"{name}: only loss_type kto uses it (loss_type is {self.loss_type})"
                )
        return self


class SPINConfig(
    ModelArgs, DataArgs, TrainArgs, PreferenceArgs, PromptLengthArgs, RolloutEngineArgs
):
    """Self-play fine-tuning (`stage: spin`; Chen et al. 2024) on SFT data.

    With ``rollout_engine: server`` the opponent answers from ``alignforge serve``, which loads
    each iteration's opponent weights first (``/v1/load_weights``; docs/dpo_spin.md).
    """

    stage: Literal["spin"] = "spin"
    num_iterations: int = Field(3, gt=0, description="Self-play iterations (the paper runs 3-4).")
    beta: float | list[float] = Field(
        0.1,
        description="SPIN's lambda per iteration: one value, or a list of num_iterations values.",
    )
    learning_rate: float | list[float] = Field(
        5e-5,
        description="Peak learning rate per iteration: one value, or a list of num_iterations values.",
    )
    loss_type: Literal["sigmoid", "hinge"] = Field(
        "sigmoid", description="Logistic loss (the paper) or hinge, as in the official code."
    )
    max_new_tokens: int = Field(
        256, gt=0, description="Longest generated response of the opponent."
    )
    do_sample: bool = Field(False, description="Sample the opponent's responses (else greedy).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature when do_sample.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling when do_sample.")
    generation_batch_size: int = Field(
        16,
        gt=0,
        description="Prompts the opponent answers together (one batch, or one round of requests).",
    )
    mix_previous: bool = Field(
        True, description="Also train on the previous iteration's pairs (the official recipe does)."
    )
    early_stop_margin: float | None = Field(
        None,
        description="Stop after an iteration whose final reward margin (policy vs its opponent, eval split if "
        "any) is below this; with early_stop_accuracy set too, both must be below.",
    )
    early_stop_accuracy: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Stop after an iteration whose final reward accuracy is below this.",
    )

    @model_validator(mode="after")
    def _check(self):
        for name in ("beta", "learning_rate"):
            value = getattr(self, name)
            values = value if isinstance(value, list) else [value]
            if isinstance(value, list) and len(value) != self.num_iterations:
                raise ValueError(
                    f"{name}: has {len(value)} values but num_iterations is {self.num_iterations}; "
                    "give one value or exactly one per iteration"
                )
            if any(v <= 0 for v in values):
                raise ValueError(f"{name}: every value must be > 0 (got {value})")
        self._check_layout()
        self._check_prompt_length()
        if self.finetuning_type == "qlora":
            raise ValueError(
                "finetuning_type: SPIN merges the adapter after every iteration; use lora or full"
            )
        return self

    def per_iteration(self, name: str, k: int) -> float:
        value = getattr(self, name)
        return value[k] if isinstance(value, list) else value
