"""Make a pair easy on the eye: parse extraction JSON into tables, highlight mentions in the source.

    from alignforge.annotate.render import parse_completion, highlight, split_prompt
    p = parse_completion('{"entities": [{"name": "Acme", "type": "ORG"}], "summary": "..."}')
    p.kind, p.entities[0].name        # ('extraction', 'Acme')
    segs = highlight("Acme hired Bo.", {"acme": "both"})   # [Segment('Acme', 'both'), ...]

Key names are read leniently (``entities``/``entity_list``/``nodes``, ``relations``/
``relationships``/``edges``/``triples``, ``source``/``head``/``subject`` ...), code fences and
chatter around the JSON are ignored, and anything that is not JSON is shown as plain text.
"""

from __future__ import annotations

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


class Parsed(NamedTuple):
    kind: str  # 'extraction' (entities/relations found), 'json' (other JSON), 'text'
    entities: list[Entity]
    relations: list[Relation]
    summary: list[str]
    other: str  # pretty JSON of keys not shown in the tables ('' if none)
    text: str  # the raw completion


class Segment(NamedTuple):
    text: str
    cls: str  # '' (plain), 'a', 'b' or 'both': which completion(s) mention it


def extract_json(text: str) -> Any | None:
    """The first JSON object/array in ``text`` (fences and surrounding prose ignored)."""
    t = text.strip()
    fence = re.search(r"```(?:json|JSON)?\s*(.*?)```", t, re.S)
    if fence:
        t = fence.group(1).strip()
    try:
        return json.loads(t)
    except (json.JSONDecodeError, ValueError):
        pass
    dec = json.JSONDecoder()
    for m in re.finditer(r"[{\[]", t):
        try:
            obj, _ = dec.raw_decode(t[m.start() :])
            if isinstance(obj, (dict, list)):
                return obj
        except json.JSONDecodeError:
            continue
    return None


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


def parse_completion(text: str) -> Parsed:
    obj = extract_json(text)
    if isinstance(obj, list):  # a bare list of entities
        obj = {"entities": obj}
    if not isinstance(obj, dict):
        return Parsed("text", [], [], [], "", text)
    ents_raw, rels_raw = _pick(obj, ENTITY_KEYS), _pick(obj, RELATION_KEYS)
    ents = [e for e in map(_entity, ents_raw if isinstance(ents_raw, list) else []) if e]
    rels = [r for r in map(_relation, rels_raw if isinstance(rels_raw, list) else []) if r]
    summ = _pick(obj, SUMMARY_KEYS)
    summary = [_s(x) for x in summ] if isinstance(summ, list) else ([_s(summ)] if summ else [])
    used = {k for k in obj if str(k).lower() in ENTITY_KEYS + RELATION_KEYS + SUMMARY_KEYS}
    rest = {k: v for k, v in obj.items() if k not in used}
    other = json.dumps(rest, indent=2, ensure_ascii=False) if rest else ""
    kind = "extraction" if ents or rels or summary else "json"
    if kind == "json":
        other = json.dumps(obj, indent=2, ensure_ascii=False)
    return Parsed(kind, ents, rels, summary, other, text)


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
