"""Self-play fine-tuning (``stage: spin``; Chen et al. 2024, arXiv:2401.01335) on SFT data.

    alignforge train examples/spin.yaml
    alignforge train examples/spin.yaml num_iterations=4 beta=[0.1,0.1,5.0,5.0]

Each iteration k, top to bottom:

1. The opponent is the model at the start of the iteration (the SFT model for k = 0, the merged
   result of iteration k-1 afterwards). It answers every SFT prompt once, rendered with the
   same chat template call as training (:func:`alignforge.data.preference.render_prompt`),
   greedy or sampled, through a rollout engine: in this process, or (``rollout_engine: server``)
   from ``alignforge serve``, given the opponent's saved weights first (``/v1/load_weights``).
   Answers equal to the ground truth are dropped and counted; lengths, truncation (hit
   ``max_new_tokens``) and exact matches are logged.
2. Pairs: chosen = ground truth, rejected = the opponent's answer, plus (``mix_previous``) the
   previous iteration's pairs, as the official code does.
3. The opponent scores both sides of every pair once, before any update: its log-probs of the
   **ground truth** and of its **own answer** are the reference of SPIN's loss (stored in
   ``iter_k/opponent_logps.pt``).
4. The policy (a fresh LoRA on the opponent, or the full weights) is trained with
   :func:`alignforge.losses.preference.spin_loss` on the shared loop.
5. LoRA is merged, so iteration k+1's opponent really is iteration k's result. The merged model
   is saved to ``iter_k/model`` with ``iter_k/done.json`` (its statistics).

A finished iteration is never redone: a rerun loads the last finished ``iter_k/model`` and goes
on; an interrupted iteration resumes from its generations and its training checkpoints.
Early stop: after an iteration whose final reward margin and accuracy (policy vs its opponent,
on the held-out prompts when there are any) fall below ``early_stop_margin`` /
``early_stop_accuracy``: the model can no longer tell the data from its own answers, which is
SPIN's fixed point.

Bugs of an unofficial implementation that this recipe rules out (tests/prefopt/test_spin.py):
the opponent term of the real answer is the opponent's log-prob of the ground truth (not of the
generation twice); the log ratio is policy minus opponent; logits at position t score token t+1;
prompt tokens carry no loss.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

from alignforge.config.preference import SPINConfig
from alignforge.data import DataError, to_example
from alignforge.data.formats import ChatExample
from alignforge.data.mix import row_name
from alignforge.data.preference import prepare_pairs, render_prompt
from alignforge.data.templating import set_chat_template
from alignforge.losses.preference import spin_loss
from alignforge.models import fingerprint, load_model, load_tokenizer, wrap_lora
from alignforge.recipes.common import Timer, load_splits, peak_memory_mb, write_summary
from alignforge.recipes.dpo import (
    PreferenceObjective,
    attach_ref_logps,
    compute_ref_logps,
    make_collate,
    model_identity,
    place_policy,
    plot_rewards,
)
from alignforge.recipes.memory import warn_if_memory_short
from alignforge.rollout.transformers_engine import TransformersEngine, eos_token_ids
from alignforge.training import TrainLoop
from alignforge.training.plots import plot_loss_curve, save_figure
from alignforge.training.rundir import open_run

CONFIG = SPINConfig


class SPINObjective(PreferenceObjective):
    """SPIN's loss: chosen = ground truth, rejected = the opponent's answer, reference = opponent."""

    def loss(self, logps, ref, batch):
        P = batch["n_pairs"]
        return spin_loss(
            policy_real_logps=logps[:P],
            policy_generated_logps=logps[P:],
            opponent_real_logps=ref[:P],
            opponent_generated_logps=ref[P:],
            beta=self.beta,
            loss_type=self.loss_type,
        )


class Generation(NamedTuple):
    text: str
    n_tokens: int
    truncated: bool  # hit max_new_tokens without an end-of-sequence token


class GenerationStats(NamedTuple):
    n: int
    mean_tokens: float
    max_tokens: int
    truncation_rate: float
    exact_match_rate: float
    dropped_exact: int


# ---------------------------------------------------------------- data


def sft_prompts(rows, formatting="auto", columns=None, skip_bad_rows=False, source="dataset"):
    """``[(prompt_messages, ground_truth_answer)]`` from SFT rows: the last trained assistant
    message is the answer, everything before it the prompt. Bad rows raise with their index
    unless ``skip_bad_rows`` (then they are counted); returns ``(items, n_bad)``."""
    out, bad = [], 0
    for idx, row in enumerate(rows):
        try:
            ex = to_example(row, formatting, columns)
            if not isinstance(ex, ChatExample):
                raise DataError("SPIN needs conversations (a prompt and an answer), not plain text")
            j = max(i for i, t in enumerate(ex.trainable) if t)
            if (
                j == 0
                or ex.messages[j]["role"] != "assistant"
                or not ex.messages[j]["content"].strip()
            ):
                raise DataError(
                    "the last trained message must be a non-empty assistant answer after a prompt"
                )
        except DataError as e:
            if not skip_bad_rows:
                raise DataError(f"{row_name(rows, idx, source)}: {e}") from None
            bad += 1
            continue
        out.append((ex.messages[:j], ex.messages[j]["content"]))
    if not out:
        raise DataError(f"{source}: no usable prompts out of {len(rows)} rows")
    return out, bad


def generate_responses(
    engine, tokenizer, prompts, max_new_tokens, do_sample=False, temperature=1.0, top_p=1.0,
    seed=None,
) -> list[Generation]:  # fmt: skip
    """One answer per prompt (list of messages) from ``engine`` (a
    :class:`~alignforge.rollout.base.RolloutEngine`), greedy or sampled under ``seed``; prompts
    are rendered as the training pairs render them."""
    ids = [tokenizer(render_prompt(tokenizer, p), add_special_tokens=False)["input_ids"]
           for p in prompts]  # fmt: skip
    groups = engine.generate(ids, temperature=temperature, top_p=top_p, greedy=not do_sample,
                             max_new_tokens=max_new_tokens, seed=seed)  # fmt: skip
    return [Generation(r.text, r.n_tokens, r.finish_reason == "length") for [r] in groups]


def make_pair_rows(items, generations: list[Generation]) -> tuple[list[dict], GenerationStats]:
    """Explicit preference rows (chosen = ground truth, rejected = generation), without the
    generations equal to their ground truth."""
    rows, exact = [], 0
    for (prompt, answer), g in zip(items, generations, strict=True):
        if g.text.strip() == answer.strip():
            exact += 1
            continue
        rows.append({"prompt": prompt, "chosen": answer, "rejected": g.text})
    n = len(generations)
    stats = GenerationStats(
        n=n,
        mean_tokens=sum(g.n_tokens for g in generations) / max(n, 1),
        max_tokens=max((g.n_tokens for g in generations), default=0),
        truncation_rate=sum(g.truncated for g in generations) / max(n, 1),
        exact_match_rate=exact / max(n, 1),
        dropped_exact=exact,
    )
    return rows, stats


# ---------------------------------------------------------------- run directory and models


def finished_iterations(out: Path, n: int) -> list[dict]:
    done = []
    for k in range(n):
        f = out / f"iter_{k}" / "done.json"
        if not f.exists():
            break
        done.append(json.loads(f.read_text()))
    return done


def load_opponent(source: str, dtype: str, cache: str | None, attn_implementation: str = "sdpa"):
    """The opponent as a plain model; an adapter directory is merged into its base."""
    model = load_model(source, dtype=dtype, cache=cache, attn_implementation=attn_implementation)
    return model.merge_and_unload() if hasattr(model, "peft_config") else model


def make_policy(opponent, cfg: SPINConfig):
    """A fresh trainable policy starting at the opponent: a new LoRA, or the full weights."""
    if cfg.gradient_checkpointing:
        opponent.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
        opponent.config.use_cache = False
    if cfg.finetuning_type == "full":
        return opponent.requires_grad_(True)
    if cfg.gradient_checkpointing:
        opponent.enable_input_require_grads()
    return wrap_lora(
        opponent, cfg.lora_rank, cfg.lora_alpha, cfg.lora_dropout, cfg.lora_target,
        gradient_checkpointing=cfg.gradient_checkpointing,
    )  # fmt: skip


# ---------------------------------------------------------------- one iteration


def opponent_server(cfg: SPINConfig, tokenizer, eos_ids: list[int], out: Path):
    """``(engine, sync)``: the servers the opponent answers from (serving ``rollout_model``), and
    what gives them each iteration's opponent weights (``/v1/load_weights``)."""
    from alignforge.rollout import WeightSync, build_rollout_engine

    engine = build_rollout_engine("server", tokenizer=tokenizer, base_urls=cfg.rollout_base_urls,
                                  served_model=cfg.rollout_model, eos_token_ids=eos_ids)  # fmt: skip
    engine.check()
    sync = WeightSync(cfg.rollout_base_urls, out / "rollout_policy", adapter=None)
    sync.check(
        "rollout_base_url: this server cannot load new weights (vLLM's OpenAI server cannot), and "
        "SPIN's opponent changes after every iteration; serve the model with alignforge serve, or "
        "set rollout_engine: transformers"
    )
    return engine, sync


def opponent_engine(opponent, tokenizer, cfg: SPINConfig, server, source: str, version: str, acc):
    """What answers as the opponent: the model in this process, or the servers once they serve
    its weights, loaded from ``source`` (where they are saved) by process 0."""
    if server is None:
        return TransformersEngine(opponent, tokenizer, version, cfg.generation_batch_size)
    engine, sync = server
    if acc.is_main_process:
        sync.load_saved(source, version)
    acc.wait_for_everyone()
    return engine.at(engine.model, version)


def generate_shared(engine, tokenizer, prompts, cfg: SPINConfig, acc, seed: int):
    """:func:`generate_responses` for every prompt, batch ``j`` on rank ``j % world`` seeded
    with ``seed + j`` (the answers do not depend on the number of processes); every rank returns
    all answers, in prompt order."""
    from tqdm.auto import tqdm

    bs = cfg.generation_batch_size
    starts = list(range(0, len(prompts), bs))[acc.process_index :: acc.num_processes]
    mine = [
        (j, generate_responses(engine, tokenizer, prompts[j : j + bs], cfg.max_new_tokens,
                               cfg.do_sample, cfg.temperature, cfg.top_p, seed + j))
        for j in tqdm(starts, desc="opponent generates", leave=False)
    ]  # fmt: skip
    if acc.num_processes > 1:
        from accelerate.utils import gather_object

        mine = gather_object(mine)
    return [g for _, gens in sorted(mine, key=lambda jg: jg[0]) for g in gens]


def write_json_atomic(path: Path, data) -> None:
    """A private temporary file in the same directory, then ``os.replace``: never a partial file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(data))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def opponent_pairs(engine, tokenizer, items, cfg: SPINConfig, path: Path, acc, seed: int):
    """The opponent's pair rows for ``items`` and their generation stats, generated once (shared
    out over the ranks) by ``engine()`` and kept in ``path`` by rank 0 (a rerun reuses them)."""
    if path.exists():
        data = json.loads(path.read_text())
        return data["rows"], GenerationStats(**data["stats"])
    gens = generate_shared(engine(), tokenizer, [p for p, _ in items], cfg, acc, seed)
    rows, stats = make_pair_rows(items, gens)
    if acc.is_main_process:
        write_json_atomic(path, {"stats": stats._asdict(), "rows": rows})
    acc.wait_for_everyone()
    return rows, stats


def score_with_opponent(policy, collate, cfg: SPINConfig, acc, it: Path, splits: dict) -> None:
    """The opponent's log-probs of both sides of every pair, before any update, kept in
    ``it/opponent_logps_<split>.pt`` (a fresh adapter is switched off for it; with full weights
    the policy *is* the opponent here). Each rank scores its share; rank 0 writes."""
    for name, pairs in splits.items():
        if pairs:
            attach_ref_logps(
                pairs,
                it / f"opponent_logps_{name}.pt",
                lambda p=pairs: compute_ref_logps(
                    policy, None, p, collate, cfg.per_device_eval_batch_size, acc.device, acc
                ),
                acc,
            )


def iteration_verdict(final: dict, cfg: SPINConfig) -> str | None:
    """Why to stop after this iteration (its margin/accuracy gain over the opponent vanished)."""
    checks = [
        (cfg.early_stop_margin, "rewards/margins"),
        (cfg.early_stop_accuracy, "rewards/accuracies"),
    ]
    active = [(t, k) for t, k in checks if t is not None]
    if active and all(final.get(k, float("inf")) < t for t, k in active):
        return "gain vanished: " + ", ".join(f"{k} {final[k]:.4f} < {t}" for t, k in active)
    return None


def iteration_pairs(k: int, rows, eval_rows, tokenizer, cfg: SPINConfig):
    """Tokenized training pairs, their stats and the eval pairs of iteration ``k``."""
    prep = dict(
        max_length=cfg.max_length,
        truncation=cfg.truncation,
        max_prompt_length=cfg.max_prompt_length,
        formatting="explicit",
        skip_bad_rows=True,
    )
    train, tstats = prepare_pairs(rows, tokenizer, source=f"iteration {k} pairs", **prep)
    evals = (
        prepare_pairs(eval_rows, tokenizer, source=f"iteration {k} eval pairs", **prep)[0]
        if eval_rows
        else []
    )
    return train, tstats, evals


def run_iteration(
    k, opponent, opponent_id, tokenizer, items, eval_items, prev_rows, cfg, acc, out, server=None
):
    """Generate, pair, score with the opponent, train, merge, save. Returns (model, info, rows).
    ``server``: :func:`opponent_server`'s, when the opponent answers from servers."""
    it = out / f"iter_{k}"
    if acc.is_main_process:
        it.mkdir(exist_ok=True)
        if not any(it.glob("checkpoint-*")):  # rows of an attempt that left no checkpoint
            (it / "metrics.jsonl").unlink(missing_ok=True)
    acc.wait_for_everyone()
    seed = cfg.seed + 100_003 * (k + 1)  # the same answers whatever the number of processes
    source = str(out / f"iter_{k - 1}" / "model") if k else cfg.model_name_or_path
    # built once, and only if some answers are still to generate (a rerun may have them all)
    engine = functools.cache(
        lambda: opponent_engine(opponent, tokenizer, cfg, server, source, opponent_id, acc)
    )
    gen = (engine, tokenizer)
    rows, gstats = opponent_pairs(*gen, items, cfg, it / "pairs_train.json", acc, seed)
    eval_rows, eval_gstats = (
        opponent_pairs(*gen, eval_items, cfg, it / "pairs_eval.json", acc, seed + 50_021)
        if eval_items
        else ([], None)
    )
    mixed = prev_rows if cfg.mix_previous else []
    train, tstats, evals = iteration_pairs(k, rows + mixed, eval_rows, tokenizer, cfg)
    collate = make_collate(tokenizer.pad_token_id, cfg)
    policy = place_policy(acc, make_policy(opponent, cfg))
    score_with_opponent(policy, collate, cfg, acc, it, {"train": train, "eval": evals})
    beta, lr = cfg.per_iteration("beta", k), cfg.per_iteration("learning_rate", k)
    name = f"{cfg.run_name or Path(cfg.output_dir).resolve().name}-iter_{k}"  # trackers' run
    args = cfg.model_copy(update={"output_dir": str(it), "learning_rate": lr, "run_name": name})
    loop = TrainLoop(
        policy,
        SPINObjective(beta, cfg.loss_type),
        train,
        collate,
        args,
        eval_units=evals,
        accelerator=acc,
    )
    result = loop.fit()
    model = acc.unwrap_model(loop.model)
    model = model.merge_and_unload() if hasattr(model, "peft_config") else model
    if acc.is_main_process:
        model.save_pretrained(it / "model", safe_serialization=True)
        tokenizer.save_pretrained(it / "model")
        plot_loss_curve(loop.logger.rows(), it / "loss_curve.png", title=f"SPIN iteration {k}")
        plot_rewards(loop.logger.rows(), it / "rewards.png")
    acc.wait_for_everyone()
    final = result["final_eval"]
    if final is None:  # no held-out prompts: measure the trained policy on its training pairs
        loop.eval_units = train
        final = loop.evaluate()
    info = {
        "iteration": k,
        "beta": beta,
        "learning_rate": lr,
        "opponent_fingerprint": opponent_id,
        "model_fingerprint": fingerprint(it / "model"),
        "generation": gstats._asdict(),
        "eval_generation": eval_gstats._asdict() if eval_gstats else None,
        "pairs": len(train),
        "previous_pairs_mixed": len(mixed),
        "data": tstats.as_dict(),
        "steps": result["steps"],
        "train_seconds": result["train_seconds"],
        "final": final,
        "final_on": "eval pairs" if evals else "training pairs",
        "stop_reason": iteration_verdict(final, cfg),
    }
    if acc.is_main_process:
        (it / "done.json").write_text(json.dumps(info, indent=2, default=str))
    loop.logger.close()
    acc.free_memory()
    return model.eval(), info, rows


# ---------------------------------------------------------------- the recipe


def run(cfg: SPINConfig, callbacks=()) -> dict:
    acc = open_run(cfg)
    out = Path(cfg.output_dir)
    tokenizer = set_chat_template(
        load_tokenizer(cfg.model_name_or_path, cfg.cache_dir), cfg.template
    )
    train_rows, eval_rows = load_splits(
        cfg.datasets, cfg.eval_datasets, cfg.val_size, cfg.seed, cfg.max_samples,
        cfg.mix_strategy, cfg.interleave_probs,
    )  # fmt: skip
    prep = dict(formatting=cfg.formatting, columns=cfg.columns, skip_bad_rows=cfg.skip_bad_rows)
    items, bad = sft_prompts(train_rows, source=", ".join(cfg.datasets), **prep)
    eval_items = (
        sft_prompts(eval_rows, source=", ".join(cfg.eval_datasets) or "held-out split", **prep)[0]
        if eval_rows
        else []
    )

    iterations = finished_iterations(out, cfg.num_iterations)
    resumed = len(iterations)
    with Timer() as t:
        if not any(d.get("stop_reason") for d in iterations) and resumed < cfg.num_iterations:
            last = out / f"iter_{resumed - 1}"
            source = str(last / "model") if resumed else cfg.model_name_or_path
            model = place_policy(
                acc, load_opponent(source, cfg.dtype, cfg.cache_dir, cfg.attn_implementation)
            )
            warn_if_memory_short(model.config, cfg, 2 * cfg.per_device_train_batch_size)
            opponent_id = (
                fingerprint(last / "model") if resumed else model_identity(source, cfg.cache_dir)
            )
            prev_rows = (
                json.loads((last / "pairs_train.json").read_text())["rows"] if resumed else []
            )
            server = (
                opponent_server(cfg, tokenizer, eos_token_ids(model, tokenizer), out)
                if cfg.rollout_engine == "server"
                else None
            )
            for k in range(resumed, cfg.num_iterations):
                model, info, prev_rows = run_iteration(
                    k, model, opponent_id, tokenizer, items, eval_items, prev_rows, cfg, acc, out,
                    server,
                )  # fmt: skip
                iterations.append(info)
                opponent_id = info["model_fingerprint"]
                for cb in callbacks:
                    cb(info)
                if info["stop_reason"]:
                    break
    final = out / f"iter_{iterations[-1]['iteration']}" / "model"
    summary = {
        "stage": "spin",
        "model": cfg.model_name_or_path,
        "finetuning_type": cfg.finetuning_type,
        "prompts": len(items),
        "eval_prompts": len(eval_items),
        "bad_rows": bad,
        "iterations_done": len(iterations),
        "iterations_resumed": resumed,
        "stopped_early": bool(iterations[-1].get("stop_reason"))
        and len(iterations) < cfg.num_iterations,
        "iterations": iterations,
        "final_model": str(final),
        "seconds": t.seconds,
        "peak_memory_mb": peak_memory_mb(),
    }
    if acc.is_main_process:
        plot_iterations(iterations, out / "spin_iterations.png")
        write_summary(out, summary)
        print_summary(summary)
    return summary


def plot_iterations(iterations: list[dict], path: Path) -> Path | None:
    """Per iteration: final reward margin and accuracy, and the opponent's exact-match and
    truncation rates."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not iterations:
        return None
    ks = [d["iteration"] for d in iterations]
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
    a.plot(
        ks,
        [d["final"].get("rewards/margins", float("nan")) for d in iterations],
        "o-",
        label="margin",
    )
    a.plot(
        ks,
        [d["final"].get("rewards/accuracies", float("nan")) for d in iterations],
        "s-",
        label="accuracy",
    )
    b.plot(ks, [d["generation"]["exact_match_rate"] for d in iterations], "o-", label="exact match")
    b.plot(ks, [d["generation"]["truncation_rate"] for d in iterations], "s-", label="truncated")
    a.set_title("policy vs opponent at the end of the iteration")
    b.set_title("opponent generations")
    return save_figure(fig, (a, b), "iteration", path)


def print_summary(s: dict) -> None:
    lines = [f"SPIN finished in {s['seconds']:.0f}s: {s['iterations_done']} iterations"
             + (f" ({s['iterations_resumed']} already done)" if s["iterations_resumed"] else "")]  # fmt: skip
    for d in s["iterations"]:
        g, f = d["generation"], d["final"]
        lines.append(
            f"  iter {d['iteration']}: {d['pairs']} pairs ({d['data']['truncated']} cut to "
            f"max_length, {d['data']['dropped_identical']} dropped identical once cut), "
            f"gen {g['mean_tokens']:.1f} tokens, "
            f"{g['truncation_rate']:.0%} truncated, {g['exact_match_rate']:.0%} exact; "
            f"margin {f.get('rewards/margins', float('nan')):.3f}, accuracy {f.get('rewards/accuracies', float('nan')):.3f}"
            + (f" — stop: {d['stop_reason']}" if d.get("stop_reason") else "")
        )
    lines.append(f"  model: {s['final_model']}")
    print("\n".join(lines))
