"""Supervised fine-tuning (``stage: sft``): full, LoRA or QLoRA, with packing.

    alignforge train examples/sft_default.yaml
    alignforge train examples/sft_default.yaml finetuning_type=qlora max_steps=20

Recipe, top to bottom: check the run dir, tokenize the data with loss masks (counting what was
truncated or dropped), pack it, build the model, train on the shared loop, save the model, the
metrics, a loss curve and a summary.

Loss: token-mean cross-entropy over the completion tokens of the whole global batch. Only the
positions whose next token is a label go through the LM head, which skips the prompt tokens'
share of the (large) vocabulary projection.
"""

from __future__ import annotations

from alignforge.config.stages import SFTConfig
from alignforge.data import IGNORE, collate_packed, collate_padded, pack, prepare_sft
from alignforge.data.templating import set_chat_template
from alignforge.models import load_tokenizer
from alignforge.models.scoring import target_token_logps
from alignforge.recipes.common import (
    Timer,
    best_note,
    build_trainable_model,
    load_prepared,
    peak_memory_mb,
    save_final,
    trainable_params,
    write_summary,
)
from alignforge.training import TrainLoop
from alignforge.training.plots import plot_loss_curve
from alignforge.training.rundir import open_run

CONFIG = SFTConfig


class CausalLMObjective:
    """Summed next-token cross-entropy over label tokens; ``count`` is the number of label tokens."""

    def count(self, batch: dict) -> float:
        return float((batch["labels"][:, 1:] != IGNORE).sum())

    def tokens(self, batch: dict) -> int:
        """Real (non-padding) tokens in the batch, prompt tokens included."""
        if "segment_ids" in batch:  # packed: padding is segment -1
            return int((batch["segment_ids"] >= 0).sum())
        return int(batch["attention_mask"].sum())

    def __call__(self, model, batch: dict):
        target = batch["labels"][:, 1:]  # (B, T-1): position t predicts token t+1
        rows, preds = (target != IGNORE).nonzero(as_tuple=True)  # the LM head runs only here
        kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
        logps = target_token_logps(
            model, batch["input_ids"], rows, preds, target[rows, preds], **kwargs
        )
        return -logps.sum(), {}


def make_units(examples, cfg, pad_id):
    """Training units and their collate function: packed rows; single examples laid end to end
    (padding-free); or single examples padded to the batch's longest."""
    if cfg.packing:
        rows = [[examples[i] for i in row] for row in pack(examples, cfg.max_length)]
        return rows, lambda batch: collate_packed(batch, pad_id)
    if cfg.padding_free:  # rows of up to 2 * max_length: little end-of-row padding
        return examples, lambda batch: collate_packed(
            [[batch[i] for i in row] for row in pack(batch, 2 * cfg.max_length)], pad_id
        )
    return examples, lambda batch: collate_padded(batch, pad_id)


def run(cfg: SFTConfig, callbacks=()) -> dict:
    acc = open_run(cfg)
    tokenizer = set_chat_template(
        load_tokenizer(cfg.model_name_or_path, cfg.cache_dir), cfg.template
    )

    train_ex, train_stats, eval_ex, eval_stats = load_prepared(cfg, tokenizer, prepare_sft)
    train_units, collate = make_units(train_ex, cfg, tokenizer.pad_token_id)
    eval_units, _ = make_units(eval_ex, cfg, tokenizer.pad_token_id) if eval_ex else ([], None)

    model = build_trainable_model(cfg)
    n_train, n_total = trainable_params(model)
    loop = TrainLoop(
        model,
        CausalLMObjective(),
        train_units,
        collate,
        cfg,
        eval_units=eval_units,
        accelerator=acc,
        callbacks=callbacks,
    )
    with Timer() as t:
        result = loop.fit()
    final = save_final(loop.model, tokenizer, loop.out, acc)

    summary = {
        "stage": "sft",
        "model": cfg.model_name_or_path,
        "finetuning_type": cfg.finetuning_type,
        "trainable_params": n_train,
        "total_params": n_total,
        "final_model": str(final),
        "data": train_stats.as_dict(),
        "eval_data": eval_stats.as_dict() if eval_stats else None,
        "packing": cfg.packing,
        "padding_free": cfg.packing or cfg.padding_free,
        "train_units": len(train_units),
        **result,
        "seconds": t.seconds,
        "tokens_per_s": result["tokens_trained"] / max(result["train_seconds"], 1e-9),
        "peak_memory_mb": peak_memory_mb(),
    }
    if acc.is_main_process:
        plot_loss_curve(
            loop.logger.rows(), loop.out / "loss_curve.png", title=f"SFT {cfg.model_name_or_path}"
        )
        write_summary(loop.out, summary)
        print_summary(summary)
    loop.logger.close()
    return summary


def print_summary(s: dict) -> None:
    d = s["data"]
    lines = [
        f"SFT finished in {s['seconds']:.0f}s: {s['steps']}/{s['total_steps']} steps"
        + (" (stopped early)" if s["stopped_early"] else ""),
        f"  examples: {d['used']} used of {d['rows']} rows; {d['truncated']} truncated, "
        f"{d['dropped_too_long']} dropped too long, {d['dropped_no_labels']} dropped without labels, {d['bad_rows']} bad rows skipped",
        f"  tokens trained: {s['tokens_trained']} ({s['tokens_per_s']:.0f} tokens/s)",
        f"  trainable parameters: {s['trainable_params']:,} of {s['total_params']:,}",
    ]
    if s.get("final_eval"):
        lines.append(f"  eval loss: {s['final_eval']['loss']:.4f}{best_note(s['best_metric'])}")
    lines.append(f"  model: {s['final_model']}")
    print("\n".join(lines))
