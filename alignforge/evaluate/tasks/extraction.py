"""Entity and relation extraction: structured JSON output scored by exact-match and lenient F1.

    >>> task = ExtractionTask()
    >>> gold = {"entities": [{"name": "Acme Corp", "type": "ORGANIZATION"}], "relations": []}
    >>> task.reward('```json\\n{"entities": [{"name": "Acme Corp", "type": "ORGANIZATION"}]}\\n```', gold)
    1.0

Output schema (``ExtractionOutput``)::

    {"entities":  [{"name": str, "type": str, "description"?: str}],
     "relations": [{"source": str, "relation": str, "target": str, "description"?: str}],
     "summary"?: str}

Matching rules
--------------
* **exact**: an entity is the key (name, type), a relation (source, relation, target). Strings
  are compared case-sensitively after stripping and collapsing runs of whitespace to one space
  (``"Acme  Corp "`` == ``"Acme Corp"`` but != ``"ACME Corp"``).
* **lenient**: strings are NFKC-normalised, case-folded, punctuation replaced by spaces and
  whitespace collapsed (``"Acme, Corp."`` == ``"acme corp"``). After pairing equal normalised
  keys, each remaining gold item is paired greedily, in listing order, with the first remaining
  prediction whose type (relation: relation label) is equal and whose name (relation: source and
  target) contains the other as a whole-word sequence (``"Silicon Valley Bank"`` ~ ``"Bank"``).
* **multiset semantics**: keys are counted, not deduplicated. A gold entity listed twice needs
  two matching predictions for two true positives; a prediction repeated three times against one
  gold copy gives 1 TP and 2 FP. (Mention-level gold such as ner_finance lists every mention.)
* **F1** = 2·TP / (2·TP + FP + FN). Dataset metrics are micro-averaged: TP/FP/FN are summed over
  items first; the bootstrap resamples items' (TP, FP, FN) rows. ``f1`` pools entities and
  relations. When gold and prediction are both empty the item F1 is 1.0 (nothing to find,
  nothing found); a metric whose TP+FP+FN is 0 over the whole dataset is not reported.
* **parse failures** (no JSON object, or neither ``entities`` nor ``relations``) score 0: every
  gold item counts as a false negative, the item reward is 0, and the failure is counted. A bare
  JSON list is read as the entity list. Entries that are not objects with string fields (name,
  type / source, relation, target) are dropped and counted as ``invalid_entries``.
* **reward** = the item's F1 (``reward_metric``: ``f1``, ``entity_f1``, ``relation_f1`` or
  ``lenient_f1``), i.e. the same per-item scoring the metric sums. With
  ``marginal_reward=True`` a batch of answers is rewarded by what each adds to the batch's pooled
  micro-F1 (``Task.rewards``, :func:`~alignforge.evaluate.tasks.base.marginal_values`): an empty
  answer to a sentence without entities then earns 0, not the item F1's 1.0.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from alignforge.evaluate.parsing import parse_json_output
from alignforge.evaluate.tasks.base import Example, ItemScore, Metric, Task

# ---- schema --------------------------------------------------------------------------------


class Entity(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: str
    type: str
    description: str | None = None


class Relation(BaseModel):
    model_config = ConfigDict(extra="ignore")
    source: str
    relation: str
    target: str
    description: str | None = None


class ExtractionOutput(BaseModel):
    model_config = ConfigDict(extra="ignore")
    entities: list[Entity] = []
    relations: list[Relation] = []
    summary: str | None = None


SYSTEM_PROMPT = (
    "Extract the named entities and the relations between them from the user's text. Answer "
    'with JSON only: {"entities": [{"name": ..., "type": ...}], "relations": [{"source": ..., '
    '"relation": ..., "target": ...}]}. Copy names exactly as written.'
)

# ---- normalisation and matching ------------------------------------------------------------


def exact_norm(s: str) -> str:
    """Strip and collapse whitespace; case and punctuation are kept."""
    return " ".join(s.split())


def lenient_norm(s: str) -> str:
    """NFKC, casefold, punctuation -> space, collapse whitespace."""
    s = unicodedata.normalize("NFKC", s).casefold()
    s = "".join(" " if unicodedata.category(ch).startswith("P") else ch for ch in s)
    return " ".join(s.split())


def _contains(a: str, b: str) -> bool:
    """Either normalised name contains the other as a whole-word sequence."""
    if not a or not b:
        return False
    if a == b:
        return True
    short, long_ = (a, b) if len(a) <= len(b) else (b, a)
    return re.search(rf"(?:^| ){re.escape(short)}(?: |$)", long_) is not None


def multiset_counts(gold: Sequence[tuple], pred: Sequence[tuple]) -> tuple[int, int, int]:
    """(TP, FP, FN) with multiset semantics: TP = sum over keys of min(count_gold, count_pred)."""
    g, p = Counter(gold), Counter(pred)
    tp = sum((g & p).values())
    return tp, len(pred) - tp, len(gold) - tp


def lenient_counts(
    gold: Sequence[tuple], pred: Sequence[tuple], similar: Callable[[tuple, tuple], bool]
) -> tuple[int, int, int]:
    """Equal keys paired first (multiset), then greedy pairing of the rest by ``similar``."""
    g, p = Counter(gold), Counter(pred)
    both = g & p
    tp = sum(both.values())
    rest_g = list((g - both).elements())
    rest_p = list((p - both).elements())
    for gk in rest_g:
        j = next((j for j, pk in enumerate(rest_p) if similar(gk, pk)), None)
        if j is not None:
            rest_p.pop(j)
            tp += 1
    return tp, len(pred) - tp, len(gold) - tp


def _entity_similar(g: tuple, p: tuple) -> bool:
    return g[1] == p[1] and _contains(g[0], p[0])


def _relation_similar(g: tuple, p: tuple) -> bool:
    return g[1] == p[1] and _contains(g[0], p[0]) and _contains(g[2], p[2])


def f1_from_counts(tp: float, fp: float, fn: float) -> float:
    """2TP / (2TP + FP + FN); 1.0 when there was nothing to find and nothing was predicted."""
    denom = 2 * tp + fp + fn
    return 1.0 if denom == 0 else 2 * tp / denom


def micro_f1(a: np.ndarray) -> float:
    """Micro F1 of (items x 3) rows of (TP, FP, FN)."""
    tp, fp, fn = a.sum(axis=0)
    return f1_from_counts(tp, fp, fn)


def micro_precision(a: np.ndarray) -> float:
    tp, fp, _ = a.sum(axis=0)
    return 1.0 if tp + fp == 0 else float(tp / (tp + fp))


def micro_recall(a: np.ndarray) -> float:
    tp, _, fn = a.sum(axis=0)
    return 1.0 if tp + fn == 0 else float(tp / (tp + fn))


# ---- reading gold and predictions ----------------------------------------------------------

_BRACKET_ITEM = re.compile(r"^(.*) - ([A-Z_]+)$")


def parse_bracket_entities(text: str) -> ExtractionOutput:
    """Gold in the ``[NAME - TYPE, NAME - TYPE]`` / ``No entities found`` format (ner_finance)."""
    text = text.strip()
    if text.lower().rstrip(".") == "no entities found":
        return ExtractionOutput()
    if not (text.startswith("[") and text.endswith("]")):
        raise ValueError(f"expected '[NAME - TYPE, ...]' or 'No entities found', got {text[:80]!r}")
    entities = []
    for part in filter(None, (p.strip() for p in text[1:-1].split(", "))):
        m = _BRACKET_ITEM.match(part)
        if not m:
            raise ValueError(f"entity {part!r} is not of the form 'NAME - TYPE'")
        entities.append(Entity(name=m.group(1), type=m.group(2)))
    return ExtractionOutput(entities=entities)


def to_reference(ref: Any) -> ExtractionOutput:
    """Gold as ``ExtractionOutput`` from a dict, a model, JSON text or the bracket format."""
    if isinstance(ref, ExtractionOutput):
        return ref
    if isinstance(ref, str):
        stripped = ref.strip()
        if stripped.startswith("{"):
            ref = json.loads(stripped)
        else:
            return parse_bracket_entities(stripped)
    if isinstance(ref, list):
        ref = {"entities": ref}
    if not isinstance(ref, dict):
        raise ValueError(f"reference must be an object with 'entities', got {type(ref).__name__}")
    return ExtractionOutput.model_validate(ref)


def read_prediction(text: str) -> tuple[ExtractionOutput | None, str | None, int]:
    """(output, error, invalid_entries) from raw model text; never raises."""
    value, error = parse_json_output(text)
    if error:
        return None, error, 0
    if isinstance(value, list):
        value = {"entities": value}
    if not isinstance(value, dict) or not ({"entities", "relations"} & value.keys()):
        return None, "JSON has neither 'entities' nor 'relations'", 0
    out, invalid = ExtractionOutput(), 0
    for field, cls, target in (
        ("entities", Entity, out.entities),
        ("relations", Relation, out.relations),
    ):
        raw = value.get(field) or []
        if not isinstance(raw, list):
            return None, f"'{field}' is {type(raw).__name__}, not a list", 0
        for entry in raw:
            try:
                target.append(cls.model_validate(entry))
            except ValidationError:
                invalid += 1
    if isinstance(value.get("summary"), str):
        out.summary = value["summary"]
    return out, None, invalid


# ---- the task ------------------------------------------------------------------------------

_COUNT_GROUPS = {
    # metric prefix -> (entity columns, relation columns) summed into the pooled columns
    "": ("ent", "rel"),
    "lenient_": ("lent", "lrel"),
}


class ExtractionTask(Task):
    name = "extraction"
    system_prompt = SYSTEM_PROMPT
    primary = "f1"
    output_schema = ExtractionOutput
    prompt_keys = ("text", "document", "prompt", "input")
    reference_keys = ("reference", "output", "ideal", "completion")

    def example(self, row: dict[str, Any], index: int) -> Example:
        if isinstance(row, dict) and "ideal" in row and isinstance(row.get("input"), list):
            row = ner_finance_row(row, index)
        ex = super().example(row, index)
        try:
            return ex._replace(reference=to_reference(ex.reference).model_dump(exclude_none=True))
        except (ValueError, ValidationError) as e:
            raise ValueError(f"row {index}: bad reference: {e}") from None

    def score_item(self, prediction: str, reference: Any) -> ItemScore:
        gold = to_reference(reference)
        g_ent = [(exact_norm(e.name), exact_norm(e.type)) for e in gold.entities]
        g_rel = [
            tuple(exact_norm(x) for x in (r.source, r.relation, r.target)) for r in gold.relations
        ]
        pred, error, invalid = read_prediction(prediction)
        p_ent = [(exact_norm(e.name), exact_norm(e.type)) for e in pred.entities] if pred else []
        p_rel = (
            [tuple(exact_norm(x) for x in (r.source, r.relation, r.target)) for r in pred.relations]
            if pred
            else []
        )
        counts = {
            "ent": multiset_counts(g_ent, p_ent),
            "rel": multiset_counts(g_rel, p_rel),
            "lent": lenient_counts(_lk(g_ent), _lk(p_ent), _entity_similar),
            "lrel": lenient_counts(_lk(g_rel), _lk(p_rel), _relation_similar),
        }
        values: dict[str, float] = {}
        for key, (tp, fp, fn) in counts.items():
            values.update({f"{key}_tp": tp, f"{key}_fp": fp, f"{key}_fn": fn})
        for prefix, (ent, rel) in _COUNT_GROUPS.items():
            for c in ("tp", "fp", "fn"):
                values[f"{prefix}{c}"] = values[f"{ent}_{c}"] + values[f"{rel}_{c}"]
        item_f1 = {
            "f1": ("tp", "fp", "fn"),
            "entity_f1": ("ent_tp", "ent_fp", "ent_fn"),
            "relation_f1": ("rel_tp", "rel_fp", "rel_fn"),
            "lenient_f1": ("lenient_tp", "lenient_fp", "lenient_fn"),
        }
        for name, cols in item_f1.items():
            values[name] = 0.0 if pred is None else f1_from_counts(*(values[c] for c in cols))
        detail = {
            "entity_types": _per_type(g_ent, p_ent, 1),
            "relation_types": _per_type(g_rel, p_rel, 1),
            "invalid_entries": invalid,
        }
        return ItemScore(values, pred is not None, error, detail)

    def metrics(self) -> list[Metric]:
        out = []
        for name, cols in (
            ("f1", ("tp", "fp", "fn")),
            ("entity_f1", ("ent_tp", "ent_fp", "ent_fn")),
            ("relation_f1", ("rel_tp", "rel_fp", "rel_fn")),
            ("lenient_f1", ("lenient_tp", "lenient_fp", "lenient_fn")),
            ("lenient_entity_f1", ("lent_tp", "lent_fp", "lent_fn")),
            ("lenient_relation_f1", ("lrel_tp", "lrel_fp", "lrel_fn")),
        ):
            out.append(Metric(name, cols, micro_f1))
        out.append(Metric("precision", ("tp", "fp", "fn"), micro_precision))
        out.append(Metric("recall", ("tp", "fp", "fn"), micro_recall))
        return out

    def metric_applies(self, metric: Metric, rows: np.ndarray) -> bool:
        return metric.name == self.primary or bool(rows.sum() > 0)

    def breakdown(self, items: Sequence[ItemScore]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in ("entity_types", "relation_types"):
            totals: dict[str, list[int]] = {}
            for it in items:
                for t, c in (it.detail or {}).get(field, {}).items():
                    acc = totals.setdefault(t, [0, 0, 0])
                    for k in range(3):
                        acc[k] += c[k]
            out[field] = {t: _prf(*c) for t, c in sorted(totals.items())}
        n = len(items)
        failures = sum(not it.parsed for it in items)
        out["parse_failure_rate"] = failures / n if n else 0.0
        out["invalid_entries"] = sum((it.detail or {}).get("invalid_entries", 0) for it in items)
        errors = Counter(it.error for it in items if it.error)
        out["parse_errors"] = dict(errors.most_common(10))
        return out


def _lk(keys: Sequence[tuple]) -> list[tuple]:
    return [tuple(lenient_norm(x) for x in k) for k in keys]


def _per_type(gold: Sequence[tuple], pred: Sequence[tuple], type_index: int) -> dict:
    """{type: [TP, FP, FN]} with multiset matching restricted to each type."""
    types = {k[type_index] for k in gold} | {k[type_index] for k in pred}
    return {
        t: list(
            multiset_counts(
                [k for k in gold if k[type_index] == t], [k for k in pred if k[type_index] == t]
            )
        )
        for t in types
    }


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {
        "precision": p,
        "recall": r,
        "f1": f1_from_counts(tp, fp, fn) if tp + fp + fn else 0.0,
        "tp": tp,
        "fp": fp,
        "fn": fn,
        "support": tp + fn,
    }


# ---- ner_finance ---------------------------------------------------------------------------

NER_FINANCE_PROMPT = (
    "Extract every named entity from the sentence, in order; repeat an entity each time it "
    "appears. Types: PERSON, ORGANIZATION, LOCATION. Copy names exactly as written. Answer with "
    'JSON only: {"entities": [{"name": "...", "type": "PERSON"}]}; if there are none, '
    '{"entities": []}.'
)


def ner_finance_row(row: dict[str, Any], index: int = 0) -> dict[str, Any]:
    """Convert a ner_finance row (``input`` = [system, user], ``ideal`` = bracket list) to
    ``{"id", "messages", "reference"}`` with our concise JSON prompt and schema."""
    try:
        user = next(m["content"] for m in row["input"] if m.get("role") == "user")
        gold = parse_bracket_entities(row["ideal"])
    except (StopIteration, KeyError, TypeError) as e:
        raise ValueError(f"row {index}: not a ner_finance row ({e!r})") from None
    except ValueError as e:
        raise ValueError(f"row {index}: field 'ideal': {e}") from None
    return {
        "id": str(row.get("id", index)),
        "messages": [
            {"role": "system", "content": NER_FINANCE_PROMPT},
            {"role": "user", "content": user},
        ],
        "reference": gold.model_dump(exclude_none=True),
    }


def load_ner_finance(path: str = "examples/data/ner_finance.jsonl") -> list[dict[str, Any]]:
    """Rows of ``ner_finance.jsonl`` in the extraction task's format (entities only)."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{i + 1}: invalid JSON: {e}") from None
                rows.append(ner_finance_row(raw, i))
    return rows
