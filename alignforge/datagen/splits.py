"""Split before pairing, make all C(k,2) pairs inside a split, and check splits for leaks.

    from alignforge.datagen.splits import assign_split, make_pairs, check_leaks
    split = assign_split(doc_id)                         # deterministic, hash based
    pairs = [p for row in rows for p in make_pairs(row)]  # every pair keeps its prompt's split
    report = check_leaks({"train": "train.jsonl", "test": "test.jsonl"})
    assert not report.leaks, report.format()

    alignforge data check-leaks train.jsonl validation.jsonl test.jsonl   # exits 1 on a leak

A prompt with k completions gives C(k,2) preference pairs; assigning the split to the document
(or prompt) *before* completions are paired keeps all of them in one split, so no pair in the
test split shares a prompt with a training pair.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

DEFAULT_RATIOS = {"train": 0.8, "validation": 0.1, "test": 0.1}


def assign_split(key: str, ratios: dict[str, float] | None = None, salt: str = "alignforge") -> str:
    """Split of ``key``: a uniform hash of ``salt:key`` placed on the cumulative ratios."""
    ratios = ratios or DEFAULT_RATIOS
    total = sum(ratios.values())
    if total <= 0 or any(v < 0 for v in ratios.values()):
        raise ValueError(f"split ratios must be >= 0 and sum > 0, got {ratios}")
    u = int(hashlib.sha256(f"{salt}:{key}".encode()).hexdigest()[:16], 16) / 2**64
    acc = 0.0
    for name, ratio in ratios.items():
        acc += ratio / total
        if u < acc:
            return name
    return list(ratios)[-1]


def split_key(row: dict, by: str = "doc_id") -> str:
    """The grouping key of a row: its ``by`` field, falling back to ``prompt_id``."""
    value = row.get(by)
    if value is None:
        value = row.get("prompt_id")
    if value is None:
        raise ValueError(f"row has neither {by!r} nor 'prompt_id': {str(row)[:120]}")
    return str(value)


def make_pairs(group_row: dict) -> Iterator[dict]:
    """All C(k,2) pairs of a ``samples.jsonl`` row; each pair keeps the row's split."""
    if not group_row.get("split"):
        raise ValueError(
            f"prompt {group_row.get('prompt_id')!r} has no split; assign splits before pairing"
        )
    for a, b in itertools.combinations(group_row["completions"], 2):
        yield {
            "pair_id": f"{group_row['prompt_id']}:{a['completion_id']}:{b['completion_id']}",
            "prompt_id": group_row["prompt_id"],
            "doc_id": group_row.get("doc_id"),
            "split": group_row["split"],
            "prompt": group_row["prompt"],
            "a": a,
            "b": b,
        }


class Leak(NamedTuple):
    kind: str  # "exact" | "near"
    field: str
    value: str
    rows: list[tuple[str, int, str]]  # (file, line, split)
    similarity: float = 1.0


class LeakReport(NamedTuple):
    n_rows: int
    leaks: list[Leak]

    def format(self) -> str:
        if not self.leaks:
            return f"no leaks among {self.n_rows} rows"
        lines = [f"{len(self.leaks)} leak(s) among {self.n_rows} rows:"]
        for leak in self.leaks:
            where = ", ".join(f"{f}:{r} [{s}]" for f, r, s in leak.rows)
            sim = f" (cosine {leak.similarity:.3f})" if leak.kind == "near" else ""
            lines.append(f"  {leak.kind} {leak.field}{sim} {leak.value!r}: {where}")
        return "\n".join(lines)


def prompt_text(prompt) -> str:
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        return "\n".join(
            str(m.get("content", "")) if isinstance(m, dict) else str(m) for m in prompt
        )
    if prompt is None:
        return ""
    return json.dumps(prompt, sort_keys=True)


def _row_prompt(row: dict, system: bool = True) -> str:
    """The text of a row's prompt; without its system messages when ``system`` is false."""
    if "prompt" in row:
        prompt = row["prompt"]
    elif "messages" in row:
        prompt = [m for m in row["messages"] if m.get("role") != "assistant"]
    else:
        return ""
    if not system and isinstance(prompt, list):
        prompt = [m for m in prompt if not (isinstance(m, dict) and m.get("role") == "system")]
    return prompt_text(prompt)


def _load(split_files) -> list[tuple[str, int, str, dict]]:
    items = (
        split_files.items() if isinstance(split_files, dict) else [(None, f) for f in split_files]
    )
    rows = []
    for split_name, path in items:
        with open(path, encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} row {line_no}: malformed JSON ({e.msg})") from None
                split = split_name or row.get("split") or Path(path).stem
                rows.append((str(path), line_no, str(split), row))
    return rows


def check_leaks(split_files, by=("prompt", "doc_id"), near_dup_threshold: float | None = 0.95,
                embedder=None) -> LeakReport:  # fmt: skip
    """Values of ``by`` fields shared across splits (exact) and prompts closer than the threshold.

    ``split_files`` is ``{split: path}`` or a list of paths (split from each row's ``split``
    field, else the file name).
    """
    rows = _load(split_files)
    leaks: list[Leak] = []
    for field in by:
        groups: dict[str, list] = defaultdict(list)
        for f, line, split, row in rows:
            value = (
                " ".join(_row_prompt(row).lower().split()) if field == "prompt" else row.get(field)
            )
            if value not in (None, ""):
                groups[str(value)].append((f, line, split))
        for value, where in groups.items():
            if len({s for _, _, s in where}) > 1:
                leaks.append(Leak("exact", field, value[:120], where))
    if near_dup_threshold and "prompt" in by and len(rows) > 1:
        leaks.extend(_near_leaks(rows, near_dup_threshold, embedder))
    return LeakReport(len(rows), leaks)


def _near_leaks(rows, threshold, embedder) -> list[Leak]:
    import numpy as np

    from alignforge.datagen.diversity import embed_texts, exact_knn

    # what each prompt asks: a system message is mostly an instruction every prompt shares, and
    # embedded with it two different questions come out alike (0.96 on ner_finance's sentences)
    texts = [_row_prompt(r[3], system=False) for r in rows]
    emb = embed_texts(texts, embedder, progress=False)
    k = min(5, len(rows) - 1)
    neighbors = exact_knn(emb, np.arange(len(rows)), k)
    found, seen = [], set()
    for i in range(len(rows)):
        for j in neighbors[i]:
            sim = float(emb[i] @ emb[j])
            a, b = sorted((i, int(j)))
            same_text = " ".join(texts[a].lower().split()) == " ".join(texts[b].lower().split())
            if (
                sim >= threshold
                and rows[a][2] != rows[b][2]
                and (a, b) not in seen
                and not same_text
            ):
                seen.add((a, b))
                found.append(
                    Leak("near", "prompt", texts[a][:120], [rows[a][:3], rows[b][:3]], sim)
                )
    return found
