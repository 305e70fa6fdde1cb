"""Direct preference optimisation (``stage: dpo``): DPO, IPO, SLiC-hinge, rDPO, cDPO.

    alignforge train examples/dpo.yaml
    alignforge train examples/dpo.yaml loss_type=ipo beta=0.5 precompute_ref_logps=true

Recipe, top to bottom: check the run dir, read and tokenize the pairs (bad rows fail with their
index or are skipped and counted; over-long pairs are truncated or dropped, counted), build the
policy and its reference, optionally pre-compute the reference log-probs once (cached on disk),
train on the shared loop (the loss averages over pairs), save the model, metrics, curves and a
summary.

Reference policy: with LoRA the same weights with the adapter switched off (no second copy);
with full fine-tuning a frozen copy made before training. A model given as a LoRA adapter
directory (e.g. an SFT run's ``final/``) is merged into its base first and a fresh adapter is
trained on top, so the reference is the SFT model and not the base under it.

One forward of the policy per micro-batch scores every chosen and rejected response: the pairs
are packed into rows with a block-diagonal mask (``padding_free``), optionally with the prompt
encoded once per pair (``share_prompt``). Only positions that predict a response token go
through the LM head.

Deviation from the DPO paper: none in the loss; IPO uses length-averaged log-probs (as TRL).
"""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import torch

from alignforge.config.preference import DPOConfig
from alignforge.data.preference import PreferencePair, collate_pairs, pairs_hash, prepare_pairs
from alignforge.losses.preference import dpo_loss
from alignforge.models import (
    cache_dir,
    disabled_adapter,
    fingerprint,
    load_model,
    load_tokenizer,
    resolve_model_path,
    wrap_lora,
)
from alignforge.models.scoring import target_token_logps
from alignforge.recipes.common import (
    Timer,
    load_prepared,
    peak_memory_mb,
    save_final,
    trainable_params,
    write_summary,
)
from alignforge.training import TrainLoop, make_accelerator
from alignforge.training.plots import plot_loss_curve, save_figure
from alignforge.training.rundir import prepare_output_dir

CONFIG = DPOConfig

STATS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)


# ---------------------------------------------------------------- log-probs of a batch of pairs


def pair_logps(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of every response in ``batch`` (from :func:`collate_pairs`) in one forward.

    Returns ``(logps (2P,), n_tokens (2P,))``; entry ``i`` is pair i's chosen response, ``P + i``
    its rejected one. Token ``tgt_id`` is scored with the logits at ``tgt_pred``, the position
    before it (the causal shift), so logits are never compared with their own input token.

    Only the positions that predict a response token go through the LM head
    (:func:`alignforge.models.scoring.target_token_logps`), so no ``(B, T, V)`` logits tensor is
    ever held.
    """
    kwargs = {k: batch[k] for k in ("attention_mask", "position_ids") if k in batch}
    token_logps = target_token_logps(
        model, batch["input_ids"], batch["tgt_row"], batch["tgt_pred"], batch["tgt_id"], **kwargs
    )
    n_seq = 2 * batch["n_pairs"]
    logps = torch.zeros(n_seq, dtype=token_logps.dtype, device=token_logps.device)
    logps = logps.index_add(0, batch["tgt_seq"], token_logps)
    return logps, batch["resp_len"].to(logps.device)


class PreferenceObjective:
    """Summed DPO-family loss of a micro-batch; ``count`` is its number of pairs.

    ``ref_model`` is the frozen reference (full fine-tuning); None means the policy with its
    adapter disabled. Batches that carry ``ref_logps`` (pre-computed) skip the reference pass.
    """

    def __init__(
        self, beta, loss_type="sigmoid", label_smoothing=0.0, use_margin=True, ref_model=None
    ):
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.use_margin, self.ref_model = use_margin, ref_model
        self.average = loss_type == "ipo"  # IPO on length-averaged log-probs, as TRL

    def count(self, batch: dict) -> float:
        return float(batch["n_pairs"])

    def tokens(self, batch: dict) -> int:
        return int(batch["tokens"]) if "tokens" in batch else int((batch["input_ids"] >= 0).sum())

    @torch.no_grad()
    def reference(self, model, batch: dict) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"].to(batch["input_ids"].device)
        if self.ref_model is not None:
            return pair_logps(self.ref_model, batch)[0]
        inner = getattr(model, "module", model)  # DDP wrapper: the adapter switch lives inside
        was_training = inner.training
        inner.eval()  # the reference sees no dropout
        with disabled_adapter(inner):
            ref = pair_logps(inner, batch)[0]
        inner.train(was_training)
        return ref

    def loss(self, logps: torch.Tensor, ref: torch.Tensor, batch: dict):
        """The pair loss from ``(2P,)`` policy and reference log-probs (chosen first)."""
        P = batch["n_pairs"]
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
        ref = self.reference(model, batch)
        if self.average:
            logps, ref = logps / n_tok.clamp_min(1), ref / n_tok.clamp_min(1)
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
        return out.losses.sum(), dict(zip(STATS, values, strict=True))


def make_collate(pad_id: int, cfg):
    """Batches of pairs in the layout ``cfg`` (DPO or SPIN config) asks for, with a token count."""
    share_prompt = cfg.share_prompt
    layout = "shared" if share_prompt else ("packed" if cfg.padding_free else "padded")
    pack_length = cfg.pack_length or 2 * cfg.max_length

    def collate(pairs: list[PreferencePair]) -> dict:
        batch = collate_pairs(pairs, pad_id, layout=layout, pack_length=pack_length)
        n_prompt = sum(len(p.prompt_ids) for p in pairs) * (1 if share_prompt else 2)
        batch["tokens"] = n_prompt + sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
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
):
    """``(policy, frozen_reference or None)``. LoRA: the reference is the adapter-off policy.

    An adapter directory is merged into its base first, so the reference is the adapted model.
    """
    quant = finetuning_type == "qlora"
    model = load_model(name, dtype=dtype, quantize_4bit=quant, cache=cache)
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
        ref = copy.deepcopy(model).eval().requires_grad_(False)
        return model, ref
    if gradient_checkpointing:
        model.enable_input_require_grads()
    policy = wrap_lora(
        model, lora_rank, lora_alpha, lora_dropout, lora_target, quantized=quant,
        gradient_checkpointing=gradient_checkpointing,
    )  # fmt: skip
    return policy, None


def model_identity(name: str, cache: str | None = None) -> str:
    """Fingerprint of the reference weights (the adapter's too when one is merged in)."""
    from alignforge.models import is_adapter_dir
    from alignforge.models.loading import adapter_base

    path = resolve_model_path(name, cache)
    ident = fingerprint(path)
    if is_adapter_dir(path):
        ident += fingerprint(resolve_model_path(adapter_base(path), cache))
    return ident


# ---------------------------------------------------------------- reference log-probs, cached


@torch.no_grad()
def compute_ref_logps(
    model, ref_model, pairs: list[PreferencePair], collate, batch_size: int, device
) -> torch.Tensor:
    """Reference log-probs ``(N, 2)`` (chosen, rejected) of every pair, in eval mode."""
    from tqdm.auto import tqdm

    scorer = PreferenceObjective(beta=1.0, ref_model=ref_model)
    out = []
    for j in tqdm(range(0, len(pairs), batch_size), desc="reference log-probs", leave=False):
        chunk = [
            PreferencePair(p.prompt_ids, p.chosen_ids, p.rejected_ids)
            for p in pairs[j : j + batch_size]
        ]
        batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collate(chunk).items()}
        ref = scorer.reference(model, batch).float().cpu()
        P = len(chunk)
        out.append(torch.stack([ref[:P], ref[P:]], dim=1))
    return torch.cat(out)


def ref_cache_path(root: str | Path, model_id: str, pairs, max_length: int, template: str) -> Path:
    key = hashlib.sha256(
        "|".join([model_id, pairs_hash(pairs), str(max_length), template or ""]).encode()
    ).hexdigest()[:24]
    return Path(root) / "ref_logps" / f"{key}.pt"


def attach_ref_logps(pairs, cache_file: Path, compute) -> str:
    """Set ``pair.ref`` from ``cache_file`` or from ``compute()`` (then cache it).

    Returns ``"cache"`` or ``"computed"``. The cache stores the pair keys next to the values and
    is refused if they do not match.
    """
    keys = [p.key() for p in pairs]
    source = "cache"
    blob = torch.load(cache_file, weights_only=True) if cache_file.exists() else None
    if blob is None or blob.get("keys") != keys:
        values = compute()
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(".tmp")
        torch.save({"keys": keys, "values": values}, tmp)
        tmp.replace(cache_file)
        blob, source = {"values": values}, "computed"
    for p, (c, r) in zip(pairs, blob["values"].tolist(), strict=True):
        p.ref = (c, r)
    return source


# ---------------------------------------------------------------- the recipe


def load_pairs(cfg, tokenizer):
    train, train_stats, evals, eval_stats = load_prepared(cfg, tokenizer, prepare_pairs)
    if cfg.loss_type == "ipo" and cfg.use_margin and any(p.margin is not None for p in train):
        raise ValueError("use_margin: loss_type=ipo has no margin; set use_margin=false")
    return train, train_stats, evals, eval_stats


def run(cfg: DPOConfig, callbacks=()) -> dict:
    acc = make_accelerator(cfg.seed, cfg.mixed_precision)
    if acc.is_main_process:
        prepare_output_dir(cfg)
    acc.wait_for_everyone()
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.cache_dir)
    train, train_stats, evals, eval_stats = load_pairs(cfg, tokenizer)
    collate = make_collate(tokenizer.pad_token_id, cfg)
    model, ref_model = build_policy(
        cfg.model_name_or_path, cfg.finetuning_type, cfg.dtype, cfg.lora_rank, cfg.lora_alpha,
        cfg.lora_dropout, cfg.lora_target, cfg.gradient_checkpointing, cfg.cache_dir,
    )  # fmt: skip
    ref_source = None
    if cfg.precompute_ref_logps:
        ref_source = {}
        ident = model_identity(cfg.model_name_or_path, cfg.cache_dir)
        for name, pairs in (("train", train), ("eval", evals)):
            if not pairs:
                continue
            path = ref_cache_path(
                cache_dir(cfg.cache_dir), ident, pairs, cfg.max_length, tokenizer.chat_template
            )
            ref_source[name] = attach_ref_logps(
                pairs,
                path,
                lambda p=pairs: compute_ref_logps(
                    model, ref_model, p, collate, cfg.per_device_eval_batch_size, acc.device
                ),
            )
        ref_model = None  # every batch carries its reference log-probs: free the copy
    objective = PreferenceObjective(
        cfg.beta, cfg.loss_type, cfg.label_smoothing, cfg.use_margin, ref_model
    )
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
    )
    with Timer() as t:
        result = loop.fit()
    final = save_final(loop.model, tokenizer, loop.out, acc)
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


def last_train_stats(rows: list[dict]) -> dict:
    train = [r for r in rows if r.get("split") == "train"]
    return {k: train[-1][k] for k in ("loss", *STATS) if train and k in train[-1]}


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
        f"  pairs: {d['used']} used of {d['rows']} rows; {d['truncated']} truncated, {d['dropped_too_long']} dropped "
        f"too long, {d['dropped_identical']} identical once truncated, {d['bad_rows']} bad rows skipped",
        f"  layout: {s['layout']}; {s['pairs_per_s']:.2f} pairs/s, {s['tokens_per_s']:.0f} tokens/s",
    ]
    if s.get("ref_logps"):
        lines.append(f"  reference log-probs: {s['ref_logps']}")
    ev = s.get("final_eval")
    if ev:
        lines.append(
            f"  eval: loss {ev['loss']:.4f}, accuracy {ev['rewards/accuracies']:.3f}, margin {ev['rewards/margins']:.3f}"
        )
    lines.append(f"  model: {s['final_model']}")
    print("\n".join(lines))
