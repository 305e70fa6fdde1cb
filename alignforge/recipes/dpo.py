"""Direct preference optimisation (``stage: dpo``): DPO, IPO, SLiC-hinge, rDPO, cDPO, SimPO,
ORPO and KTO.

    alignforge train examples/dpo.yaml
    alignforge train examples/dpo.yaml loss_type=ipo beta=0.5 precompute_ref_logps=true
    alignforge train examples/dpo.yaml loss_type=simpo beta=2.0 simpo_gamma=1.0

Recipe, top to bottom: check the run dir, read and tokenize the pairs (bad rows fail with their
index or are skipped and counted; over-long pairs are truncated or dropped, counted), build the
policy and its reference, optionally pre-compute the reference log-probs once (cached on disk),
train on the shared loop (the loss averages over pairs), save the model, metrics, curves and a
summary.

Reference policy: with LoRA the same weights with the adapter switched off (no second copy);
with full fine-tuning a frozen copy made before training. A model given as a LoRA adapter
directory (e.g. an SFT run's ``final/``) is merged into its base first and a fresh adapter is
trained on top, so the reference is the SFT model and not the base under it. SimPO and ORPO
have no reference: none is copied and no reference pass runs.

KTO trains on answers labelled desirable or undesirable (``prompt``/``completion``/``label``
rows, or pairs: chosen desirable, rejected undesirable; :mod:`alignforge.data.kto`). Each unit
is one answer; the batch's second sequence per unit is another prompt's answer, scored only for
the KL reference point ``z0``.

One forward of the policy per micro-batch scores every chosen and rejected response: the pairs
are packed into rows with a block-diagonal mask (``padding_free``), optionally with the prompt
encoded once per pair (``share_prompt``). Only positions that predict a response token go
through the LM head.

Deviations from the papers: listed in ``docs/papers.md``. IPO, SimPO and ORPO use
length-averaged log-probs (as TRL); the KL point of KTO comes from mismatched answers fixed when
the data is read, averaged per micro-batch.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import torch

from alignforge.config.preference import DPOConfig
from alignforge.data.kto import KTOExample, prepare_kto
from alignforge.data.preference import PreferencePair, collate_pairs, prepare_pairs
from alignforge.data.templating import set_chat_template
from alignforge.losses.kto import kto_kl, kto_loss
from alignforge.losses.preference import dpo_loss
from alignforge.losses.reference_free import orpo_loss, simpo_loss
from alignforge.models import cache_dir, load_model, load_tokenizer, wrap_lora
from alignforge.recipes.common import (
    Timer,
    best_note,
    load_prepared,
    peak_memory_mb,
    save_final,
    selection_note,
    trainable_params,
    write_summary,
)
from alignforge.recipes.memory import warn_if_memory_short
from alignforge.recipes.ref_logps import (
    attach_ref_logps,
    compute_ref_logps,
    model_identity,
    pair_logps,
    precision_tag,
    ref_cache_path,
    reference_logps,
)
from alignforge.training import TrainLoop, place_frozen
from alignforge.training.plots import plot_loss_curve, save_figure
from alignforge.training.rundir import open_run

CONFIG = DPOConfig
REFERENCE_FREE = ("simpo", "orpo")
LENGTH_AVERAGED = ("ipo", "simpo", "orpo")  # as TRL

STATS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
KTO_STATS = ("kl", "rewards/accuracies", "rewards/margins")


class PreferenceObjective:
    """Summed pair loss of a micro-batch (DPO family, SimPO, ORPO); ``count`` is its pairs.

    ``ref_model`` is the frozen reference (full fine-tuning); None means the policy with its
    adapter disabled. Batches that carry ``ref_logps`` (pre-computed) skip the reference pass;
    SimPO and ORPO run none. In eval mode it records, by row index, each pair's scores (chosen,
    rejected: implicit rewards, or the mean log-prob per token without a reference) and the
    reference's mean log-prob per token of each answer (NaN without one) in ``eval_records``:
    the held-out report is built from the loop's final evaluation, without scoring again.
    """

    def __init__(
        self, beta, loss_type="sigmoid", label_smoothing=0.0, use_margin=True, ref_model=None,
        simpo_gamma=0.5, cpo_alpha=0.0,
    ):  # fmt: skip
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.use_margin, self.ref_model = use_margin, ref_model
        self.simpo_gamma, self.cpo_alpha = simpo_gamma, cpo_alpha
        self.reference_free = loss_type in REFERENCE_FREE
        self.average = loss_type in LENGTH_AVERAGED
        self.eval_records: dict[int, tuple[float, float, float, float]] = {}

    def count(self, batch: dict) -> float:
        return float(batch["n_pairs"])

    def tokens(self, batch: dict) -> int:
        return int(batch["tokens"]) if "tokens" in batch else int((batch["input_ids"] >= 0).sum())

    def reference(self, model, batch: dict) -> torch.Tensor:
        return reference_logps(model, self.ref_model, batch)

    def loss(self, logps: torch.Tensor, ref: torch.Tensor | None, batch: dict):
        """The pair loss from ``(2P,)`` policy and reference log-probs (chosen first)."""
        P = batch["n_pairs"]
        if self.loss_type == "simpo":
            return simpo_loss(logps[:P], logps[P:], self.beta, self.simpo_gamma, self.cpo_alpha)
        if self.loss_type == "orpo":
            return orpo_loss(logps[:P], logps[P:], self.beta)
        margin = batch.get("margin") if self.use_margin else None
        return dpo_loss(
            logps[:P],
            logps[P:],
            ref[:P],
            ref[P:],
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            margin=None if margin is None else margin.to(logps.device),
        )

    def __call__(self, model, batch: dict):
        logps, n_tok = pair_logps(model, batch)
        n_tok = n_tok.clamp_min(1)
        ref = None if self.reference_free else self.reference(model, batch)
        if not model.training and "index" in batch:
            if ref is None:  # no reference: the score is the mean log-prob per token
                self.record(batch["index"], logps / n_tok, torch.full_like(logps, float("nan")))
            else:
                self.record(batch["index"], logps - ref, ref / n_tok)
        if self.average:
            logps, ref = logps / n_tok, None if ref is None else ref / n_tok
        out = self.loss(logps, ref, batch)
        P = batch["n_pairs"]
        values = (
            out.chosen_rewards.sum(),
            out.rejected_rewards.sum(),
            out.accuracies.sum(),
            out.margins.sum(),
            logps[:P].detach().sum(),
            logps[P:].detach().sum(),
        )
        stats = dict(zip(STATS, values, strict=True))
        if self.reference_free:
            stats["nll_loss"] = out.nll.sum()
        return out.losses.sum(), stats

    def record(self, index: torch.Tensor, rewards: torch.Tensor, ref_mean: torch.Tensor) -> None:
        P = index.shape[0]
        rows = torch.stack([rewards[:P], rewards[P:], ref_mean[:P], ref_mean[P:]], 1)
        for i, row in zip(index.tolist(), rows.float().tolist(), strict=True):
            self.eval_records[i] = tuple(row)


class KTOObjective(PreferenceObjective):
    """Summed KTO loss of a micro-batch of :class:`KTOExample`; ``count`` is its answers.

    Sequence ``i`` is answer i, sequence ``P + i`` another prompt's answer after prompt i: their
    policy and reference log-probs give ``z0`` (:func:`kto_kl`), one estimate per micro-batch.
    Statistics: ``kl`` (``z0``), ``rewards/accuracies`` (share of answers on the side of ``z0``
    their label asks for) and ``rewards/margins`` (mean ``beta * (r - z0)``, sign flipped for
    undesirable answers: what the loss pushes up).
    """

    def __init__(self, beta, desirable_weight=1.0, undesirable_weight=1.0, ref_model=None):
        super().__init__(beta, "kto", ref_model=ref_model)
        self.weights = (desirable_weight, undesirable_weight)

    def __call__(self, model, batch: dict):
        logps, _ = pair_logps(model, batch)
        ref = self.reference(model, batch)
        P = batch["n_pairs"]
        kl = kto_kl(logps[P:], ref[P:])
        labels = batch["label"].to(logps.device)
        out = kto_loss(logps[:P], ref[:P], labels, kl, self.beta, *self.weights)
        values = (kl * P, (out.margins > 0).sum(), out.margins.sum())
        return out.losses.sum(), dict(zip(KTO_STATS, values, strict=True))


def make_collate(pad_id: int, cfg):
    """Batches of pairs in the layout ``cfg`` (DPO or SPIN config) asks for, with a token count
    (and KTO's ``label`` for :class:`KTOExample`)."""
    share_prompt = cfg.share_prompt
    layout = "shared" if share_prompt else ("packed" if cfg.padding_free else "padded")
    pack_length = cfg.pack_length or 2 * cfg.max_length

    def collate(pairs: list[PreferencePair]) -> dict:
        batch = collate_pairs(pairs, pad_id, layout=layout, pack_length=pack_length)
        n_prompt = sum(len(p.prompt_ids) for p in pairs) * (1 if share_prompt else 2)
        batch["tokens"] = n_prompt + sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        batch["index"] = torch.tensor([p.index for p in pairs])
        if isinstance(pairs[0], KTOExample):
            batch["label"] = torch.tensor([p.label for p in pairs], dtype=torch.bool)
        return batch

    return collate


# ---------------------------------------------------------------- models


def build_policy(
    name: str,
    finetuning_type: str,
    dtype: str = "float32",
    lora_rank: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.05,
    lora_target="all",
    gradient_checkpointing: bool = False,
    cache: str | None = None,
    attn_implementation: str = "sdpa",
    reference: bool = True,
):
    """``(policy, frozen_reference or None)``. LoRA: the reference is the adapter-off policy.

    An adapter directory is merged into its base first, so the reference is the adapted model.
    ``reference=False`` (SimPO, ORPO): full fine-tuning makes no frozen copy.
    """
    quant = finetuning_type == "qlora"
    model = load_model(
        name, dtype=dtype, quantize_4bit=quant, cache=cache, attn_implementation=attn_implementation
    )
    if hasattr(model, "peft_config"):
        if quant:
            raise ValueError(
                "model_name_or_path: an adapter cannot be merged into a 4-bit base; merge it first"
            )
        model = model.merge_and_unload()
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if finetuning_type == "full":
        ref = copy.deepcopy(model).eval().requires_grad_(False) if reference else None
        return model, ref
    if gradient_checkpointing:
        model.enable_input_require_grads()
    policy = wrap_lora(
        model, lora_rank, lora_alpha, lora_dropout, lora_target, quantized=quant,
        gradient_checkpointing=gradient_checkpointing,
    )  # fmt: skip
    return policy, None


# ---------------------------------------------------------------- the recipe


def load_pairs(cfg, tokenizer):
    """Train and held-out pairs with their stats; for KTO, labelled answers (:func:`prepare_kto`)."""
    reader = prepare_kto if cfg.loss_type == "kto" else prepare_pairs
    prepare = functools.partial(reader, max_prompt_length=cfg.max_prompt_length)
    train, train_stats, evals, eval_stats = load_prepared(cfg, tokenizer, prepare)
    no_margin = cfg.loss_type in ("ipo", "kto", *REFERENCE_FREE)
    if no_margin and cfg.use_margin and any(p.margin is not None for p in train):
        raise ValueError(
            f"use_margin: loss_type={cfg.loss_type} has no margin; set use_margin=false"
        )
    return train, train_stats, evals, eval_stats


def place_policy(acc, model):
    """The trained model on ``acc.device`` before anything runs it outside the loop (reference
    pre-computation, generation). A 4-bit model stays where its loader put it."""
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        return model
    return model.to(acc.device)


def precompute_reference(cfg, acc, tokenizer, model, ref_model, collate, splits) -> dict:
    """Attach cached or freshly computed reference log-probs to the pairs of every split.

    ``model`` (LoRA: its adapter-off self is the reference) and ``ref_model`` (full fine-tuning)
    must be on ``acc.device``. Returns ``{split: "cache" | "computed"}``.
    """
    ident = model_identity(cfg.model_name_or_path, cfg.cache_dir)
    precision = precision_tag(cfg.dtype, cfg.finetuning_type, acc.mixed_precision)
    source = {}
    for name, pairs in splits.items():
        if not pairs:
            continue
        path = ref_cache_path(
            cache_dir(cfg.cache_dir), ident, pairs, cfg.max_length, tokenizer.chat_template,
            precision,
        )  # fmt: skip
        source[name] = attach_ref_logps(
            pairs,
            path,
            lambda p=pairs: compute_ref_logps(
                model, ref_model, p, collate, cfg.per_device_eval_batch_size, acc.device, acc
            ),
            acc,
        )
    return source


def run(cfg: DPOConfig, callbacks=()) -> dict:
    acc = open_run(cfg)
    tokenizer = set_chat_template(
        load_tokenizer(cfg.model_name_or_path, cfg.cache_dir), cfg.template
    )
    train, train_stats, evals, eval_stats = load_pairs(cfg, tokenizer)
    collate = make_collate(tokenizer.pad_token_id, cfg)
    model, ref_model = build_policy(
        cfg.model_name_or_path, cfg.finetuning_type, cfg.dtype, cfg.lora_rank, cfg.lora_alpha,
        cfg.lora_dropout, cfg.lora_target, cfg.gradient_checkpointing, cfg.cache_dir,
        cfg.attn_implementation, reference=cfg.loss_type not in REFERENCE_FREE,
    )  # fmt: skip
    warn_if_memory_short(model.config, cfg, sequences_per_batch=2 * cfg.per_device_train_batch_size)
    ref_model = place_frozen(acc, ref_model)
    ref_source = None
    if cfg.precompute_ref_logps:
        model = place_policy(acc, model)
        splits = {"train": train, "eval": evals}
        ref_source = precompute_reference(cfg, acc, tokenizer, model, ref_model, collate, splits)
        ref_model = None  # every batch carries its reference log-probs: free the copy
    if cfg.loss_type == "kto":
        objective = KTOObjective(cfg.beta, cfg.desirable_weight, cfg.undesirable_weight, ref_model)
    else:
        objective = PreferenceObjective(
            cfg.beta, cfg.loss_type, cfg.label_smoothing, cfg.use_margin, ref_model,
            cfg.simpo_gamma, cfg.cpo_alpha,
        )  # fmt: skip
    n_train, n_total = trainable_params(model)
    loop = TrainLoop(
        model,
        objective,
        train,
        collate,
        cfg,
        eval_units=evals,
        accelerator=acc,
        callbacks=callbacks,
        frozen=(ref_model,),
    )
    with Timer() as t:
        result = loop.fit()
    final = save_final(loop.model, tokenizer, loop.out, acc)
    pairwise = evals and cfg.loss_type != "kto"  # KTO's held-out units are single answers
    heldout = heldout_report(objective, evals, acc) if pairwise else (None, None)
    summary = {
        "stage": "dpo",
        "model": cfg.model_name_or_path,
        "finetuning_type": cfg.finetuning_type,
        "loss_type": cfg.loss_type,
        "beta": cfg.beta,
        "trainable_params": n_train,
        "total_params": n_total,
        "final_model": str(final),
        "data": train_stats.as_dict(),
        "eval_data": eval_stats.as_dict() if eval_stats else None,
        "layout": "shared" if cfg.share_prompt else ("packed" if cfg.padding_free else "padded"),
        "ref_logps": ref_source,
        "last_train": last_train_stats(loop.logger.rows()),
        "eval": heldout[0],
        "baselines": heldout[1],
        **result,
        "seconds": t.seconds,
        "pairs_per_s": result["steps"] * loop.global_batch / max(result["train_seconds"], 1e-9),
        "tokens_per_s": result["tokens_trained"] / max(result["train_seconds"], 1e-9),
        "peak_memory_mb": peak_memory_mb(),
    }
    if acc.is_main_process:
        rows = loop.logger.rows()
        plot_loss_curve(
            rows,
            loop.out / "loss_curve.png",
            title=f"DPO ({cfg.loss_type}) {cfg.model_name_or_path}",
        )
        plot_rewards(rows, loop.out / "rewards.png")
        write_summary(loop.out, summary)
        print_summary(summary)
    loop.logger.close()
    return summary


def heldout_report(objective: PreferenceObjective, evals, acc) -> tuple[dict, dict]:
    """The held-out implicit-reward accuracy beside a coin flip, the longer answer and the
    reference's mean log-prob per token (:mod:`alignforge.evaluate.preference`), from what the
    loop's final evaluation recorded. Without a reference (SimPO, ORPO) the score is the mean
    log-prob per token, and there is no base-model baseline."""
    from alignforge.evaluate.preference import heldout_report as report
    from alignforge.recipes.reward import recorded_scores

    rec = recorded_scores(objective.eval_records, evals, acc)  # (N, 4)
    base = None if objective.reference_free else rec[:, 2:]
    return report(rec[:, :2], base, evals)


def last_train_stats(rows: list[dict]) -> dict:
    train = [r for r in rows if r.get("split") == "train"]
    keys = ("loss", *STATS, *KTO_STATS, "nll_loss")
    return {k: train[-1][k] for k in keys if train and k in train[-1]}


def plot_rewards(rows: list[dict], path: Path) -> Path | None:
    """Chosen/rejected rewards and accuracy over training steps (eval points as markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in rows if r.get("split") == "train" and "rewards/chosen" in r]
    if not train:
        return None
    steps = [r["step"] for r in train]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        a.plot(steps, [r[key] for r in train], label=key.split("/")[1], lw=1)
    b.plot(steps, [r["rewards/accuracies"] for r in train], label="train", lw=1)
    evals = [r for r in rows if r.get("split") == "eval" and "rewards/accuracies" in r]
    if evals:
        b.plot(
            [r["step"] for r in evals], [r["rewards/accuracies"] for r in evals], "o-", label="eval"
        )
    a.set_title("implicit rewards")
    b.set_title("reward accuracy")
    return save_figure(fig, (a, b), "step", path)


def print_summary(s: dict) -> None:
    d = s["data"]
    lines = [
        f"DPO ({s['loss_type']}, beta={s['beta']}) finished in {s['seconds']:.0f}s: {s['steps']}/{s['total_steps']} steps"
        + (" (stopped early)" if s["stopped_early"] else ""),
        f"  {'answers' if 'desirable' in d else 'pairs'}: {d['used']} used of {d['rows']} rows; "
        f"{d['truncated']} truncated ({d['prompt_truncated']} "
        f"prompts, {d['answer_truncated']} answers), {d['dropped_too_long']} dropped too long, "
        f"{d['dropped_identical']} identical once truncated, {d['bad_rows']} bad rows skipped",
        f"  layout: {s['layout']}; {s['pairs_per_s']:.2f} pairs/s, {s['tokens_per_s']:.0f} tokens/s",
    ]
    if "desirable" in d:
        lines.append(f"  KTO answers: {d['desirable']} desirable, {d['undesirable']} undesirable")
    if s.get("ref_logps"):
        lines.append(f"  reference log-probs: {s['ref_logps']}")
    ev = s.get("final_eval")
    if ev:
        lines.append(
            f"  eval: loss {ev['loss']:.4f}, accuracy {ev['rewards/accuracies']:.3f}, margin "
            f"{ev['rewards/margins']:.3f}{best_note(s.get('best_metric'))}"
        )
    if s.get("eval"):
        from alignforge.evaluate.preference import report_lines

        lines += report_lines(s["eval"], s["baselines"]) + selection_note(s)
    lines.append(f"  model: {s['final_model']}")
    print("\n".join(lines))
