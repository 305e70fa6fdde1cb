"""``alignforge eval --task preference``: score preference pairs with reward models, DPO adapters
and plain models, beside the baselines of :mod:`alignforge.evaluate.preference`.

    alignforge eval --task preference --data pairs.jsonl -o runs/eval-pref \\
        --system rm=runs/rm/final --system dpo=runs/dpo/final --max-length 512

A system is ``name=PATH``: a reward model saved by ``stage: rm`` (it has a score head), a LoRA
adapter (scored by its implicit reward against itself with the adapter off) or a model directory
(its mean log-prob per answer token). ``--model`` is the base model of the baselines (default:
the embedded default model); every system must share its tokenizer. Rows are read as DPO reads
them, with a ``category`` column reported per category, and cut by the one length rule
(``--max-length``, ``--max-prompt-length``). Writes ``results.json`` and ``results.md``.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np

from alignforge.config import ConfigError
from alignforge.evaluate import preference as pref


def load_pairs(data, tokenizer, max_length: int, max_prompt_length, limit, split=None):
    """Rows, tokenized pairs and their stats; every row must be a valid pair."""
    from alignforge.data.preference import prepare_pairs
    from alignforge.evaluate.runner import read_rows

    rows = read_rows(data, split)[: limit or None]
    pairs, stats = prepare_pairs(
        rows, tokenizer, max_length, source=str(data), max_prompt_length=max_prompt_length
    )
    return rows, pairs, stats


def system_scores(path: str, pairs, tokenizer, batch_size: int) -> tuple[str, np.ndarray]:
    """``(kind, scores (N, 2))`` of the system saved at ``path``."""
    from alignforge.evaluate.pair_scores import implicit_rewards, mean_token_logps, reward_scores
    from alignforge.models import is_adapter_dir, load_model, load_tokenizer
    from alignforge.models.heads import HEAD_FILE, load_reward_model

    own = load_tokenizer(path)
    if own.get_vocab() != tokenizer.get_vocab() or own.chat_template != tokenizer.chat_template:
        raise ConfigError(f"--system {path}: its tokenizer differs from the base model's (--model)")
    if (Path(path) / HEAD_FILE).exists():
        return "reward model", reward_scores(
            load_reward_model(path), pairs, tokenizer.pad_token_id, batch_size
        )
    model = load_model(path).eval()
    if is_adapter_dir(path):
        return "implicit reward", implicit_rewards(model, pairs, tokenizer.pad_token_id, batch_size)
    return "mean log-prob", mean_token_logps(model, pairs, tokenizer.pad_token_id, batch_size)


def base_outcomes(base: str, pairs, tokenizer, batch_size: int, seed: int):
    """The base model's baselines: mean log-prob outcomes and untrained-head accuracies."""
    from alignforge.evaluate.pair_scores import last_token_features, mean_token_logps
    from alignforge.models import load_model

    model = load_model(base).eval()
    logps = mean_token_logps(model, pairs, tokenizer.pad_token_id, batch_size)
    features = last_token_features(model, pairs, tokenizer.pad_token_id, batch_size)
    del model
    gc.collect()
    heads = pref.random_head_accuracies(features, seed=seed)
    return pref.outcomes(logps[:, 0], logps[:, 1]), heads


def run_preference_eval(
    data,
    output_dir,
    systems: list,
    base: str = "default",
    max_length: int = 1024,
    max_prompt_length: int | None = None,
    limit: int | None = None,
    split: str | None = None,
    batch_size: int = 8,
    n_boot: int = 2000,
    alpha: float = 0.05,
    seed: int = 0,
    template: str = "default",
) -> dict:
    """Score every system (``SystemSpec`` with ``model`` only) on the pairs in ``data``, which
    are tokenized once, with the chat template ``template`` names (default: the base model's)."""
    from alignforge.data.templating import set_chat_template
    from alignforge.models import load_tokenizer
    from alignforge.recipes.reward import column

    bad = [s.name for s in systems if s.adapter or s.base_url or s.template != "default"]
    if bad:
        raise ConfigError(
            f"--system {bad[0]}: the preference task takes name=PATH (a reward model, an adapter "
            "or a model directory), no adapter=, base_url= or template= (--template sets the one "
            "template pairs are tokenized with)"
        )
    tokenizer = set_chat_template(load_tokenizer(base), template)
    rows, pairs, stats = load_pairs(data, tokenizer, max_length, max_prompt_length, limit, split)
    lengths = np.array([p.lengths for p in pairs])
    groups = [p.prompt_key for p in pairs]
    base_won, heads = base_outcomes(base, pairs, tokenizer, batch_size, seed)
    baselines = {
        "longer_answer": pref.outcomes(lengths[:, 0], lengths[:, 1]),
        "base_logp": base_won,
    }
    categories = column(rows, pairs, "category")
    results = {
        "dataset": str(data),
        "base": base,
        "n_pairs": len(pairs),
        "n_prompts": len(set(groups)),
        "data": stats.as_dict(),
        "baselines": pref.baseline_report(baselines, lengths, groups, heads, n_boot, alpha, seed),
        "systems": {},
    }
    for spec in systems:
        kind, scores = system_scores(spec.model, pairs, tokenizer, batch_size)
        won = pref.outcomes(scores[:, 0], scores[:, 1])
        report = pref.system_report(
            won, lengths, groups, baselines, heads, categories, n_boot, alpha, seed
        )
        results["systems"][spec.name] = {"path": spec.model, "scored_by": kind, **report}
        gc.collect()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(pref.results_markdown(results))
    return results
