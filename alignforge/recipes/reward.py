"""Reward model on preference pairs (``stage: rm``): a scalar head on a (merged SFT) model.

    alignforge train examples/rm.yaml
    alignforge train examples/rm.yaml finetuning_type=full length_control=true

Recipe, top to bottom: read and tokenize the pairs as DPO does
(:func:`alignforge.data.preference.prepare_pairs`: the same formats, and over-long pairs cut by
the one rule every preference stage shares: the end of the prompt, the start of each answer),
build the LM (LoRA or full), score the held-out pairs with the *untrained* model for the
baselines, add a ``ScalarHead`` read at the last token, train the Bradley-Terry loss on the shared
loop, then report the held-out accuracy once (the loop's final evaluation records every pair's
scores) beside a coin flip, "prefer the longer answer", the base model's mean log-prob per
token and 1,000 untrained score heads (:mod:`alignforge.evaluate.preference`), with a warning
when the held-out set is too small to tell anything. The scores (``reward_scores_eval.json``)
are what the PPO drift monitor compares policy samples with.

Loss: ``mean_pairs[-log sigmoid(r_c - r_r + gamma * (log n_c - log n_r) - margin)
+ center_coef (r_c + r_r)^2]`` (:func:`alignforge.losses.pairwise.bradley_terry_loss`), with
``n`` an answer's token count before truncation and ``gamma = 0`` unless ``length_control``
(then fitted on the training pairs by :func:`fit_length_coef`). The length term explains the
part of the preferences that answer length predicts, so the score is pushed to learn the rest.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import numpy as np
import torch

from alignforge.config.rlhf import RMConfig
from alignforge.data import DataError
from alignforge.data.preference import PreferencePair, prepare_pairs
from alignforge.data.templating import set_chat_template
from alignforge.evaluate import preference as pref
from alignforge.evaluate.pair_scores import last_token_features, mean_token_logps, sequences
from alignforge.losses.pairwise import bradley_terry_loss
from alignforge.models import load_tokenizer
from alignforge.models.heads import RewardModel, ScalarHead, pad_left
from alignforge.models.loading import portable_name
from alignforge.recipes.common import (
    Timer,
    best_note,
    build_trainable_model,
    load_splits,
    peak_memory_mb,
    selection_note,
    trainable_params,
    write_summary,
)
from alignforge.recipes.memory import warn_if_memory_short
from alignforge.training import TrainLoop, make_accelerator
from alignforge.training.plots import plot_loss_curve
from alignforge.training.rundir import prepare_output_dir

CONFIG = RMConfig


def log_length_ratio(pairs: list[PreferencePair]) -> torch.Tensor:
    """``log n_c - log n_r`` per pair ``(P,)``, from the answers' lengths before truncation."""
    lengths = [p.lengths or (len(p.chosen_ids), len(p.rejected_ids)) for p in pairs]
    return torch.tensor([math.log(c) - math.log(r) for c, r in lengths], dtype=torch.float32)


def fit_length_coef(x: torch.Tensor, ridge: float = 1.0, steps: int = 50) -> float:
    """Maximum-likelihood ``gamma`` of ``P(chosen preferred) = sigmoid(gamma * x)`` (``x`` the
    log length ratios ``(P,)``), with an L2 penalty ``ridge/2 * gamma^2`` that keeps it finite
    when every chosen answer is the longer one. Newton's method on a concave objective."""
    x = x.double()
    gamma = 0.0
    for _ in range(steps):
        p = torch.sigmoid(gamma * x)
        grad = float((x * (1 - p)).sum()) - ridge * gamma
        hess = -float((x * x * p * (1 - p)).sum()) - ridge
        gamma -= grad / hess
    return gamma


class PairCollator:
    """Left-padded ``prompt + chosen`` rows, then ``prompt + rejected`` rows; per pair its
    ``margin``, its ``length_offset`` ``gamma * (log n_c - log n_r)`` and its row ``index``."""

    def __init__(self, pad_id: int, length_coef: float = 0.0):
        self.pad_id, self.length_coef = pad_id, length_coef

    def __call__(self, pairs: list[PreferencePair]) -> dict:
        enc = pad_left(sequences(pairs), self.pad_id)
        enc["margin"] = torch.tensor([p.margin or 0.0 for p in pairs], dtype=torch.float32)
        enc["length_offset"] = self.length_coef * log_length_ratio(pairs)
        enc["index"] = torch.tensor([p.index for p in pairs])
        return enc


class BradleyTerryObjective:
    """Summed Bradley-Terry loss over a micro-batch of pairs; ``count`` is the number of pairs.

    In eval mode it also records each pair's ``(chosen, rejected)`` scores by row index in
    ``eval_scores``, so the loop's final evaluation is the one scoring of the held-out set.
    """

    def __init__(self, center_coef: float, use_margin: bool):
        self.center_coef, self.use_margin = center_coef, use_margin
        self.eval_scores: dict[int, tuple[float, float]] = {}

    def count(self, batch: dict) -> float:
        return float(batch["margin"].shape[0])

    def tokens(self, batch: dict) -> int:
        return int(batch["attention_mask"].sum())

    def __call__(self, model, batch: dict):
        scores = model(batch["input_ids"], batch["attention_mask"])  # (2B,)
        n = batch["margin"].shape[0]
        offset = batch["margin"] * self.use_margin - batch["length_offset"]
        out = bradley_terry_loss(
            scores[:n],
            scores[n:],
            margin=offset,
            center_coef=self.center_coef,
            num_pairs=1,  # summed: the loop divides by the global number of pairs
        )
        if not model.training:
            c, r, idx = scores[:n].tolist(), scores[n:].tolist(), batch["index"].tolist()
            self.eval_scores.update({i: (a, b) for i, a, b in zip(idx, c, r, strict=True)})
        return out.loss, {"accuracy": out.accuracy * n, "reward_margin": out.reward_margin * n}


def recorded_scores(records: dict, pairs: list[PreferencePair], acc) -> np.ndarray:
    """The rows an objective recorded by pair index during every rank's last evaluation,
    gathered across ranks, in the order of ``pairs``: ``(N, k)``."""
    from accelerate.utils import gather_object

    merged: dict[int, tuple] = {}
    for part in gather_object([records]) if acc.num_processes > 1 else [records]:
        merged.update(part)
    return np.array([merged[p.index] for p in pairs], dtype=float)


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


def load_pairs(cfg: RMConfig, tokenizer):
    """Train and held-out pairs (with their stats) and the held-out rows (for ``agreement``
    and ``category`` columns)."""
    train_rows, eval_rows = load_splits(
        cfg.datasets, cfg.eval_datasets, cfg.val_size, cfg.seed, cfg.max_samples,
        cfg.mix_strategy, cfg.interleave_probs,
    )  # fmt: skip
    if not eval_rows:
        raise DataError(
            "eval_dataset / val_size: a reward model needs held-out pairs to report its accuracy; "
            "set eval_dataset or val_size (e.g. 0.1)"
        )
    prep = functools.partial(
        prepare_pairs, tokenizer=tokenizer, max_length=cfg.max_length, truncation=cfg.truncation,
        formatting=cfg.formatting, columns=cfg.columns, skip_bad_rows=cfg.skip_bad_rows,
        max_prompt_length=cfg.max_prompt_length,
    )  # fmt: skip
    train, train_stats = prep(train_rows, source=", ".join(cfg.datasets))
    evals, eval_stats = prep(eval_rows, source=", ".join(cfg.eval_datasets) or "held-out split")
    return train, train_stats, evals, eval_stats, eval_rows


@torch.no_grad()
def base_features(lm, pairs, pad_id: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The untrained model's mean log-prob per answer token ``(N, 2)`` and last-token features
    ``(N, 2, H)`` on ``pairs``: two of the baselines the trained model is compared with."""
    was_training = lm.training
    logps = mean_token_logps(lm, pairs, pad_id, batch_size)
    features = last_token_features(lm, pairs, pad_id, batch_size)
    lm.train(was_training)
    return logps, features


def column(rows: list[dict], pairs: list[PreferencePair], name: str) -> list | None:
    """Each pair's value of column ``name`` in its source row; None when no row has it."""
    values = [rows[p.index].get(name) for p in pairs]
    return values if any(v is not None for v in values) else None


def honest_report(scores, pairs, rows, base_logps, features, ceiling, n_boot: int, seed: int):
    """``(report, baselines)``: :func:`alignforge.evaluate.preference.heldout_report` with the
    untrained heads, the ``category`` column and the annotators' agreement ceiling."""
    cats = column(rows, pairs, "category")
    report, base = pref.heldout_report(scores, base_logps, pairs, features, cats, n_boot, seed)
    won = pref.outcomes(scores[:, 0], scores[:, 1])
    report["agreement_ceiling"] = ceiling
    report["share_of_ceiling"] = float(won.mean() / ceiling) if ceiling else None
    report["mean_margin"] = float((scores[:, 0] - scores[:, 1]).mean())
    return report, base


def _ceiling(cfg: RMConfig, rows: list[dict], pairs: list[PreferencePair]) -> float | None:
    """``agreement_ceiling`` as set, else the mean of the held-out rows' ``agreement_ceiling``
    column (each label's expected accuracy for a perfect model, written by the annotation
    export), else of their ``agreement`` column."""
    if cfg.agreement_ceiling is not None:
        return cfg.agreement_ceiling
    for name in ("agreement_ceiling", "agreement"):
        values = [v for v in column(rows, pairs, name) or [] if isinstance(v, int | float)]
        if values:
            return float(np.mean(values))
    return None


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
    from alignforge.recipes.dpo import place_policy

    acc = make_accelerator(cfg.seed, cfg.mixed_precision)
    if acc.is_main_process:
        prepare_output_dir(cfg)
    acc.wait_for_everyone()
    tokenizer = set_chat_template(
        load_tokenizer(cfg.model_name_or_path, cfg.cache_dir), cfg.template
    )
    train, train_stats, evals, eval_stats, eval_rows = load_pairs(cfg, tokenizer)
    gamma = fit_length_coef(log_length_ratio(train)) if cfg.length_control else 0.0
    collate = PairCollator(tokenizer.pad_token_id, gamma)
    lm = place_policy(acc, build_trainable_model(cfg))
    freeze_unused_lm_head(lm)
    warn_if_memory_short(lm.config, cfg, sequences_per_batch=2 * cfg.per_device_train_batch_size)
    base_logps, features = base_features(
        lm, evals, tokenizer.pad_token_id, cfg.per_device_eval_batch_size
    )
    head = ScalarHead(lm.config.hidden_size)
    model = RewardModel(lm, head, tokenizer, cfg.max_length, cfg.max_prompt_length)
    n_train, n_total = trainable_params(model)
    objective = BradleyTerryObjective(cfg.center_rewards_coef, cfg.use_margin)
    loop = TrainLoop(
        model, objective, train, collate, cfg, eval_units=evals, accelerator=acc,
        callbacks=callbacks,
    )  # fmt: skip
    with Timer() as t:
        result = loop.fit()
    trained = acc.unwrap_model(loop.model)
    scores = recorded_scores(objective.eval_scores, evals, acc)  # from the loop's final evaluation
    ceiling = _ceiling(cfg, eval_rows, evals)
    report, baselines = honest_report(
        scores, evals, eval_rows, base_logps, features, ceiling, cfg.bootstrap_samples, cfg.seed
    )
    final = loop.out / "final"
    summary = {
        "stage": "rm",
        "model": cfg.model_name_or_path,
        "finetuning_type": cfg.finetuning_type,
        "trainable_params": n_train,
        "total_params": n_total,
        "final_model": str(final),
        "train_pairs": len(train),
        "data": train_stats.as_dict(),
        "eval_data": eval_stats.as_dict(),
        "length_coef": gamma,
        "eval": report,
        "baselines": baselines,
        "score_mean": float(scores.mean()),
        "score_std": float(scores.std()),
        **result,
        "seconds": t.seconds,
        "peak_memory_mb": peak_memory_mb(),
    }
    if acc.is_main_process:
        meta = {
            "base": portable_name(cfg.model_name_or_path),
            "finetuning_type": cfg.finetuning_type,
        }
        trained.save(final, tokenizer, meta=meta)
        flat = [float(x) for x in np.concatenate([scores[:, 0], scores[:, 1]])]
        for where in (loop.out, final):  # the PPO drift monitor reads it next to the model
            (where / "reward_scores_eval.json").write_text(json.dumps(flat))
        plot_scores(scores[:, 0], scores[:, 1], loop.out / "reward_scores_eval.png")
        plot_loss_curve(
            loop.logger.rows(), loop.out / "loss_curve.png", title=f"RM {cfg.model_name_or_path}"
        )
        write_summary(loop.out, summary)
        print_summary(summary)
    loop.logger.close()
    return summary


def print_summary(s: dict) -> None:
    e, d = s["eval"], s["data"]
    lines = [
        f"RM finished in {s['seconds']:.0f}s: {s['steps']}/{s['total_steps']} steps on "
        f"{s['train_pairs']} pairs"
        + (" (stopped early)" if s["stopped_early"] else "")
        + (f", length term gamma {s['length_coef']:.3f}" if s["length_coef"] else "")
        + best_note(s.get("best_metric")),
        f"  pairs: {d['truncated']} of {d['used']} truncated ({d['prompt_truncated']} prompts, "
        f"{d['answer_truncated']} answers), {d['dropped_too_long']} dropped too long, "
        f"{d['dropped_identical']} identical once cut, {d['bad_rows']} bad rows skipped",
        *pref.report_lines(e, s["baselines"]),
        *selection_note(s),
        f"  eval scores: mean {s['score_mean']:.3f}, std {s['score_std']:.3f} (reward_scores_eval.json)",
        f"  model: {s['final_model']}",
    ]
    if e["agreement_ceiling"]:
        lines.insert(-2, f"  annotator agreement ceiling {100 * e['agreement_ceiling']:.1f}%")
    print("\n".join(lines))
