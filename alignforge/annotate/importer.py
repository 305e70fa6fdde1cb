"""Read preference samples (k completions per prompt) or ready-made pairs into annotation items.

    from alignforge.annotate.importer import read_items
    items, report = read_items("samples.jsonl", max_text_chars=100_000)
    report.n_rows, report.n_items, report.skipped      # counts

Two row shapes are accepted, one per line:

* sampling rows ``{"prompt_id", "doc_id", "split", "prompt", "policy", "completions": [...],
  "created_at"}``: all C(k, 2) pairs of the completions become items and keep the prompt's split
  (the split was set before pairing, so the pairs of one prompt never straddle two splits),
  except pairs of two identical texts (counted in ``report.identical``): there is nothing to
  judge in them, and a label on one (an annotator's side bias) is a pair no trainer accepts;
* pair rows ``{"pair_id"?, "prompt", "a", "b", "split"?, "source_document"?}``.

A malformed row raises ``ImportError_`` naming the file, line and field, unless ``skip_bad=True``,
which skips it and counts it in ``report.skipped`` (with the first few messages kept).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

from alignforge.errors import UserError

SPLITS = ("train", "validation", "test")


class RowError(UserError, ValueError):
    """A row of the input file is malformed; the message names the line and the field."""


class ImportReport(NamedTuple):
    n_rows: int
    n_items: int
    skipped: int
    errors: list[str]
    identical: int = 0  # pairs of a sampling row whose two completions have the same text


def read_items(
    path: str | Path, max_text_chars: int = 100_000, skip_bad: bool = False
) -> tuple[list[dict[str, Any]], ImportReport]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    items: list[dict[str, Any]] = []
    errors: list[str] = []
    split_of: dict[str, tuple[str, int]] = {}
    n_rows = identical = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            n_rows += 1
            try:
                row = _load_line(line, path, lineno)
                new = _row_items(row, max_text_chars)
                _check_split_leak(new, split_of, lineno)
                if "completions" in row:
                    identical += math.comb(len(row["completions"]), 2) - len(new)
            except RowError as e:
                msg = f"{path}:{lineno}: {e}"
                if not skip_bad:
                    raise RowError(msg) from None
                errors.append(msg)
                continue
            items.extend(new)
    return items, ImportReport(n_rows, len(items), len(errors), errors[:20], identical)


def _load_line(line: str, path: Path, lineno: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise RowError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(row, dict):
        raise RowError(f"a row must be a JSON object, got {type(row).__name__}")
    return row


def _row_items(row: dict[str, Any], max_chars: int) -> list[dict[str, Any]]:
    if "completions" in row:
        return _sample_items(row, max_chars)
    if "a" in row or "b" in row:
        return [_pair_item(row, max_chars)]
    raise RowError("field 'completions' (sampling row) or fields 'a' and 'b' (pair row) missing")


def _sample_items(row: dict[str, Any], max_chars: int) -> list[dict[str, Any]]:
    pid = _str_field(row, "prompt_id")
    prompt = _prompt_field(row, max_chars)
    split = _split_field(row, required=True)
    comps = row["completions"]
    if not isinstance(comps, list) or len(comps) < 2:
        raise RowError("field 'completions' must be a list of at least 2 completions")
    seen: set[str] = set()
    for j, c in enumerate(comps):
        if not isinstance(c, dict):
            raise RowError(f"field 'completions[{j}]' must be an object")
        cid = _str_field(c, "completion_id", where=f"completions[{j}].")
        if cid in seen:
            raise RowError(f"field 'completions[{j}].completion_id' repeats {cid!r}")
        seen.add(cid)
        _text(c, "text", max_chars, where=f"completions[{j}].")
    policy = row.get("policy")
    if policy is not None and not isinstance(policy, dict):
        raise RowError("field 'policy' must be an object {model, fingerprint}")
    out = []
    for a, b in itertools.combinations(comps, 2):
        if a["text"] == b["text"]:
            continue
        out.append(
            {
                "pair_key": f"{pid}:{a['completion_id']}|{b['completion_id']}",
                "prompt_id": pid,
                "doc_id": row.get("doc_id"),
                "split": split,
                "prompt": prompt,
                "a_id": a["completion_id"],
                "b_id": b["completion_id"],
                "a_text": a["text"],
                "b_text": b["text"],
                "meta": {"policy": policy, "a": _comp_meta(a), "b": _comp_meta(b)},
            }
        )
    return out


def _comp_meta(c: dict[str, Any]) -> dict[str, Any]:
    keys = ("greedy", "temperature", "logp", "n_tokens", "finish_reason")
    return {k: c.get(k) for k in keys if k in c}


def _pair_item(row: dict[str, Any], max_chars: int) -> dict[str, Any]:
    prompt = _prompt_field(row, max_chars)
    a, b = _text(row, "a", max_chars), _text(row, "b", max_chars)
    src = row.get("source_document")
    if src is not None:
        src = _text(row, "source_document", max_chars)
    pair_id = row.get("pair_id")
    if pair_id is not None and not isinstance(pair_id, (str, int)):
        raise RowError("field 'pair_id' must be a string")
    if pair_id is None:
        h = hashlib.sha256(json.dumps([prompt, a, b], sort_keys=True).encode()).hexdigest()
        pair_id = f"pair-{h[:16]}"
    prompt_id = row.get("prompt_id")
    if prompt_id is None:
        prompt_id = "p-" + hashlib.sha256(json.dumps(prompt).encode()).hexdigest()[:16]
    return {
        "pair_key": str(pair_id),
        "kind": row.get("kind", "pair") if row.get("kind") in ("pair", "blind") else "pair",
        "prompt_id": str(prompt_id),
        "doc_id": row.get("doc_id"),
        "split": _split_field(row, required=False),
        "prompt": prompt,
        "source_document": src,
        "a_id": str(row.get("a_id", "a")),
        "b_id": str(row.get("b_id", "b")),
        "a_text": a,
        "b_text": b,
        "meta": row.get("meta") if isinstance(row.get("meta"), dict) else {},
    }


def _str_field(row: dict[str, Any], key: str, where: str = "") -> str:
    v = row.get(key)
    if v is None:
        raise RowError(f"field '{where}{key}' is missing")
    if not isinstance(v, (str, int)) or str(v) == "":
        raise RowError(f"field '{where}{key}' must be a non-empty string, got {v!r}")
    return str(v)


def _text(row: dict[str, Any], key: str, max_chars: int, where: str = "") -> str:
    v = row.get(key)
    if not isinstance(v, str):
        raise RowError(f"field '{where}{key}' must be a string, got {type(v).__name__}")
    if len(v) > max_chars:
        raise RowError(f"field '{where}{key}' has {len(v)} characters; the limit is {max_chars}")
    return v


def _prompt_field(row: dict[str, Any], max_chars: int) -> str | list[dict[str, str]]:
    p = row.get("prompt")
    if isinstance(p, str):
        return _text(row, "prompt", max_chars)
    if isinstance(p, list) and p:
        for j, m in enumerate(p):
            if not isinstance(m, dict) or not isinstance(m.get("content"), str):
                raise RowError(f"field 'prompt[{j}]' must be a message {{role, content}}")
            if m.get("role") not in ("system", "user", "assistant", "tool"):
                raise RowError(f"field 'prompt[{j}].role' is {m.get('role')!r}")
        if sum(len(m["content"]) for m in p) > max_chars:
            raise RowError(f"field 'prompt' is longer than {max_chars} characters")
        return [{"role": m["role"], "content": m["content"]} for m in p]
    raise RowError("field 'prompt' must be a string or a non-empty list of chat messages")


def _split_field(row: dict[str, Any], required: bool) -> str | None:
    s = row.get("split")
    if s is None and not required:
        return None
    if s not in SPLITS:
        raise RowError(f"field 'split' must be one of {', '.join(SPLITS)}, got {s!r}")
    return s


def _check_split_leak(new: list[dict[str, Any]], split_of: dict, lineno: int) -> None:
    """One prompt must live in one split, else its pairs leak between train and test."""
    for it in new:
        pid, split = it.get("prompt_id"), it.get("split")
        if pid is None or split is None:
            continue
        prev = split_of.setdefault(pid, (split, lineno))
        if prev[0] != split:
            raise RowError(
                f"field 'split': prompt_id {pid!r} is {split!r} here but {prev[0]!r} on line "
                f"{prev[1]}; split prompts before pairing"
            )
