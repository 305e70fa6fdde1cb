"""KTO examples: answers labelled desirable or undesirable, each with a mismatched answer for KL.

    rows = [{"prompt": "2 + 2?", "completion": "4", "label": True},
            {"prompt": "Capital of France?", "completion": "Rome", "label": False}]
    examples, stats = prepare_kto(rows, tokenizer, max_length=512)

Accepted rows (``formatting: auto`` tells them apart by their columns):

| format | columns | examples |
|---|---|---|
| unpaired (TRL's KTO format) | ``prompt``, ``completion`` (string or messages), ``label`` (bool) | one |
| any preference-pair format | see :mod:`alignforge.data.preference` | two: chosen desirable, rejected undesirable |

Each example is a :class:`KTOExample`: a :class:`~alignforge.data.preference.PreferencePair`
whose ``chosen_ids`` is the answer and whose ``rejected_ids`` is the answer of *another prompt*
(the next example, in data order, whose prompt differs), scored after this prompt only for KTO's
KL reference point. Reusing the pair layout means every batch layout, the reference log-prob
cache and the length rule work unchanged: a sequence is cut as in a pair (the prompt's last
``max_prompt_length`` tokens, then the answer's first tokens). The mismatched answer is fixed
when the data is read, so its cached reference log-prob stays valid.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import NamedTuple

from alignforge.data.formats import is_unpaired_preference
from alignforge.data.mix import row_name
from alignforge.data.preference import (
    PreferencePair,
    PreferenceStats,
    _messages,
    cut,
    prompt_budget,
    split_pair,
    tokenize_pair,
)
from alignforge.data.readers import DataError


@dataclass
class KTOExample(PreferencePair):
    """``chosen_ids``: the answer; ``rejected_ids``: another prompt's answer (for KL only)."""

    label: bool = True  # desirable


@dataclass
class KTOStats(PreferenceStats):
    desirable: int = 0
    undesirable: int = 0


def split_labelled(
    row: dict, formatting: str = "auto", columns: dict[str, str] | None = None
) -> list[tuple[list[dict], list[dict], bool, float | None]]:
    """``[(prompt_messages, answer_messages, desirable, margin), ...]`` of one row: one for an
    unpaired row, two for a preference pair (its ``margin`` kept, so the recipe can refuse it).
    Raises DataError naming the field."""
    if not isinstance(row, dict):
        raise DataError(f"row is a {type(row).__name__}, not an object")
    mapped = {**row, **{t: row[s] for t, s in (columns or {}).items() if s in row}}
    if formatting == "auto" and is_unpaired_preference(mapped):
        if mapped["completion"] in ("", [], {}, None):
            raise DataError("completion is empty")
        prompt = _messages(mapped["prompt"], "user", "prompt")
        answer = _messages(mapped["completion"], "assistant", "completion")
        if not any(m["content"].strip() for m in answer):
            raise DataError("completion is empty")
        return [(prompt, answer, mapped["label"], None)]  # a bool: is_unpaired_preference
    prompt, chosen, rejected, margin = split_pair(row, formatting, columns)
    return [(prompt, chosen, True, margin), (prompt, rejected, False, margin)]


def prepare_kto(
    rows: list[dict],
    tokenizer,
    max_length: int,
    truncation: str = "truncate",
    formatting: str = "auto",
    columns: dict[str, str] | None = None,
    skip_bad_rows: bool = False,
    source: str = "dataset",
    max_prompt_length: int | None = None,
) -> tuple[list[KTOExample], KTOStats]:
    """Tokenize rows into :class:`KTOExample` (see the module doc), cut to ``max_length``.

    A bad row raises with its index unless ``skip_bad_rows`` (then it is counted). An answer the
    length rule would cut is dropped with ``truncation="drop"``. Fails when fewer than two
    different prompts remain: the KL point needs an answer scored after a prompt it does not
    answer.
    """
    prompt_budget(max_length, max_prompt_length)  # a bad budget fails before any row is read
    stats = KTOStats(rows=len(rows))
    full = []  # (prompt ids, answer ids, label, margin, row)
    for idx, row in enumerate(rows):
        try:
            items = []
            for prompt, answer, label, margin in split_labelled(row, formatting, columns):
                p_ids, a_ids, _ = tokenize_pair(tokenizer, prompt, answer, answer)
                if not p_ids:
                    raise DataError("the prompt has no tokens")
                if not a_ids:
                    raise DataError("an answer has no tokens after the prompt")
                items.append((p_ids, a_ids, label, margin, idx))
        except DataError as e:
            if not skip_bad_rows:
                raise DataError(f"{row_name(rows, idx, source)}: {e}") from None
            stats.bad_rows += 1
            stats.bad_examples.append(f"{row_name(rows, idx, source)}: {e}")
            continue
        full += items
    examples = _cut_and_mismatch(full, max_length, truncation, max_prompt_length, stats)
    if not examples:
        why = (
            "every usable answer is to one prompt; KTO's KL reference point scores an answer "
            "after a prompt it does not answer, so it needs at least two prompts"
            if len(full) > stats.dropped_too_long
            else "no usable answers"
        )
        raise DataError(f"{source}: {why} ({len(rows)} rows, {stats.as_dict()})")
    stats.used = len(examples)
    return examples, stats


class _Cut(NamedTuple):
    prompt: list[int]  # cut by the length rule
    answer: list[int]  # cut by the length rule
    full_answer: list[int]
    label: bool
    margin: float | None
    row: int
    prompt_key: str  # the prompt's tokens before cutting
    prompt_cut: bool
    answer_cut: bool


def _cut_and_mismatch(full, max_length, truncation, max_prompt_length, stats) -> list[KTOExample]:
    """Cut each (prompt, answer) by the length rule, then give it the answer of the next example
    (cyclically, in data order) whose prompt differs, cut to fit after this prompt."""
    kept: list[_Cut] = []
    for p_ids, a_ids, label, margin, idx in full:
        prompt, answer = cut(p_ids, a_ids, max_length, max_prompt_length)
        p_cut, a_cut = len(prompt) < len(p_ids), len(answer) < len(a_ids)
        if (p_cut or a_cut) and truncation == "drop":
            stats.dropped_too_long += 1
            continue
        key = hashlib.sha1(json.dumps(p_ids).encode()).hexdigest()[:16]
        kept.append(_Cut(prompt, answer, a_ids, label, margin, idx, key, p_cut, a_cut))
    out, n = [], len(kept)
    for i, c in enumerate(kept):
        j = next(
            (j % n for j in range(i + 1, i + n) if kept[j % n].prompt_key != c.prompt_key), None
        )
        if j is None:
            continue  # every answer has this prompt: the caller refuses the data
        other = kept[j].full_answer
        ex = KTOExample(
            prompt_ids=c.prompt, chosen_ids=c.answer, rejected_ids=other[: max_length - len(c.prompt)],
            margin=c.margin, truncated=c.prompt_cut or c.answer_cut, index=c.row,
            lengths=(len(c.full_answer), len(other)), prompt_key=c.prompt_key, label=c.label,
        )  # fmt: skip
        stats.truncated += ex.truncated
        stats.prompt_truncated += c.prompt_cut
        stats.answer_truncated += c.answer_cut
        stats.with_margin += c.margin is not None
        stats.desirable += c.label
        stats.undesirable += not c.label
        stats.tokens += len(ex)
        out.append(ex)
    return out
