"""Make a pair easy on the eye: parse extraction JSON into tables, highlight mentions in the source.

    from alignforge.annotate.render import parse_completion, highlight, split_prompt
    p = parse_completion('{"entities": [{"name": "Acme", "type": "ORG"}], "summary": "..."}')
    p.kind, p.entities[0].name        # ('extraction', 'Acme')
    segs = highlight("Acme hired Bo.", {"acme": "both"})   # [Segment('Acme', 'both'), ...]

Key names are read leniently (``entities``/``entity_list``/``nodes``, ``relations``/
``relationships``/``edges``/``triples``, ``source``/``head``/``subject`` ...) and anything that
is not JSON is shown as plain text. Leniency must not hide failures the model has to unlearn,
so every format problem is returned as a ``Flag`` and shown on the page: no JSON, JSON cut off
(or ``finish_reason == "length"``), text around the JSON, a code fence, more than one JSON
value, and entries dropped because they do not parse.
"""

from __future__ import annotations

import contextlib
import json
import re
from typing import Any, NamedTuple

ENTITY_KEYS = ("entities", "entity_list", "entity", "ents", "nodes", "named_entities")
RELATION_KEYS = ("relations", "relationships", "relation_list", "edges", "triples", "links")
SUMMARY_KEYS = ("summary", "summaries", "overview", "abstract")
NAME_KEYS = ("name", "entity", "text", "mention", "span", "label", "value")
TYPE_KEYS = ("type", "entity_type", "category", "kind", "class")
DESC_KEYS = ("description", "desc", "summary", "explanation", "details", "context")
SRC_KEYS = ("source", "head", "subject", "from", "source_entity", "entity1", "src")
TGT_KEYS = ("target", "tail", "object", "to", "target_entity", "entity2", "dst")
REL_KEYS = ("relation", "type", "predicate", "relationship", "label", "relation_type")


class Entity(NamedTuple):
    name: str
    type: str
    description: str


class Relation(NamedTuple):
    source: str
    relation: str
    target: str
    description: str


class Flag(NamedTuple):
    """A format problem the annotator should see: the model has to unlearn it."""

    code: str  # one of FLAG_CODES
    message: str


FLAG_CODES = ("not_parsed", "truncated", "text_around", "fenced", "multiple", "dropped")


class Parsed(NamedTuple):
    kind: str  # 'extraction' (entities/relations found), 'json' (other JSON), 'text'
    entities: list[Entity]
    relations: list[Relation]
    summary: list[str]
    other: str  # pretty JSON of keys not shown in the tables ('' if none)
    text: str  # the raw completion
    flags: list[Flag] = []
    finish_reason: str | None = None


class Segment(NamedTuple):
    text: str
    cls: str  # '' (plain), 'a', 'b' or 'both': which completion(s) mention it


class JsonSpan(NamedTuple):
    start: int
    end: int
    value: Any


class Scan(NamedTuple):
    values: list[JsonSpan]  # complete top-level JSON objects/arrays, in order
    cut: JsonSpan | None  # an object/array still open at the end of the text (value: repaired)
    n_malformed: int  # bracketed spans that are not valid JSON


_FENCE = re.compile(r"```[A-Za-z]*")
_OPEN = re.compile(r"[{\[]")


def _open_end(text: str, i: int) -> tuple[int | None, int | None, list[str]]:
    """Scan the brackets of the value opening at ``text[i]`` (strings respected).

    Returns (end, safe, stack): ``end`` is the index after the matching bracket, or None when
    the text ends first; then ``safe`` is the index after the last nested value that closed and
    ``stack`` the brackets still open there, from which a cut-off value can be closed.
    """
    stack: list[str] = []
    safe, safe_stack = None, []
    in_str = esc = False
    for j in range(i, len(text)):
        ch = text[j]
        if in_str:
            esc, in_str = (False, True) if esc else (ch == "\\", ch != '"')
            continue
        if ch == '"':
            in_str = True
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]":
            if not stack or stack.pop() != ch:
                return j + 1, None, []  # mismatched: not JSON, resume after it
            if not stack:
                return j + 1, None, []
            safe, safe_stack = j + 1, list(stack)
    return None, safe, safe_stack


def scan_json(text: str) -> Scan:
    """Every top-level JSON object or array in ``text``, and one left open by a cut-off.

    Objects nested inside a broken or cut-off value are not reported on their own: a truncated
    answer must not pass for a small valid one.
    """
    dec = json.JSONDecoder()
    values: list[JsonSpan] = []
    pos = n_bad = 0
    while (m := _OPEN.search(text, pos)) is not None:
        i = m.start()
        end, safe, stack = _open_end(text, i)
        if end is None:
            repaired = None
            if safe is not None:
                with contextlib.suppress(json.JSONDecodeError):
                    repaired = json.loads(text[i:safe] + "".join(reversed(stack)))
            return Scan(values, JsonSpan(i, len(text), repaired), n_bad)
        try:
            obj, used = dec.raw_decode(text[i:end])
            if used != end - i:
                raise json.JSONDecodeError("trailing data", text, i + used)
            values.append(JsonSpan(i, end, obj))
        except json.JSONDecodeError:
            n_bad += 1
        pos = end
    return Scan(values, None, n_bad)


def extract_json(text: str) -> Any | None:
    """The first complete JSON object/array in ``text`` (fences and surrounding prose ignored)."""
    values = scan_json(text).values
    return values[0].value if values else None


def _pick(d: dict[str, Any], keys: tuple[str, ...]) -> Any:
    low = {str(k).lower(): v for k, v in d.items()}
    for k in keys:
        if k in low and low[k] not in (None, ""):
            return low[k]
    return None


def _s(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, (list, dict)):
        return json.dumps(v, ensure_ascii=False)
    return str(v)


def _entity(e: Any) -> Entity | None:
    if isinstance(e, str):
        name, _, typ = e.partition(" - ")
        return Entity(name.strip(), typ.strip(), "")
    if isinstance(e, dict):
        name = _pick(e, NAME_KEYS)
        if name is None:
            return None
        typ = _pick({k: v for k, v in e.items() if v != name}, TYPE_KEYS)
        return Entity(_s(name), _s(typ), _s(_pick(e, DESC_KEYS)))
    return None


def _relation(r: Any) -> Relation | None:
    if isinstance(r, (list, tuple)) and len(r) >= 3:
        return Relation(_s(r[0]), _s(r[1]), _s(r[2]), _s(r[3]) if len(r) > 3 else "")
    if isinstance(r, dict):
        src, tgt = _pick(r, SRC_KEYS), _pick(r, TGT_KEYS)
        if src is None and tgt is None:
            return None
        return Relation(_s(src), _s(_pick(r, REL_KEYS)), _s(tgt), _s(_pick(r, DESC_KEYS)))
    return None


def _rows(raw: Any, make, what: str, flags: list[Flag]) -> list:
    """Parse a list of entities/relations, flagging entries (or the field) that do not parse."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        flags.append(Flag("dropped", f"field '{what}' is not a list; it is not shown as a table"))
        return []
    rows = [x for x in map(make, raw) if x]
    if len(rows) < len(raw):
        n = len(raw) - len(rows)
        flags.append(Flag("dropped", f"{n} of {len(raw)} {what} dropped as invalid"))
    return rows


def _snippet(s: str) -> str:
    s = " ".join(s.split())
    return s if len(s) <= 60 else s[:57] + "..."


def _format_flags(text: str, scan: Scan, finish_reason: str | None, expect_json: bool):
    flags: list[Flag] = []
    if finish_reason == "length":
        flags.append(Flag("truncated", "generation stopped at the length limit "
                                       "(finish_reason=length)"))  # fmt: skip
    if scan.cut is not None:
        kept = "" if scan.cut.value is None else "; the complete entries before the cut are shown"
        flags.append(Flag("truncated", f"JSON cut off at character {len(text)}: a closing "
                                       f"bracket is missing{kept}"))  # fmt: skip
    spans = [*scan.values, *([scan.cut] if scan.cut else [])]
    if not spans:
        if scan.n_malformed:
            flags.append(Flag("not_parsed", "malformed JSON; shown as plain text"))
        elif expect_json and text.strip():
            flags.append(Flag("not_parsed", "no JSON found; shown as plain text"))
        return flags
    if len(scan.values) > 1 or (scan.values and scan.cut):
        flags.append(Flag("multiple", f"{len(spans)} JSON values; only the first is shown "
                                      "(switch to raw to see all)"))  # fmt: skip
    outside = text[: spans[0].start] + " " + text[spans[-1].end :]
    fences = _FENCE.findall(outside)
    prose = _FENCE.sub(" ", outside).strip()
    if prose:
        flags.append(Flag("text_around", f'text around the JSON: "{_snippet(prose)}"'))
    elif fences:
        flags.append(Flag("fenced", "JSON wrapped in a Markdown code fence"))
    return flags


def parse_completion(
    text: str, finish_reason: str | None = None, expect_json: bool = True
) -> Parsed:
    """Tables for the task page plus every format problem of ``text`` (see ``FLAG_CODES``)."""
    scan = scan_json(text)
    flags = _format_flags(text, scan, finish_reason, expect_json)
    obj = scan.values[0].value if scan.values else (scan.cut.value if scan.cut else None)
    if isinstance(obj, list):  # a bare list of entities
        obj = {"entities": obj}
    if not isinstance(obj, dict):
        if scan.cut is not None and obj is None:
            flags.append(Flag("not_parsed", "the cut-off JSON could not be read; plain text"))
        return Parsed("text", [], [], [], "", text, flags, finish_reason)
    ents = _rows(_pick(obj, ENTITY_KEYS), _entity, "entities", flags)
    rels = _rows(_pick(obj, RELATION_KEYS), _relation, "relations", flags)
    summ = _pick(obj, SUMMARY_KEYS)
    summary = [_s(x) for x in summ] if isinstance(summ, list) else ([_s(summ)] if summ else [])
    used = {k for k in obj if str(k).lower() in ENTITY_KEYS + RELATION_KEYS + SUMMARY_KEYS}
    rest = {k: v for k, v in obj.items() if k not in used}
    other = json.dumps(rest, indent=2, ensure_ascii=False) if rest else ""
    kind = "extraction" if ents or rels or summary else "json"
    if kind == "json":
        other = json.dumps(obj, indent=2, ensure_ascii=False)
    return Parsed(kind, ents, rels, summary, other, text, flags, finish_reason)


def split_prompt(prompt: str | list[dict[str, str]], source_document: str | None = None):
    """(instruction, document): the document is the last user turn of a chat prompt."""
    if isinstance(prompt, str):
        return ("", prompt) if source_document is None else (prompt, source_document)
    users = [m["content"] for m in prompt if m.get("role") == "user"]
    doc = source_document or (users[-1] if users else "")
    rest = [f"[{m['role']}] {m['content']}" for m in prompt if m["content"] != doc]
    return "\n\n".join(rest), doc


def mention_classes(a: Parsed, b: Parsed) -> dict[str, str]:
    """Lower-cased entity name -> 'a' | 'b' | 'both' (which completion extracted it)."""
    na = {e.name.strip().lower() for e in a.entities if len(e.name.strip()) >= 2}
    nb = {e.name.strip().lower() for e in b.entities if len(e.name.strip()) >= 2}
    out = {n: "both" for n in na & nb}
    out.update({n: "a" for n in na - nb})
    out.update({n: "b" for n in nb - na})
    return out


def highlight(source: str, mentions: dict[str, str]) -> list[Segment]:
    """Split ``source`` into segments, marking every (case-insensitive) mention; longest first.

    Mentions match on word boundaries, so 'Al' does not light up inside 'Alpha'.
    """
    if not mentions or not source:
        return [Segment(source, "")]
    names = sorted(mentions, key=len, reverse=True)
    pat = re.compile(
        r"(?<!\w)(" + "|".join(re.escape(n) for n in names) + r")(?!\w)", re.IGNORECASE
    )
    out, pos = [], 0
    for m in pat.finditer(source):
        if m.start() > pos:
            out.append(Segment(source[pos : m.start()], ""))
        out.append(Segment(m.group(0), mentions.get(m.group(0).lower(), "both")))
        pos = m.end()
    if pos < len(source):
        out.append(Segment(source[pos:], ""))
    return out
