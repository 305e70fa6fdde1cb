"""Preference samples: one greedy completion plus k-1 tempered samples per prompt.

    from alignforge.datagen.preferences import sample_preferences, policy_fingerprint
    engine = TransformersEngine(model, tokenizer, policy_version=policy_fingerprint("runs/sft"))
    rows = sample_preferences(prompts, engine, tokenizer, "runs/prefs", k=4, temperature=0.9,
                              policy_model="runs/sft")

    alignforge data preferences preferences.yaml model=runs/sft k=4

The sampling policy: for each prompt a deterministic (greedy) completion and ``k - 1`` samples at
``temperature``; each completion records its joint log-prob, per-token log-probs (of the
distribution sampled from) and the policy fingerprint; the order is shuffled per prompt (seeded)
so the greedy completion is not always first. Splits are assigned per document before any pair
exists. Rows go to ``samples.jsonl``::

    {"prompt_id", "doc_id", "split", "prompt", "policy": {"model", "fingerprint"},
     "completions": [{"completion_id", "text", "greedy", "temperature", "logp", "token_logps",
                      "n_tokens", "finish_reason"}], "created_at"}

``temperature_sweep`` tunes the temperature from judged greedy-vs-sample comparisons: the
recommended temperature is the highest one at which the greedy completion wins at most 50% of
the time (ties count half).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from alignforge.datagen.cache import JsonlCache, write_jsonl_atomic
from alignforge.datagen.splits import assign_split


def policy_fingerprint(path: str | Path) -> str:
    """The checkpoint identity recorded with every sample (see ``alignforge.models.fingerprint``)."""
    from alignforge.models import fingerprint

    return fingerprint(path)


def _completion(prompt_id: str, j: int, r) -> dict:
    return {
        "completion_id": f"{prompt_id}-c{j}",
        "text": r.text,
        "greedy": bool(r.greedy),
        "temperature": float(r.temperature),
        "logp": float(r.logp),
        "token_logps": [float(x) for x in r.logps],
        "token_ids": [int(t) for t in r.completion_ids],
        "n_tokens": len(r.completion_ids),
        "finish_reason": r.finish_reason,
    }


def sample_preferences(
    prompts: list[dict], engine, tokenizer, output_dir: str | Path | None = None, *, k: int = 4,
    temperature: float = 0.9, top_p: float = 1.0, max_new_tokens: int = 256, seed: int = 0,
    policy_model: str = "", fingerprint: str | None = None, split_ratios: dict | None = None,
    batch_prompts: int = 16, progress: bool = True,
) -> list[dict]:  # fmt: skip
    """``samples.jsonl`` rows for ``prompts`` (dicts with ``prompt`` and optional ``prompt_id``,
    ``doc_id``, ``split``). With ``output_dir`` finished prompts are cached and skipped on re-run.
    """
    from tqdm.auto import tqdm

    from alignforge.rollout.transformers_engine import chat_prompt_ids

    if k < 2:
        raise ValueError(f"k must be >= 2 (one greedy + at least one sample), got {k}")
    fingerprint = fingerprint or engine.policy_version
    items = [_normalise_prompt(p, i, split_ratios) for i, p in enumerate(prompts)]
    params = json.dumps([fingerprint, k, temperature, top_p, max_new_tokens, seed])
    cache = JsonlCache(Path(output_dir) / "samples.cache.jsonl") if output_dir else None
    key = {
        it["prompt_id"]: hashlib.sha256(f"{it['prompt_id']}|{params}".encode()).hexdigest()[:32]
        for it in items
    }
    todo = [it for it in items if cache is None or key[it["prompt_id"]] not in cache]
    done: dict[str, dict] = {}
    for start in tqdm(range(0, len(todo), batch_prompts), disable=not progress, desc="preferences"):
        batch = todo[start : start + batch_prompts]
        ids = [chat_prompt_ids(tokenizer, it["prompt"]) for it in batch]
        greedy = engine.generate(ids, greedy=True, max_new_tokens=max_new_tokens)
        sampled = engine.generate(ids, n=k - 1, temperature=temperature, top_p=top_p,
                                  max_new_tokens=max_new_tokens, seed=seed + start)  # fmt: skip
        for it, g, s in zip(batch, greedy, sampled, strict=True):
            row = _row(it, g + s, policy_model, fingerprint, seed)
            done[it["prompt_id"]] = row
            if cache is not None:
                cache.append(key[it["prompt_id"]], {"row": row})
    rows = [done.get(it["prompt_id"]) or cache.get(key[it["prompt_id"]])["row"] for it in items]
    if output_dir:
        write_jsonl_atomic(rows, Path(output_dir) / "samples.jsonl")
    return rows


def _normalise_prompt(p: dict | str, i: int, split_ratios) -> dict:
    p = {"prompt": p} if isinstance(p, str) else dict(p)
    if "prompt" not in p:
        raise ValueError(f"prompt {i}: missing 'prompt' field in {str(p)[:100]}")
    text = p["prompt"] if isinstance(p["prompt"], str) else json.dumps(p["prompt"], sort_keys=True)
    p.setdefault("prompt_id", hashlib.sha256(text.encode()).hexdigest()[:12])
    p["prompt_id"] = str(p["prompt_id"])
    p.setdefault("doc_id", None)
    if not p.get("split"):
        p["split"] = assign_split(str(p["doc_id"] or p["prompt_id"]), split_ratios)
    return p


def _row(item: dict, rollouts: list, policy_model: str, fingerprint: str, seed: int) -> dict:
    completions = [_completion(item["prompt_id"], j, r) for j, r in enumerate(rollouts)]
    random.Random(f"{seed}:{item['prompt_id']}").shuffle(completions)
    return {
        "prompt_id": item["prompt_id"],
        "doc_id": item["doc_id"],
        "split": item["split"],
        "prompt": item["prompt"],
        "policy": {"model": policy_model, "fingerprint": fingerprint},
        "completions": completions,
        "created_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


class SweepRow(NamedTuple):
    temperature: float
    n: int
    greedy_wins: int
    ties: int
    sample_wins: int
    greedy_win_rate: float  # ties count half
    low: float
    high: float


class SweepTable(NamedTuple):
    rows: list[SweepRow]
    recommended: float | None  # highest T with greedy_win_rate <= 0.5

    def format(self) -> str:
        lines = [
            "| T | n | greedy wins | ties | sample wins | greedy win rate [95% CI] |",
            "|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            lines.append(f"| {r.temperature:g} | {r.n} | {r.greedy_wins} | {r.ties} | {r.sample_wins} | "
                         f"{100 * r.greedy_win_rate:.1f}% [{100 * r.low:.1f}, {100 * r.high:.1f}] |")  # fmt: skip
        lines.append(f"\nrecommended temperature: {self.recommended}")
        return "\n".join(lines)


_OUTCOMES = {"greedy": "win", "tie": "tie", "sample": "loss", "win": "win", "loss": "loss"}


def temperature_sweep(judgements: list[dict], seed: int = 0) -> SweepTable:
    """Greedy-vs-sample outcomes per temperature and the recommended temperature.

    ``judgements``: rows ``{"temperature": T, "outcome": "greedy" | "sample" | "tie"}`` (the
    winner of a greedy-vs-sample comparison; "win"/"loss" from greedy's side also accepted).
    greedy_win_rate = (greedy wins + ties / 2) / n; recommended = max{T : rate <= 0.5}.
    """
    from alignforge.evaluate.stats import win_tie_loss

    by_t: dict[float, list[str]] = defaultdict(list)
    for i, j in enumerate(judgements):
        outcome = _OUTCOMES.get(str(j.get("outcome")))
        if outcome is None or "temperature" not in j:
            raise ValueError(
                f"judgement {i}: need 'temperature' and outcome greedy|sample|tie, got {j}"
            )
        by_t[float(j["temperature"])].append(outcome)
    rows = []
    for t in sorted(by_t):
        outs = by_t[t]
        wtl = win_tie_loss(outs, seed=seed)
        rows.append(SweepRow(t, len(outs), outs.count("win"), outs.count("tie"), outs.count("loss"),
                             wtl.win_rate.value, wtl.win_rate.low, wtl.win_rate.high))  # fmt: skip
    ok = [r.temperature for r in rows if r.greedy_win_rate <= 0.5]
    return SweepTable(rows, max(ok) if ok else None)
