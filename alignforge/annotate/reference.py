"""Reference judge: compares two extraction answers with the gold answer, aspect by aspect.

    from alignforge.annotate.reference import ReferenceJudge, reference_verdict, read_references
    v = reference_verdict(a_text, b_text, gold, {"entities": "entity_f1", "summary": "format"})
    v.scores                     # {'entities': 1, 'summary': 0}; + means a is better
    v.a["entity_f1"], v.b["entity_f1"]                                  # why
    run_judge(store, ReferenceJudge(read_references("gold.jsonl")), "reference", questions)

Each aspect key is answered by one *measure* of each side against the gold
(``annotate.yaml: reference_measures``; the defaults read the project's default aspects):

* ``entity_f1``, ``relation_f1``, ``f1``, ``lenient_f1``: the extraction task's item F1s
  (``alignforge.evaluate.tasks.extraction``: exact or lenient matching, multiset counts), so
  the judge prefers what the task metric, and therefore the PPO task reward, prefers;
* ``format`` ("concise, valid output"): 1 for JSON the task reads with no format problem,
  0.5 when it reads it but the task page flags a problem (text around the JSON, a code fence,
  several JSON values, a cut-off, entries that do not parse), 0 when it cannot read it. The
  default aspects have no gold summary to compare with, so ``summary`` is answered by it.

The verdict on an aspect is the sign of the difference (scale ``ab``). On ``likert5`` a
difference above 0.5 is "much better" (2), any other non-zero one "better" (1). Equal measures
are a tie. The overall preference is the sum of the aspects, as for every judgement.
Deterministic: the same texts and gold give the same verdict, whatever order they come in.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

from alignforge.annotate.importer import RowError
from alignforge.annotate.judge import JudgeError, PairVerdict

MUCH_BETTER = 0.5  # a measure difference above this is "much better" on the 5-point scale
EPS = 1e-9


class ReferenceVerdict(NamedTuple):
    scores: dict[str, int]  # aspect -> verdict on the project's scale, + means a is better
    a: dict[str, Any]  # a's measures (entity_f1, relation_f1, f1, lenient_f1, format, problems)
    b: dict[str, Any]


def side_measures(text: str, gold: Any, finish_reason: str | None = None) -> dict[str, Any]:
    """Every measure of one answer against ``gold`` (anything the extraction task reads)."""
    from alignforge.annotate.render import parse_completion
    from alignforge.evaluate.tasks.extraction import ExtractionTask, read_prediction

    item = ExtractionTask().score_item(text, gold)
    out: dict[str, Any] = {k: float(item.values[k]) for k in ("entity_f1", "relation_f1", "f1",
                                                             "lenient_f1")}  # fmt: skip
    _, error, invalid = read_prediction(text)
    if error:
        out.update(format=0.0, problems=[error])
        return out
    problems = sorted({f.code for f in parse_completion(text, finish_reason).flags})
    problems += ["invalid_entries"] * bool(invalid)
    out.update(format=0.5 if problems else 1.0, problems=problems)
    return out


def verdict(x: float, y: float, scale: str) -> int:
    """+ when ``x`` beats ``y``: 1 (``ab``), or 1 / 2 (``likert5``, 2 above ``MUCH_BETTER``)."""
    d = x - y
    if abs(d) <= EPS:
        return 0
    sign = 1 if d > 0 else -1
    return sign * (2 if scale == "likert5" and abs(d) > MUCH_BETTER else 1)


def reference_verdict(
    a: str, b: str, gold: Any, measures: dict[str, str], scale: str = "ab",
    finish_reasons: tuple[str | None, str | None] = (None, None),
) -> ReferenceVerdict:  # fmt: skip
    """Per-aspect verdicts of ``a`` against ``b``; ``measures`` maps aspect key -> measure."""
    ma = side_measures(a, gold, finish_reasons[0])
    mb = side_measures(b, gold, finish_reasons[1])
    scores = {k: verdict(ma[m], mb[m], scale) for k, m in measures.items()}
    return ReferenceVerdict(scores, ma, mb)


def aspect_measures(keys: list[str], configured: dict[str, str]) -> dict[str, str]:
    """The measure of every aspect key; an aspect without one is a one-line error naming it."""
    from alignforge.annotate.config import REFERENCE_MEASURES

    missing = [k for k in keys if k not in configured]
    if missing:
        raise JudgeError(
            f"aspect {missing[0]!r} has no reference measure; add it to reference_measures in "
            f"annotate.yaml ({', '.join(REFERENCE_MEASURES)})"
        )
    return {k: configured[k] for k in keys}


class ReferenceJudge:
    """A judge for ``run_judge`` (and the simulated panel) that reads gold answers by prompt id.

    ``references``: prompt_id -> gold answer. ``measures``: aspect key -> measure (default:
    ``annotate.yaml``'s default ``reference_measures``).
    """

    def __init__(self, references: dict[str, Any], measures: dict[str, str] | None = None):
        from alignforge.annotate.config import AnnotateConfig

        self.references = {str(k): v for k, v in references.items()}
        self.measures = measures or AnnotateConfig().reference_measures

    def reference_of(self, item: dict[str, Any]) -> Any:
        gold = self.references.get(str(item.get("prompt_id")))
        if gold is None:
            raise JudgeError(
                f"item {item.get('id')}: no reference answer for prompt_id "
                f"{item.get('prompt_id')!r}; add it to the references file"
            )
        return gold

    def judge_item(self, item: dict[str, Any], questions: dict[str, str], scale: str = "ab"):
        """The item's verdict (a ``PairVerdict``, always consistent) and why (``why``)."""
        measures = aspect_measures(list(questions), self.measures)
        meta = item.get("meta") or {}
        reasons = tuple((meta.get(s) or {}).get("finish_reason") for s in ("a", "b"))
        try:
            v = reference_verdict(item["a_text"], item["b_text"], self.reference_of(item),
                                  measures, scale, reasons)  # fmt: skip
        except ValueError as e:  # a gold answer the extraction task cannot read
            raise JudgeError(f"item {item.get('id')}: reference answer: {e}") from None
        why = {"judge": "reference", "measures": measures, "a": v.a, "b": v.b}
        return PairVerdict(v.scores, dict.fromkeys(v.scores, True), [], why)


def read_references(path: str | Path) -> dict[str, Any]:
    """``{prompt_id: gold}`` from a JSONL file of ``{"prompt_id" (or "id"), "reference"}`` rows.

    The gold answer is anything the extraction task reads: ``{"entities": [...], "relations":
    [...]}``, its JSON text, or the ``[NAME - TYPE, ...]`` list. Errors name the line and field.
    """
    from pydantic import ValidationError

    from alignforge.data import DataError, read_rows
    from alignforge.evaluate.tasks.extraction import to_reference

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"references file {path} does not exist")
    try:
        rows = read_rows(path)  # malformed lines are named by file and line there
    except DataError as e:
        raise RowError(str(e)) from None
    out: dict[str, Any] = {}
    for i, row in enumerate(rows):
        where = rows.where(i)
        pid = row.get("prompt_id", row.get("id"))
        if pid is None:
            raise RowError(f"{where}: field 'prompt_id' (or 'id') is missing")
        if "reference" not in row:
            raise RowError(f"{where}: field 'reference' is missing")
        try:
            to_reference(row["reference"])
        except (ValueError, ValidationError) as e:
            msg = str(e).splitlines()[0]
            raise RowError(f"{where}: field 'reference': {msg}") from None
        out[str(pid)] = row["reference"]
    return out
