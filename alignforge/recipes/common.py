"""Pieces every recipe shares: data loading with held-out splits, model building, final save."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import torch

from alignforge.data import DataError, read_rows
from alignforge.data.mix import mix_rows
from alignforge.models import load_model, wrap_lora


def load_splits(
    datasets: list[str],
    eval_datasets: list[str],
    val_size: float,
    seed: int,
    max_samples: int | None,
    mix_strategy: str = "concat",
    interleave_probs: list[float] | None = None,
):
    """Training rows (several datasets mixed by ``mix_strategy``: :mod:`alignforge.data.mix`) and
    eval rows (several datasets concatenated); without eval datasets, hold out ``val_size`` of
    the rows. Both are :class:`Rows`, each row knowing its dataset and row for error messages.

    A folder is read by split: a training dataset gives its train split, an eval dataset its one
    held-out split (test, validation or eval), so a folder holding both is never read whole."""
    parts = [_read(d, "train", "dataset") for d in datasets]
    rows = mix_rows(parts, datasets, mix_strategy, interleave_probs, seed)
    if max_samples:
        rows = rows.select(range(min(max_samples, len(rows))))
    if eval_datasets:
        return rows, mix_rows(
            [_read(d, "eval", "eval_dataset") for d in eval_datasets], eval_datasets
        )
    if val_size > 0:
        idx = list(range(len(rows)))
        random.Random(seed).shuffle(idx)
        n_eval = max(1, int(round(len(rows) * val_size)))
        held = set(idx[:n_eval])
        return rows.select(i for i in range(len(rows)) if i not in held), rows.select(sorted(held))
    return rows, []


def _read(source: str, split: str, field: str) -> list[dict]:
    try:
        return read_rows(source, split)
    except DataError as e:
        raise DataError(f"{field}: {e}") from None


def load_prepared(cfg, tokenizer, prepare):
    """Train and eval rows of ``cfg``'s data, each turned into examples by ``prepare``
    (``prepare_sft`` or ``prepare_pairs``); returns (train, train_stats, eval, eval_stats)."""
    train_rows, eval_rows = load_splits(
        cfg.datasets, cfg.eval_datasets, cfg.val_size, cfg.seed, cfg.max_samples,
        cfg.mix_strategy, cfg.interleave_probs,
    )  # fmt: skip
    prep = dict(max_length=cfg.max_length, truncation=cfg.truncation, formatting=cfg.formatting,
                columns=cfg.columns, skip_bad_rows=cfg.skip_bad_rows)  # fmt: skip
    train, train_stats = prepare(train_rows, tokenizer, source=", ".join(cfg.datasets), **prep)
    if not eval_rows:
        return train, train_stats, [], None
    evals, eval_stats = prepare(
        eval_rows, tokenizer, source=", ".join(cfg.eval_datasets) or "held-out split", **prep
    )
    return train, train_stats, evals, eval_stats


def build_trainable_model(cfg):
    """Load ``cfg.model_name_or_path`` and make it trainable as ``cfg.finetuning_type`` says."""
    quant = cfg.finetuning_type == "qlora"
    model = load_model(
        cfg.model_name_or_path,
        dtype=cfg.dtype,
        quantize_4bit=quant,
        adapter_trainable=True,
        cache=cfg.cache_dir,
        attn_implementation=cfg.attn_implementation,
    )
    if hasattr(model, "peft_config"):  # continuing an adapter: it is already trainable
        return model
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.finetuning_type in ("lora", "qlora"):
        if cfg.gradient_checkpointing:
            model.enable_input_require_grads()
        model = wrap_lora(
            model,
            cfg.lora_rank,
            cfg.lora_alpha,
            cfg.lora_dropout,
            cfg.lora_target,
            quantized=quant,
            gradient_checkpointing=cfg.gradient_checkpointing,
        )
    return model


def save_final(model, tokenizer, out_dir: Path, acc) -> Path:
    """Save the trained model (a PEFT adapter dir or a full HF model) with its tokenizer."""
    final = out_dir / "final"
    acc.wait_for_everyone()
    if acc.is_main_process:
        acc.unwrap_model(model).save_pretrained(final, safe_serialization=True)
        tokenizer.save_pretrained(final)
    acc.wait_for_everyone()
    return final


def trainable_params(model) -> tuple[int, int]:
    total = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return train, total


def peak_memory_mb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class Timer:
    def __enter__(self):
        self.start = time.time()
        return self

    def __exit__(self, *exc):
        self.seconds = time.time() - self.start


def best_note(best: dict | None) -> str:
    """`` (best accuracy 0.6125 at step 40, restored)``: the loop's ``best_metric``, or ''."""
    if not best:
        return ""
    restored = ", restored" if best["restored"] else ""
    return f" (best {best['name']} {best['value']:.4f} at step {best['step']}{restored})"


def selection_note(summary: dict) -> list[str]:
    """A line saying the held-out figures are optimistic when the held-out set also chose the
    step (early stopping or ``load_best_model_at_end``); none otherwise."""
    best = summary.get("best_metric") or {}
    if not (summary.get("stopped_early") or best.get("restored")):
        return []
    return [
        "  note: the held-out set also chose when to stop, so its figures are optimistic; "
        "score pairs it never saw with `alignforge eval --task preference`"
    ]


def write_summary(out_dir: Path, summary: dict) -> None:
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
