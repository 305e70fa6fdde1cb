"""Synthetic data and reward functions shared by the RLHF tests and benchmarks."""

from __future__ import annotations

import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
GOOD = ["great", "clear", "correct", "helpful", "precise"]
BAD = ["awful", "wrong", "vague", "useless", "sloppy"]


def alpaca(n: int) -> list[dict]:
    return json.loads((ROOT / "examples/data/alpaca_en_demo.json").read_text())[:n]


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Pairs whose chosen answer carries praise words and the rejected one complaint words."""
    rng = random.Random(seed)
    rows = []
    for r in alpaca(n):
        words = r["output"].split()[:12] or ["ok"]
        good, bad = list(words), list(words)
        for _ in range(2):
            good.insert(rng.randrange(len(good) + 1), rng.choice(GOOD))
            bad.insert(rng.randrange(len(bad) + 1), rng.choice(BAD))
        chosen, rejected = " ".join(good), " ".join(bad)
        prompt = r["instruction"][:80]
        if rng.random() < 0.5:  # message lists and plain strings both occur
            prompt = [{"role": "user", "content": prompt}]
            chosen = [{"role": "assistant", "content": chosen}]
            rejected = [{"role": "assistant", "content": rejected}]
        rows.append(
            {
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "margin": rng.choice([0.0, 0.5, 1.0]),
            }
        )
    return rows


def prompt_rows(n: int) -> list[dict]:
    return [{"prompt": r["instruction"][:60]} for r in alpaca(n)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)
