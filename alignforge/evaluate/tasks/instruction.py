"""Plain instruction following scored by overlap with a reference answer.

    >>> task = InstructionTask()
    >>> round(task.reward("the cat sat on the mat", "the cat is on the mat"), 3)   # ROUGE-L F1
    0.833

Rows: alpaca (``instruction``, ``input``, ``output``), or ``messages`` / ``prompt`` with
``reference`` / ``output``. Metrics (both per item, averaged over items):

* ``rouge_l``: F1 of the longest common token subsequence, F = 2·P·R / (P + R) with
  P = LCS / len(pred), R = LCS / len(ref) (Lin 2004, beta = 1);
* ``token_f1``: F1 of the bag-of-tokens overlap (multiset), as in SQuAD.
Tokens: lower-cased, punctuation stripped, split on whitespace. Two empty texts score 1.0.
The reward is ``rouge_l`` (or ``reward_metric="token_f1"``), the same number the eval reports.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

from alignforge.evaluate.tasks.base import ItemScore, Metric, Task, mean_of

_TOKEN = re.compile(r"\w+", re.UNICODE)


def tokens(text: str) -> list[str]:
    return _TOKEN.findall(text.casefold())


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence length, O(len(a)·len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def _f(overlap: float, n_pred: int, n_ref: int) -> float:
    if n_pred == 0 and n_ref == 0:
        return 1.0
    if overlap == 0:
        return 0.0
    p, r = overlap / n_pred, overlap / n_ref
    return 2 * p * r / (p + r)


def rouge_l(prediction: str, reference: str) -> float:
    a, b = tokens(prediction), tokens(reference)
    return _f(lcs_length(a, b), len(a), len(b))


def token_f1(prediction: str, reference: str) -> float:
    a, b = tokens(prediction), tokens(reference)
    return _f(sum((Counter(a) & Counter(b)).values()), len(a), len(b))


class InstructionTask(Task):
    name = "instruction"
    primary = "rouge_l"
    # long references make LCS quadratic; beyond this many tokens both sides are truncated
    max_tokens = 2000

    def prompt(self, row: dict[str, Any], index: int = 0) -> list[dict[str, str]]:
        if isinstance(row.get("instruction"), str):
            text = row["instruction"]
            if isinstance(row.get("input"), str) and row["input"].strip():
                text = f"{text}\n\n{row['input']}"
            msgs = [{"role": "system", "content": row["system"]}] if row.get("system") else []
            return msgs + [{"role": "user", "content": text}]
        return super().prompt(row, index)

    def score_item(self, prediction: str, reference: Any) -> ItemScore:
        if not isinstance(reference, str):
            raise ValueError(f"instruction reference must be text, got {type(reference).__name__}")
        pred = " ".join(tokens(prediction)[: self.max_tokens])
        ref = " ".join(tokens(reference)[: self.max_tokens])
        return ItemScore({"rouge_l": rouge_l(pred, ref), "token_f1": token_f1(pred, ref)})

    def metrics(self) -> list[Metric]:
        return [
            Metric("rouge_l", ("rouge_l",), mean_of(0)),
            Metric("token_f1", ("token_f1",), mean_of(0)),
        ]
