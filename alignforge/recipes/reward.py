"""Reward model on preference pairs (``stage: rm``): a scalar head on a (merged SFT) model.

    alignforge train examples/rm.yaml
    alignforge train examples/rm.yaml finetuning_type=full agreement_ceiling=0.78

Recipe, top to bottom: read ``prompt``/``chosen``/``rejected`` rows (strings or message lists;
optional ``margin`` and ``agreement`` columns, the annotation export's columns), tokenize both
answers with the chat template, build the LM (LoRA or full) plus a ``ScalarHead`` read at the
last non-pad token, train the Bradley-Terry loss on the shared loop, then score the held-out
pairs: accuracy with a bootstrap interval beside the 50% coin flip and the annotators'
agreement ceiling, and the score distribution (``reward_scores_eval.json``) that the PPO drift
monitor compares policy samples with.

Loss: ``mean_pairs[-log sigmoid(r_c - r_r - margin) + center_coef (r_c + r_r)^2]``
(:func:`alignforge.losses.pairwise.bradley_terry_loss`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from alignforge.config.rlhf import RMConfig
from alignforge.data import DataError
from alignforge.evaluate.stats import bootstrap_ci
from alignforge.losses.pairwise import bradley_terry_loss
from alignforge.models import load_tokenizer
from alignforge.models.heads import RewardModel, ScalarHead, encode_pair, pad_left
from alignforge.recipes.common import (
    Timer,
    build_trainable_model,
    load_splits,
    peak_memory_mb,
    trainable_params,
    write_summary,
)
from alignforge.training import TrainLoop, to_device
from alignforge.training.plots import plot_loss_curve
from alignforge.training.rundir import open_run

CONFIG = RMConfig


@dataclass
class Pair:
    chosen: list[int]
    rejected: list[int]
    margin: float
    agreement: float | None = None


def _answer(value, field: str, where: str):
    if isinstance(value, str) and value.strip():
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        return value
    raise DataError(f"{where}: {field!r} must be a non-empty string or a list of messages")


def normalise_pair_row(row: dict, columns: dict[str, str] | None = None) -> dict:
    """Map a row onto prompt/chosen/rejected/margin.

    Accepts our columns (the annotation export), a ``columns`` renaming, and the LLaMA-Factory
    ShareGPT layout (``conversations`` + ``chosen``/``rejected`` as ``{from, value}``).
    """
    if columns:
        row = {**row, **{ours: row[theirs] for ours, theirs in columns.items() if theirs in row}}
    if "prompt" not in row and isinstance(row.get("conversations"), list):
        from alignforge.data.formats import SHAREGPT_ROLES

        conv = row["conversations"]
        prompt = [
            {"role": SHAREGPT_ROLES.get(m.get("from"), "user"), "content": m.get("value", "")}
            for m in conv
        ]
        row = {**row, "prompt": prompt}
        for key in ("chosen", "rejected"):
            if isinstance(row.get(key), dict) and "value" in row[key]:
                row[key] = row[key]["value"]
    return row


def prepare_pairs(
    rows: list[dict],
    tokenizer,
    max_length: int,
    source: str,
    skip_bad_rows: bool = False,
    columns: dict[str, str] | None = None,
):
    """Tokenized pairs and a count of skipped rows; errors name the file, row and column."""
    pairs, bad = [], 0
    for i, row in enumerate(rows):
        where = f"{source} row {i}"
        try:
            row = normalise_pair_row(row, columns)
            missing = [c for c in ("prompt", "chosen", "rejected") if c not in row]
            if missing:
                raise DataError(f"{where}: column {missing[0]!r} is missing; row has {sorted(row)}")
            prompt = row["prompt"]
            if not isinstance(prompt, str | list):
                raise DataError(f"{where}: 'prompt' must be a string or a list of messages")
            margin = row.get("margin", 0.0)
            if margin is None:
                margin = 0.0
            if not isinstance(margin, int | float) or not math.isfinite(margin):
                raise DataError(f"{where}: 'margin' must be a finite number, got {margin!r}")
            chosen = encode_pair(
                tokenizer, prompt, _answer(row["chosen"], "chosen", where), max_length
            )
            rejected = encode_pair(
                tokenizer, prompt, _answer(row["rejected"], "rejected", where), max_length
            )
            agreement = row.get("agreement")
            pairs.append(Pair(chosen, rejected, float(margin), agreement))
        except DataError:
            if not skip_bad_rows:
                raise
            bad += 1
    if not pairs:
        raise DataError(f"{source}: no usable preference pairs")
    return pairs, bad


class PairCollator:
    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, pairs: list[Pair]) -> dict:
        enc = pad_left([p.chosen for p in pairs] + [p.rejected for p in pairs], self.pad_id)
        enc["margin"] = torch.tensor([p.margin for p in pairs], dtype=torch.float32)
        return enc


class BradleyTerryObjective:
    """Summed Bradley-Terry loss over a micro-batch of pairs; ``count`` is the number of pairs."""

    def __init__(self, center_coef: float, use_margin: bool):
        self.center_coef, self.use_margin = center_coef, use_margin

    def count(self, batch: dict) -> float:
        return float(batch["margin"].shape[0])

    def tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    def __call__(self, model, batch: dict):
        scores = model(batch["input_ids"], batch["attention_mask"])  # (2B,)
        n = batch["margin"].shape[0]
        out = bradley_terry_loss(
            scores[:n],
            scores[n:],
            margin=batch["margin"] if self.use_margin else None,
            center_coef=self.center_coef,
            num_pairs=1,  # summed: the loop divides by the global number of pairs
        )
        return out.loss, {"accuracy": out.accuracy * n, "reward_margin": out.reward_margin * n}


@torch.no_grad()
def score_pairs(
    model, pairs: list[Pair], collate, batch_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Chosen and rejected scores ``(N,)`` of every pair."""
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        batch = to_device(collate(pairs[i : i + batch_size]), device)
        s = model(batch["input_ids"], batch["attention_mask"]).cpu()
        n = len(pairs[i : i + batch_size])
        chosen += s[:n].tolist()
        rejected += s[n:].tolist()
    return np.asarray(chosen), np.asarray(rejected)


def freeze_unused_lm_head(lm) -> bool:
    """Freeze the LM head when it is its own matrix: a reward model never runs it (the score
    comes from the last hidden state), so it would get no gradient and DDP would stop on an
    unused parameter. A head tied to the input embeddings stays trainable (the embedding lookup
    uses it). The saved model keeps the head unchanged. Returns whether it froze one."""
    head, emb = lm.get_output_embeddings(), lm.get_input_embeddings()
    if head is None or emb is None or head.weight is emb.weight:
        return False
    head.requires_grad_(False)
    return True


def accuracy_report(chosen, rejected, ceiling: float | None, n_boot: int, seed: int) -> dict:
    """Held-out accuracy with a bootstrap 95% interval, beside the coin flip and the ceiling."""
    correct = (chosen > rejected).astype(float)
    est = bootstrap_ci(correct, n_boot=max(n_boot, 1), seed=seed) if n_boot else None
    report = {
        "n_pairs": int(correct.size),
        "accuracy": float(correct.mean()),
        "accuracy_ci95": [est.low, est.high] if est else None,
        "coin_flip": 0.5,
        "agreement_ceiling": ceiling,
        "beats_coin_flip": bool(est.low > 0.5) if est else None,
        "share_of_ceiling": float(correct.mean() / ceiling) if ceiling else None,
        "mean_margin": float((chosen - rejected).mean()),
    }
    return report


def _ceiling(cfg: RMConfig, pairs: list[Pair]) -> float | None:
    if cfg.agreement_ceiling is not None:
        return cfg.agreement_ceiling
    values = [p.agreement for p in pairs if isinstance(p.agreement, int | float)]
    return float(np.mean(values)) if values else None


def plot_scores(chosen, rejected, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = np.linspace(min(chosen.min(), rejected.min()), max(chosen.max(), rejected.max()), 30)
    ax.hist(chosen, bins=bins, alpha=0.6, label="chosen")
    ax.hist(rejected, bins=bins, alpha=0.6, label="rejected")
    ax.set_xlabel("reward score")
    ax.set_ylabel("pairs")
    ax.set_title("reward scores on the eval set")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: RMConfig, callbacks=()) -> dict:
    acc = open_run(cfg)
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.cache_dir)
    train_rows, eval_rows = load_splits(
        cfg.dataset, cfg.eval_dataset, cfg.val_size, cfg.seed, cfg.max_samples
    )
    if not eval_rows:
        raise DataError(
            "eval_dataset / val_size: a reward model needs held-out pairs to report its accuracy; "
            "set eval_dataset or val_size (e.g. 0.1)"
        )
    train_pairs, bad = prepare_pairs(
        train_rows, tokenizer, cfg.max_length, cfg.dataset, cfg.skip_bad_rows, cfg.columns
    )
    eval_pairs, bad_eval = prepare_pairs(
        eval_rows,
        tokenizer,
        cfg.max_length,
        cfg.eval_dataset or "held-out split",
        cfg.skip_bad_rows,
        cfg.columns,
    )
    collate = PairCollator(tokenizer.pad_token_id)

    lm = build_trainable_model(cfg)
    freeze_unused_lm_head(lm)
    model = RewardModel(lm, ScalarHead(lm.config.hidden_size), tokenizer, cfg.max_length)
    n_train, n_total = trainable_params(model)
    loop = TrainLoop(
        model,
        BradleyTerryObjective(cfg.center_rewards_coef, cfg.use_margin),
        train_pairs,
        collate,
        cfg,
        eval_units=eval_pairs,
        accelerator=acc,
        callbacks=callbacks,
    )
    with Timer() as t:
        result = loop.fit()
    trained = acc.unwrap_model(loop.model)
    chosen, rejected = score_pairs(trained, eval_pairs, collate, cfg.per_device_eval_batch_size)
    report = accuracy_report(
        chosen, rejected, _ceiling(cfg, eval_pairs), cfg.bootstrap_samples, cfg.seed
    )
    final = loop.out / "final"
    summary = {
        "stage": "rm",
        "model": cfg.model_name_or_path,
        "finetuning_type": cfg.finetuning_type,
        "trainable_params": n_train,
        "total_params": n_total,
        "final_model": str(final),
        "train_pairs": len(train_pairs),
        "bad_rows_skipped": bad + bad_eval,
        "eval": report,
        "score_mean": float(np.concatenate([chosen, rejected]).mean()),
        "score_std": float(np.concatenate([chosen, rejected]).std()),
        **result,
        "seconds": t.seconds,
        "peak_memory_mb": peak_memory_mb(),
    }
    if acc.is_main_process:
        trained.save(
            final,
            tokenizer,
            meta={"base": cfg.model_name_or_path, "finetuning_type": cfg.finetuning_type},
        )
        scores = [float(x) for x in np.concatenate([chosen, rejected])]
        for where in (loop.out, final):  # the PPO drift monitor reads it next to the model
            (where / "reward_scores_eval.json").write_text(json.dumps(scores))
        plot_scores(chosen, rejected, loop.out / "reward_scores_eval.png")
        plot_loss_curve(
            loop.logger.rows(), loop.out / "loss_curve.png", title=f"RM {cfg.model_name_or_path}"
        )
        write_summary(loop.out, summary)
        print_summary(summary)
    loop.logger.close()
    return summary


def print_summary(s: dict) -> None:
    e = s["eval"]
    ci = e["accuracy_ci95"]
    lines = [
        f"RM finished in {s['seconds']:.0f}s: {s['steps']}/{s['total_steps']} steps on {s['train_pairs']} pairs",
        f"  held-out accuracy: {100 * e['accuracy']:.1f}%"
        + (f" [95% CI {100 * ci[0]:.1f}, {100 * ci[1]:.1f}]" if ci else "")
        + f" on {e['n_pairs']} pairs; coin flip 50.0%"
        + (
            f"; annotator agreement ceiling {100 * e['agreement_ceiling']:.1f}%"
            if e["agreement_ceiling"]
            else ""
        ),
        f"  eval scores: mean {s['score_mean']:.3f}, std {s['score_std']:.3f} (reward_scores_eval.json)",
        f"  model: {s['final_model']}",
    ]
    print("\n".join(lines))
