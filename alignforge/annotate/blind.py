"""Blind test: two systems' outputs on the same inputs, judged without knowing which is which.

    from alignforge.annotate.blind import blind_items, blind_report
    items = blind_items("ours.jsonl", "frontier.jsonl", name_a="ours", name_b="frontier")
    store.insert_items(items); store.release("blind-1", None, kind="blind")
    rep = blind_report(store)             # from the humans; annotators="judge" for the AI judge
    rep[0].result.win.fmt(pct=True)       # '49.0% [39.0, 59.0]': ours preferred

Each system file holds one row per input: ``{"id" (or "prompt_id"), "prompt", "output"}``
(``completion``, ``text`` or ``response`` are read too). Rows are joined on the id; the
output of ``name_a`` becomes the item's ``a``. Sides are randomised per annotator when the
item is shown, and the system names are never sent to the browser. The outcome of an item is
the sign of the mean summed aspect score over its raters. Win / tie / loss are counted from
``name_a``'s side, with BCa bootstrap intervals from ``alignforge.evaluate.stats``.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, NamedTuple

from alignforge.annotate.export import select
from alignforge.annotate.importer import RowError
from alignforge.evaluate.stats import WinTieLoss, win_tie_loss

OUTPUT_KEYS = ("output", "completion", "text", "response")


def read_outputs(path: str | Path) -> dict[str, dict[str, Any]]:
    """``{id: {"prompt", "output"}}`` from a system's JSONL file; errors name line and field."""
    path = Path(path)
    out: dict[str, dict[str, Any]] = {}
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise RowError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise RowError(f"{path}:{n}: a row must be a JSON object")
            rid = row.get("id", row.get("prompt_id"))
            if rid is None:
                raise RowError(f"{path}:{n}: field 'id' (or 'prompt_id') is missing")
            text = next((row[k] for k in OUTPUT_KEYS if isinstance(row.get(k), str)), None)
            if text is None:
                raise RowError(f"{path}:{n}: field 'output' (a string) is missing")
            if "prompt" not in row:
                raise RowError(f"{path}:{n}: field 'prompt' is missing")
            if str(rid) in out:
                raise RowError(f"{path}:{n}: field 'id' repeats {rid!r}")
            out[str(rid)] = {"prompt": row["prompt"], "output": text, "split": row.get("split")}
    return out


def blind_items(path_a: str | Path, path_b: str | Path, name_a: str, name_b: str) -> list[dict]:
    a, b = read_outputs(path_a), read_outputs(path_b)
    common = sorted(set(a) & set(b))
    if not common:
        raise RowError(f"{path_a} and {path_b} share no id; blind tests pair outputs by id")
    return [
        {
            "pair_key": f"blind:{name_a}|{name_b}:{i}",
            "kind": "blind",
            "prompt_id": i,
            "split": "test",
            "prompt": a[i]["prompt"],
            "a_id": name_a,
            "b_id": name_b,
            "a_text": a[i]["output"],
            "b_text": b[i]["output"],
            "meta": {"system_a": name_a, "system_b": name_b},
        }
        for i in common
    ]


class BlindReport(NamedTuple):
    system_a: str
    system_b: str
    n_items: int
    n_judgements: int
    result: WinTieLoss  # from system_a's side


def blind_report(store, annotators: str = "humans", n_boot: int = 2000, seed: int = 0):
    """One ``BlindReport`` per (system_a, system_b) comparison in the project."""
    with store.connect() as conn:
        js = select(store.judgements(conn), annotators)
        rows = conn.execute("SELECT id, a_id, b_id FROM items WHERE kind='blind'").fetchall()
    systems = {r[0]: (r[1], r[2]) for r in rows}
    per_item: dict[int, list[float]] = defaultdict(list)
    for j in js:
        if j.item_id in systems:
            per_item[j.item_id].append(j.overall)
    by_pair: dict[tuple[str, str], list[str]] = defaultdict(list)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for item_id, scores in sorted(per_item.items()):
        mean = sum(scores) / len(scores)
        by_pair[systems[item_id]].append("win" if mean > 0 else "loss" if mean < 0 else "tie")
        counts[systems[item_id]] += len(scores)
    return [
        BlindReport(a, b, len(o), counts[(a, b)], win_tie_loss(o, n_boot=n_boot, seed=seed))
        for (a, b), o in sorted(by_pair.items())
    ]


def format_report(r: BlindReport) -> str:
    w = r.result
    rows = [
        (f"{r.system_a} preferred", w.win),
        ("no preference", w.tie),
        (f"{r.system_b} preferred", w.loss),
        ("win rate (tie = 1/2)", w.win_rate),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{r.system_a} vs {r.system_b}: {r.n_items} items, {r.n_judgements} judgements"]
    lines += [f"  {k:<{width}} : {e.fmt(pct=True)}" for k, e in rows]
    return "\n".join(lines)
