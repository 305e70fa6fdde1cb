"""Export judgements as a preference dataset that DPO and reward-model trainers read.

    from alignforge.annotate.export import export_dataset
    report = export_dataset("ann/", "data/prefs", ties="drop", low_agreement="drop",
                            min_agreement=0.6)
    # data/prefs/train.jsonl, validation.jsonl, test.jsonl (+ .parquet with fmt="both")

One record per item: ``prompt`` (the string, or the chat messages), ``chosen``, ``rejected``
(strings, or ``[{"role": "assistant", ...}]`` when the prompt is a chat, which is TRL's
conversational format), ``margin`` = |mean summed aspect score|, ``aspect_scores`` (oriented so
that positive favours ``chosen``), ``annotators``, ``agreement`` (share of raters on the
largest side), ``agreement_ceiling``, ``simulated``, ``prompt_id``, ``doc_id``, ``split``,
``policy``, ``pair_id``.

Several raters on one item are combined as follows. ``agreement`` is the share of raters on the
largest side of the overall preference (sign of the summed aspects: a, tie or b); a 1-1 split
between a and b has no majority and counts as a tie. With
``low_agreement="drop"`` an item whose agreement is below ``min_agreement`` is dropped. With
``low_agreement="majority"`` only the majority's judgements are kept, whatever the agreement.
The remaining judgements are averaged. Ties are then handled by ``ties``: ``drop``;
``margin0``, which keeps them once with margin 0 and ``tie: true``; or ``both``, which keeps
them in both orders with margin 0. Pairs without a split go to ``train``.

An item an admin adjudicated (``/admin/adjudicate``) takes the admin's decision as its scores,
whatever the raters' agreement, with ``adjudicated: true``; this applies to the ``humans`` and
``all`` exports, not to a judge's or one annotator's.

``agreement_ceiling`` is the expected accuracy of a perfect model against the record's label,
which the reward model reports its accuracy against. The raters' agreement on the direction,
over pairs of decisive judgements of one item, gives each rater's accuracy q
(``agreement.rater_accuracy``). A label made from n decisive raters is then right with
probability ``agreement.majority_accuracy(q, n)``: q for one rater, which the raw ``agreement``
(1.0 for one rater) cannot say. It is null for ties, adjudicated items, and exports without
any item judged twice.

``simulated`` is true when any of the record's raters is a simulated annotator
(``annotate/panel.py``). The ``humans`` export never holds them; ask for ``simulated`` or
``all``.
"""

from __future__ import annotations

import json
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, NamedTuple

from alignforge.annotate.agreement import decisive_agreement, majority_accuracy, rater_accuracy
from alignforge.annotate.store import Judgement, Store

TIE_POLICIES = ("drop", "margin0", "both")
LOW_AGREEMENT_POLICIES = ("drop", "majority")


class Aggregate(NamedTuple):
    score: float  # mean overall score, + means item.a is better
    aspects: dict[str, float]
    raters: list[str]
    agreement: float
    adjudicated: bool = False  # the scores are an admin's decision on a disagreement


class ExportReport(NamedTuple):
    n_items_judged: int
    n_records: int
    n_ties_dropped: int
    n_low_agreement_dropped: int
    per_split: dict[str, int]
    files: list[str]
    agreement_ceiling: float | None = None  # mean over the records (see the module docstring)


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


def aggregate(js: list[Judgement], low_agreement: str, min_agreement: float) -> Aggregate | None:
    """Combine the judgements of one item (see the module docstring); None = dropped."""
    counts = Counter(_sign(j.overall) for j in js)
    top = max(counts.values())
    leaders = [s for s, c in counts.items() if c == top]
    majority = leaders[0] if len(leaders) == 1 else 0
    agreement = top / len(js)
    if low_agreement == "drop" and agreement < min_agreement:
        return None
    if low_agreement == "majority" and counts.get(majority, 0) > 0:
        js = [j for j in js if _sign(j.overall) == majority]
    keys = sorted({k for j in js for k in j.scores})
    aspects = {k: sum(j.scores.get(k, 0) for j in js) / len(js) for k in keys}
    score = sum(j.overall for j in js) / len(js)
    return Aggregate(score, aspects, [j.user for j in js], agreement)


def adjudicated(js: list[Judgement], decision: dict[str, Any]) -> Aggregate:
    """The admin's decision replaces the raters' mean; raters and their agreement are kept."""
    counts = Counter(_sign(j.overall) for j in js)
    return Aggregate(float(decision["overall"]),
                     {k: float(v) for k, v in sorted(decision["scores"].items())},
                     [j.user for j in js], max(counts.values()) / len(js), True)  # fmt: skip


def select(js: list[Judgement], annotators: str) -> list[Judgement]:
    """'humans' (default: annotators, and admins marked as annotating), 'admins' (the other
    admins' judgements), 'judge' (every AI judge), 'simulated' (the simulated annotators),
    'all', or one user name."""
    roles = {"humans": "annotator", "admins": "admin", "judge": "judge", "simulated": "simulated"}
    if annotators in roles:
        return [j for j in js if j.role == roles[annotators]]
    if annotators == "all":
        return js
    return [j for j in js if j.user == annotators]


def label_accuracy(by_item: dict[int, list[Judgement]]) -> float:
    """Each rater's accuracy q implied by the raters' agreement on the overall direction (nan
    when no item has two decisive judgements)."""
    directions = {i: {j.user: _sign(j.overall) for j in js} for i, js in by_item.items()}
    return rater_accuracy(decisive_agreement(directions)[0])


def _ceiling(js: list[Judgement], agg: Aggregate, q: float) -> float | None:
    """The label's expected accuracy for a perfect model; None for an admin's decision."""
    n = sum(_sign(j.overall) != 0 for j in js)
    if agg.adjudicated or n == 0 or math.isnan(q):
        return None
    return majority_accuracy(q, n)


def _record(
    it: dict[str, Any], agg: Aggregate, flip: bool, tie: bool, ceiling: float | None = None,
    simulated: bool = False,
) -> dict[str, Any]:  # fmt: skip
    sign = -1 if flip else 1
    chosen, rejected = (it["b_text"], it["a_text"]) if flip else (it["a_text"], it["b_text"])
    cid, rid = (it["b_id"], it["a_id"]) if flip else (it["a_id"], it["b_id"])
    chat = isinstance(it["prompt"], list)
    return {
        "prompt": it["prompt"],
        "chosen": [{"role": "assistant", "content": chosen}] if chat else chosen,
        "rejected": [{"role": "assistant", "content": rejected}] if chat else rejected,
        "margin": 0.0 if tie else abs(agg.score),
        "aspect_scores": {k: sign * v for k, v in agg.aspects.items()},
        "tie": tie,
        "annotators": agg.raters,
        "n_annotators": len(agg.raters),
        "agreement": agg.agreement,
        "agreement_ceiling": ceiling,
        "simulated": simulated,
        "adjudicated": agg.adjudicated,
        "prompt_id": it["prompt_id"],
        "doc_id": it["doc_id"],
        "split": it["split"] or "train",
        "policy": (it["meta"] or {}).get("policy"),
        "pair_id": it["pair_key"],
        "chosen_id": cid,
        "rejected_id": rid,
        "kind": it["kind"],
    }


def build_records(
    store: Store, ties: str = "drop", low_agreement: str = "drop", min_agreement: float = 0.0,
    annotators: str = "humans", kind: str | None = "pair",
) -> tuple[list[dict[str, Any]], ExportReport]:  # fmt: skip
    if ties not in TIE_POLICIES:
        raise ValueError(f"ties must be one of {', '.join(TIE_POLICIES)}, got {ties!r}")
    if low_agreement not in LOW_AGREEMENT_POLICIES:
        raise ValueError(
            f"low_agreement must be one of {', '.join(LOW_AGREEMENT_POLICIES)}, got {low_agreement!r}"
        )
    if not 0.0 <= min_agreement <= 1.0:
        raise ValueError(f"min_agreement must be in [0, 1], got {min_agreement}")
    records, n_ties, n_low = [], 0, 0
    with store.connect() as conn:
        by_item: dict[int, list[Judgement]] = defaultdict(list)
        for j in select(store.judgements(conn), annotators):
            by_item[j.item_id].append(j)
        # decisions resolve the humans' disagreements; a judge's or one person's export is raw
        decided = store.adjudications(conn) if annotators in ("humans", "all") else {}
        q = label_accuracy(by_item)
        for item_id in sorted(by_item):
            it = store.item(conn, item_id)
            if kind is not None and it["kind"] != kind:
                continue
            if item_id in decided:
                agg = adjudicated(by_item[item_id], decided[item_id])
            else:
                agg = aggregate(by_item[item_id], low_agreement, min_agreement)
            if agg is None:
                n_low += 1
                continue
            js = by_item[item_id]
            sim = any(j.role == "simulated" for j in js)
            if agg.score == 0:
                if ties == "drop":
                    n_ties += 1
                    continue
                records.append(_record(it, agg, False, True, None, sim))
                if ties == "both":
                    records.append(_record(it, agg, True, True, None, sim))
                continue
            records.append(_record(it, agg, agg.score < 0, False, _ceiling(js, agg, q), sim))
    per = Counter(r["split"] for r in records)
    ceilings = [r["agreement_ceiling"] for r in records if r["agreement_ceiling"] is not None]
    mean = sum(ceilings) / len(ceilings) if ceilings else None
    return records, ExportReport(len(by_item), len(records), n_ties, n_low, dict(per), [], mean)


def write_records(records: list[dict[str, Any]], out: str | Path, fmt: str = "jsonl") -> list[str]:
    """``out`` ending in .jsonl/.parquet: one file with a split column; else a directory with one
    file per split. ``fmt``: jsonl, parquet (needs pyarrow) or both."""
    out = Path(out)
    if fmt not in ("jsonl", "parquet", "both"):
        raise ValueError(f"fmt must be jsonl, parquet or both, got {fmt!r}")
    if out.suffix in (".jsonl", ".parquet"):
        groups = {out.with_suffix(""): records}
        fmt = out.suffix[1:]
    else:
        out.mkdir(parents=True, exist_ok=True)
        groups = defaultdict(list)
        for r in records:
            groups[out / r["split"]].append(r)
    files = []
    for stem, rows in groups.items():
        stem.parent.mkdir(parents=True, exist_ok=True)
        if fmt in ("jsonl", "both"):
            p = stem.with_suffix(".jsonl")
            tmp = p.with_suffix(".jsonl.tmp")
            with tmp.open("w", encoding="utf-8") as f:
                for r in rows:
                    f.write(json.dumps(r, ensure_ascii=False) + "\n")
            tmp.replace(p)
            files.append(str(p))
        if fmt in ("parquet", "both"):
            files.append(_write_parquet(rows, stem.with_suffix(".parquet")))
    return files


def _write_parquet(rows: list[dict[str, Any]], path: Path) -> str:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise RuntimeError("Parquet export needs pyarrow: pip install pyarrow") from None
    # nested values that vary in shape (prompt str vs messages, policy) are kept as JSON text
    flat = [
        {k: (json.dumps(v, ensure_ascii=False) if isinstance(v, (dict, list)) and k not in
             ("annotators",) else v) for k, v in r.items()}
        for r in rows
    ]  # fmt: skip
    pq.write_table(pa.Table.from_pylist(flat), path)
    return str(path)


def export_dataset(
    project_dir: str | Path, out: str | Path, ties: str = "drop", low_agreement: str = "drop",
    min_agreement: float = 0.0, annotators: str = "humans", fmt: str = "jsonl",
) -> ExportReport:  # fmt: skip
    records, rep = build_records(Store(project_dir), ties, low_agreement, min_agreement, annotators)
    files = write_records(records, out, fmt)
    return rep._replace(files=files)
