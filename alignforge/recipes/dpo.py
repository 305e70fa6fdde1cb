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

import contextlib
import copy
import functools
import hashlib
import os
import tempfile
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
from alignforge.training import TrainLoop, place_frozen, to_device
from alignforge.training.plots import plot_loss_curve, save_figure
from alignforge.training.rundir import open_run

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
    In eval mode it records, by row index, each pair's implicit rewards (chosen, rejected) and
    the reference's mean log-prob per token of each answer in ``eval_records``: the held-out
    report is built from the loop's final evaluation, without scoring the pairs again.
    """

    def __init__(
        self, beta, loss_type="sigmoid", label_smoothing=0.0, use_margin=True, ref_model=None
    ):
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.use_margin, self.ref_model = use_margin, ref_model
        self.average = loss_type == "ipo"  # IPO on length-averaged log-probs, as TRL
        self.eval_records: dict[int, tuple[float, float, float, float]] = {}

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
        if not model.training and "index" in batch:
            self.record(batch["index"], logps - ref, ref / n_tok.clamp_min(1))
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

    def record(self, index: torch.Tensor, rewards: torch.Tensor, ref_mean: torch.Tensor) -> None:
        P = index.shape[0]
        rows = torch.stack([rewards[:P], rewards[P:], ref_mean[:P], ref_mean[P:]], 1)
        for i, row in zip(index.tolist(), rows.float().tolist(), strict=True):
            self.eval_records[i] = tuple(row)


def make_collate(pad_id: int, cfg):
    """Batches of pairs in the layout ``cfg`` (DPO or SPIN config) asks for, with a token count."""
    share_prompt = cfg.share_prompt
    layout = "shared" if share_prompt else ("packed" if cfg.padding_free else "padded")
    pack_length = cfg.pack_length or 2 * cfg.max_length

    def collate(pairs: list[PreferencePair]) -> dict:
        batch = collate_pairs(pairs, pad_id, layout=layout, pack_length=pack_length)
        n_prompt = sum(len(p.prompt_ids) for p in pairs) * (1 if share_prompt else 2)
        batch["tokens"] = n_prompt + sum(len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)
        batch["index"] = torch.tensor([p.index for p in pairs])
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
):
    """``(policy, frozen_reference or None)``. LoRA: the reference is the adapter-off policy.

    An adapter directory is merged into its base first, so the reference is the adapted model.
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
    model, ref_model, pairs: list[PreferencePair], collate, batch_size: int, device, acc=None
) -> torch.Tensor:
    """Reference log-probs ``(N, 2)`` (chosen, rejected) of every pair, in eval mode.

    With ``acc`` (several processes) batch ``j`` is scored by rank ``j % world`` under the run's
    autocast, and one all-reduce sum fills in the other ranks' rows (exact: they are 0 here), so
    every rank returns the same full tensor, built from the same batches as one process would.
    """
    from tqdm.auto import tqdm

    rank, world = (acc.process_index, acc.num_processes) if acc is not None else (0, 1)
    device = acc.device if acc is not None else device
    scorer = PreferenceObjective(beta=1.0, ref_model=ref_model)
    out = torch.zeros(len(pairs), 2)
    starts = list(range(0, len(pairs), batch_size))[rank::world]
    for j in tqdm(starts, desc="reference log-probs", leave=False, disable=rank != 0):
        chunk = [
            PreferencePair(p.prompt_ids, p.chosen_ids, p.rejected_ids)
            for p in pairs[j : j + batch_size]
        ]
        with acc.autocast() if acc is not None else contextlib.nullcontext():
            ref = scorer.reference(model, to_device(collate(chunk), device)).float().cpu()
        P = len(chunk)
        out[j : j + P] = torch.stack([ref[:P], ref[P:]], dim=1)
    if world > 1:
        out = acc.reduce(out.to(acc.device), reduction="sum").cpu()
    return out


def precision_tag(dtype: str, finetuning_type: str, mixed_precision: str | None) -> str:
    """What besides the weights sets the reference's numbers: weight dtype, 4-bit quantisation
    (QLoRA), autocast. A bf16 or QLoRA run never reuses an fp32 run's cache."""
    weights = "nf4" if finetuning_type == "qlora" else "dense"
    return f"dtype={dtype};weights={weights};autocast={mixed_precision or 'no'}"


def ref_cache_path(
    root: str | Path, model_id: str, pairs, max_length: int, template: str, precision: str
) -> Path:
    """``root/ref_logps/<key>.pt``, keyed by everything that changes the values: the reference
    weights, the tokenized pairs, ``max_length``, the chat template and :func:`precision_tag`."""
    parts = [model_id, pairs_hash(pairs), str(max_length), template or "", precision]
    key = hashlib.sha256("|".join(parts).encode()).hexdigest()[:24]
    return Path(root) / "ref_logps" / f"{key}.pt"


def read_ref_cache(cache_file: Path, keys: list[str]) -> torch.Tensor | None:
    """The cached ``(N, 2)`` values when ``cache_file`` holds exactly ``keys``; None when it is
    missing, unreadable or for other pairs (then the values are recomputed)."""
    try:
        blob = torch.load(cache_file, weights_only=True)
    except FileNotFoundError:
        return None
    except Exception:  # noqa: BLE001 - a damaged file is a miss, never a crash
        return None
    if not isinstance(blob, dict) or blob.get("keys") != keys:
        return None
    values = blob.get("values")
    ok = torch.is_tensor(values) and tuple(values.shape) == (len(keys), 2)
    return values if ok else None


def write_ref_cache(cache_file: Path, keys: list[str], values: torch.Tensor) -> None:
    """Write atomically: a private temporary file in the same directory, then ``os.replace``.

    Any number of concurrent writers (processes, runs sharing a cache) leave one complete file;
    readers see the old file or the new one, never a partial one.
    """
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_file.parent, prefix=f".{cache_file.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"keys": keys, "values": values}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cache_file)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def attach_ref_logps(pairs, cache_file: Path, compute, acc=None) -> str:
    """Set ``pair.ref`` from ``cache_file`` or from ``compute()`` (then cache it).

    Returns ``"cache"`` or ``"computed"``. The cache stores the pair keys next to the values and
    is refused if they do not match. With ``acc`` every rank takes part: the cache counts only
    if every rank can read it, ``compute()`` runs on all ranks (each scores its share), rank 0
    alone writes the file and the others wait for it.
    """
    keys = [p.key() for p in pairs]
    values = read_ref_cache(cache_file, keys)
    hit = values is not None
    if acc is not None and acc.num_processes > 1:
        flag = torch.tensor([float(hit)], device=acc.device)
        hit = int(acc.reduce(flag, reduction="sum").item()) == acc.num_processes
    source = "cache"
    if not hit:
        values, source = compute(), "computed"
        if acc is None or acc.is_main_process:
            write_ref_cache(cache_file, keys, values)
    if acc is not None:
        acc.wait_for_everyone()
    for p, (c, r) in zip(pairs, values.tolist(), strict=True):
        p.ref = (c, r)
    return source


# ---------------------------------------------------------------- the recipe


def load_pairs(cfg, tokenizer):
    prepare = functools.partial(prepare_pairs, max_prompt_length=cfg.max_prompt_length)
    train, train_stats, evals, eval_stats = load_prepared(cfg, tokenizer, prepare)
    if cfg.loss_type == "ipo" and cfg.use_margin and any(p.margin is not None for p in train):
        raise ValueError("use_margin: loss_type=ipo has no margin; set use_margin=false")
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
    tokenizer = load_tokenizer(cfg.model_name_or_path, cfg.cache_dir)
    train, train_stats, evals, eval_stats = load_pairs(cfg, tokenizer)
    collate = make_collate(tokenizer.pad_token_id, cfg)
    model, ref_model = build_policy(
        cfg.model_name_or_path, cfg.finetuning_type, cfg.dtype, cfg.lora_rank, cfg.lora_alpha,
        cfg.lora_dropout, cfg.lora_target, cfg.gradient_checkpointing, cfg.cache_dir,
        cfg.attn_implementation,
    )  # fmt: skip
    ref_model = place_frozen(acc, ref_model)
    ref_source = None
    if cfg.precompute_ref_logps:
        model = place_policy(acc, model)
        splits = {"train": train, "eval": evals}
        ref_source = precompute_reference(cfg, acc, tokenizer, model, ref_model, collate, splits)
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
        frozen=(ref_model,),
    )
    with Timer() as t:
        result = loop.fit()
    final = save_final(loop.model, tokenizer, loop.out, acc)
    heldout = heldout_report(objective, evals, acc) if evals else (None, None)
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
    loop's final evaluation recorded."""
    from alignforge.evaluate.preference import heldout_report as report
    from alignforge.recipes.reward import recorded_scores

    rec = recorded_scores(objective.eval_records, evals, acc)  # (N, 4)
    return report(rec[:, :2], rec[:, 2:], evals)


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
        f"  pairs: {d['used']} used of {d['rows']} rows; {d['truncated']} truncated ({d['prompt_truncated']} "
        f"prompts, {d['answer_truncated']} answers), {d['dropped_too_long']} dropped too long, "
        f"{d['dropped_identical']} identical once truncated, {d['bad_rows']} bad rows skipped",
        f"  layout: {s['layout']}; {s['pairs_per_s']:.2f} pairs/s, {s['tokens_per_s']:.0f} tokens/s",
    ]
    if s.get("ref_logps"):
        lines.append(f"  reference log-probs: {s['ref_logps']}")
    ev = s.get("final_eval")
    if ev:
        lines.append(
            f"  eval: loss {ev['loss']:.4f}, accuracy {ev['rewards/accuracies']:.3f}, margin {ev['rewards/margins']:.3f}"
        )
    if s.get("eval"):
        from alignforge.evaluate.preference import report_lines

        lines += report_lines(s["eval"], s["baselines"])
    lines.append(f"  model: {s['final_model']}")
    print("\n".join(lines))
