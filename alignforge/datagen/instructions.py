"""Instruction/answer pairs from raw text by back-translation and rephrasing.

    from alignforge.datagen.chunking import read_documents, chunk_documents
    from alignforge.datagen.instructions import generate_instructions
    from alignforge.rollout import OpenAIChatClient

    docs, _ = read_documents("examples/data/wikipedia_paragraphs.jsonl")
    chunks = chunk_documents(docs, target_size=800)
    teacher = OpenAIChatClient("http://127.0.0.1:8000/v1", model="teacher")
    report = generate_instructions(chunks, teacher, "runs/instructions", n_pairs=3)

    alignforge data instructions instructions.yaml base_url=http://... n_pairs=3

For every chunk the teacher writes ``n_pairs`` instructions whose ideal answer is the chunk's
content (back-translation) and rephrases that content into answers in the author's style. The
reply is requested as JSON valid for :func:`instruction_set_schema` (``response_format`` for
endpoints, constrained decoding for local models). Near-JSON is repaired (code fences, prose
around the object, trailing commas, key aliases); an item whose reply still fails is retried
alone up to ``max_attempts`` times and then written to ``rejects.jsonl`` with the reason. A
failure of the teacher itself (no connection, 5xx after the client's retries, 401/403/404) is no
reason to reject a chunk: the run stops with :class:`TeacherUnavailable`, caching nothing for it.

Outputs in ``output_dir``: ``cache.jsonl`` (one fsync'ed line per finished chunk, keyed by chunk
text hash, prompt version, teacher and generation parameters, so an interrupted run resumes),
``sft.jsonl`` (chat ``messages`` or ``prompt``/``completion`` rows with provenance),
``rejects.jsonl`` and ``report.json``. Instructions are deduplicated after normalisation
(lower-case, punctuation and whitespace collapsed) and, optionally, by embedding similarity.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, Field, ValidationError

from alignforge.datagen.cache import JsonlCache, write_jsonl_atomic
from alignforge.datagen.chunking import Chunk
from alignforge.errors import UserError

SYSTEM_PROMPT = (
    "You turn passages of text into instruction/answer pairs used to fine-tune a language "
    "model. You reply with JSON only."
)
PROMPT_TEMPLATE = """Below is a passage written by an author. Write {n_pairs} different instructions \
(questions or tasks) that a user could give so that the passage's content is the ideal answer. \
For each instruction, write the answer by rephrasing the relevant part of the passage into a \
complete, well-formed reply that keeps the author's voice, vocabulary and writing style. Use only \
facts from the passage and do not refer to "the passage" or "the author".

Return only JSON of the form {{"pairs": [{{"instruction": "...", "answer": "..."}}]}} with exactly \
{n_pairs} pairs.

Passage:
\"\"\"
{text}
\"\"\""""


class InstructionPair(BaseModel):
    instruction: str = Field(min_length=1)
    answer: str = Field(min_length=1)


class InstructionSet(BaseModel):
    pairs: list[InstructionPair]


class ParseError(ValueError):
    """A teacher reply that cannot be turned into instruction pairs (the message says why)."""


class TeacherUnavailable(UserError, RuntimeError):
    """The teacher endpoint failed (no connection, 5xx after the client's retries, 401/403/404):
    the run stops, and no chunk is cached as rejected for it."""

    exit_code = 1


# How older versions cached a chunk rejected because the teacher failed; such chunks are retried.
_ENDPOINT_REJECTION = re.compile(
    r"^request failed: \S+: (no response|HTTP (5\d\d|401|403|404)) after \d+ attempt"
)


def endpoint_rejection(record: dict) -> bool:
    """A cache record of a chunk rejected for an endpoint failure, not for its reply."""
    return record.get("status") == "rejected" and bool(
        _ENDPOINT_REJECTION.match(record.get("reason", ""))
    )


class InstructionReport(NamedTuple):
    n_chunks: int
    n_cached: int
    n_generated: int
    n_rejected: int
    n_repaired: int
    n_pairs: int
    n_duplicates: int


def prompt_version(system: str = SYSTEM_PROMPT, template: str = PROMPT_TEMPLATE) -> str:
    """A short hash of the prompt text: outputs of different prompts never mix in the cache."""
    return hashlib.sha256((system + "\0" + template).encode()).hexdigest()[:12]


def instruction_set_schema(n_pairs: int, max_instruction_chars: int, max_answer_chars: int) -> dict:
    """JSON schema of a reply with exactly ``n_pairs`` pairs and bounded string lengths."""
    pair = {
        "type": "object",
        "properties": {
            "instruction": {"type": "string", "minLength": 1, "maxLength": max_instruction_chars},
            "answer": {"type": "string", "minLength": 1, "maxLength": max_answer_chars},
        },
        "required": ["instruction", "answer"],
        "additionalProperties": False,
    }
    return {
        "type": "object",
        "properties": {
            "pairs": {"type": "array", "items": pair, "minItems": n_pairs, "maxItems": n_pairs}
        },
        "required": ["pairs"],
        "additionalProperties": False,
    }


def build_messages(chunk_text: str, n_pairs: int, system: str = SYSTEM_PROMPT,
                   template: str = PROMPT_TEMPLATE) -> list[dict]:  # fmt: skip
    user = template.format(n_pairs=n_pairs, text=chunk_text.strip())
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


_ALIASES = {"question": "instruction", "prompt": "instruction", "input": "instruction",
            "response": "answer", "output": "answer", "completion": "answer"}  # fmt: skip


def _close_truncated(s: str) -> str:
    """Close an unterminated string and the brackets still open at the end of ``s``."""
    stack, in_str, esc = [], False, False
    for ch in s:
        if in_str:
            esc = (ch == "\\") and not esc
            if ch == '"' and not esc:
                in_str = False
        elif ch == '"':
            in_str, esc = True, False
        elif ch in "{[":
            stack.append("}" if ch == "{" else "]")
        elif ch in "}]" and stack:
            stack.pop()
    return s + ('"' if in_str else "") + "".join(reversed(stack))


def _repair(text: str):
    s = re.sub(r"^```[a-zA-Z]*\s*|```\s*$", "", text.strip(), flags=re.M).strip()
    starts = [i for i in (s.find("{"), s.find("[")) if i >= 0]
    if not starts:
        raise ParseError(f"no JSON object in reply: {text[:120]!r}")
    s = s[min(starts) :]
    for candidate in (s, s[: max(s.rfind("}"), s.rfind("]")) + 1], _close_truncated(s)):
        candidate = re.sub(r",\s*([}\]])", r"\1", candidate)
        try:
            return json.loads(candidate)
        except json.JSONDecodeError:
            continue
    raise ParseError(f"reply is not JSON even after repair: {text[:120]!r}")


def parse_pairs(text: str, n_pairs: int, min_pairs: int = 1) -> tuple[list[InstructionPair], bool]:
    """Pairs from a teacher reply and whether repair was needed; raises :class:`ParseError`."""
    repaired = False
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj, repaired = _repair(text), True
    if isinstance(obj, dict) and "pairs" not in obj:
        obj = next((v for v in obj.values() if isinstance(v, list)), [obj])
        repaired = True
    items = obj["pairs"] if isinstance(obj, dict) else obj
    if not isinstance(items, list):
        raise ParseError(f"'pairs' is not a list: {str(items)[:80]!r}")
    pairs, problems = [], []
    for i, item in enumerate(items):
        if isinstance(item, dict) and any(k in _ALIASES for k in item):
            item, repaired = {_ALIASES.get(k, k): v for k, v in item.items()}, True
        try:
            pair = InstructionPair.model_validate(item)
        except ValidationError as e:
            problems.append(f"pair {i}: {e.errors()[0]['msg']}")
            continue
        if pair.instruction.strip() and pair.answer.strip():
            pairs.append(
                InstructionPair(instruction=pair.instruction.strip(), answer=pair.answer.strip())
            )
        else:
            problems.append(f"pair {i}: blank instruction or answer")
    if len(pairs) < min_pairs:
        detail = "; ".join(problems) or "no pairs"
        raise ParseError(f"{len(pairs)} usable pairs, need {min_pairs}: {detail}")
    return pairs[:n_pairs], repaired


def cache_key(chunk: Chunk, version: str, teacher: str, params: dict) -> str:
    chunk_hash = hashlib.sha256(chunk.text.encode()).hexdigest()
    blob = json.dumps([chunk_hash, version, teacher, params], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def normalize_instruction(text: str) -> str:
    return re.sub(r"[\W_]+", " ", text.lower()).strip()


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def _try_batch(client, chunks, n_pairs, min_pairs, gen_kwargs, attempt, errors, on_ok):
    """One request per chunk; returns the chunks that must be retried. The chunks that came back
    are kept (``on_ok``) before an endpoint failure raises :class:`TeacherUnavailable`."""
    replies = client.chat_many(
        [build_messages(c.text, n_pairs) for c in chunks], return_exceptions=True, **gen_kwargs
    )
    retry, down = [], None
    for chunk, reply in zip(chunks, replies, strict=True):
        if getattr(reply, "endpoint_down", False):
            down = down or reply
            continue
        try:
            if isinstance(reply, BaseException):
                raise ParseError(f"request failed: {reply}")
            result = reply[0]
            if result.finish_reason == "length":
                raise ParseError(
                    f"reply cut at max_tokens={gen_kwargs['max_tokens']}: {result.text[-80:]!r}"
                )
            pairs, repaired = parse_pairs(result.text, n_pairs, min_pairs)
        except ParseError as e:
            raw = getattr(reply[0], "text", None) if isinstance(reply, list) and reply else None
            errors.setdefault(chunk.chunk_id, []).append(
                {"attempt": attempt, "reason": str(e), "raw": raw}
            )
            retry.append(chunk)
            continue
        on_ok(chunk, pairs, repaired, attempt)
    if down is not None:
        base_url = getattr(client, "base_url", down.url)
        raise TeacherUnavailable(
            f"teacher at {base_url} failed: {' '.join(str(down).split())}; {down.hint}. Stopped "
            "without caching the chunks it failed on; finished chunks are cached, a re-run goes on"
        )
    return retry


def generate_instructions(
    chunks: Sequence[Chunk], client, output_dir: str | Path, *, n_pairs: int = 3,
    temperature: float = 0.7, max_tokens: int = 1024, max_attempts: int = 3, batch_size: int = 16,
    use_json_schema: bool = True, max_instruction_chars: int = 300, max_answer_chars: int = 2000,
    min_pairs: int = 1, near_dup_threshold: float | None = None, output_format: str = "messages",
    progress: bool = True,
) -> InstructionReport:  # fmt: skip
    """Generate, cache and write the SFT dataset (see the module docstring)."""
    from tqdm.auto import tqdm

    out = Path(output_dir)
    cache = JsonlCache(out / "cache.jsonl")
    version, teacher = prompt_version(), str(client.model)
    params = {"n_pairs": n_pairs, "temperature": temperature, "max_tokens": max_tokens,
              "use_json_schema": use_json_schema, "max_instruction_chars": max_instruction_chars,
              "max_answer_chars": max_answer_chars, "min_pairs": min_pairs}  # fmt: skip
    keys = {c.chunk_id: cache_key(c, version, teacher, params) for c in chunks}

    def done(key):  # a chunk that older versions rejected because the teacher failed is redone
        return key in cache and not endpoint_rejection(cache.get(key))

    todo = list({keys[c.chunk_id]: c for c in chunks if not done(keys[c.chunk_id])}.values())
    n_cached = len(chunks) - len(todo)
    schema = instruction_set_schema(n_pairs, max_instruction_chars, max_answer_chars)
    gen_kwargs = {"temperature": temperature, "max_tokens": max_tokens}
    if use_json_schema:
        gen_kwargs["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "instruction_set", "schema": schema},
        }
    meta = {"teacher_model": teacher, "prompt_version": version, "params": params}

    def record(chunk, **fields):
        base = {
            "chunk_id": chunk.chunk_id,
            "doc_id": chunk.doc_id,
            "start": chunk.start,
            "end": chunk.end,
        }
        # replace: the key may hold an endpoint failure cached by an older version
        cache.append(
            keys[chunk.chunk_id], {**base, **meta, **fields, "created_at": _now()}, replace=True
        )

    def on_ok(chunk, pairs, repaired, attempt):
        record(
            chunk,
            status="ok",
            pairs=[p.model_dump() for p in pairs],
            repaired=repaired,
            attempts=attempt,
        )

    with tqdm(total=len(todo), disable=not progress, desc="instructions") as bar:
        for start in range(0, len(todo), batch_size):
            pending, errors = todo[start : start + batch_size], {}
            for attempt in range(1, max_attempts + 1):
                pending = _try_batch(
                    client, pending, n_pairs, min_pairs, gen_kwargs, attempt, errors, on_ok
                )
                if not pending:
                    break
            for chunk in pending:
                errs = errors[chunk.chunk_id]
                record(chunk, status="rejected", reason=errs[-1]["reason"], errors=errs)
            bar.update(len(todo[start : start + batch_size]))
    return _finalize(
        chunks, keys, cache, out, n_cached, len(todo), near_dup_threshold, output_format
    )


def _finalize(chunks, keys, cache, out, n_cached, n_generated, near_dup_threshold, output_format):
    rows, rejects, n_repaired = [], [], 0
    for chunk in dict.fromkeys(chunks):  # a chunk listed twice is written once
        rec = cache.get(keys[chunk.chunk_id])
        if rec is None:
            continue
        # identical chunk texts share one cache record; provenance is always the chunk's own
        prov = {"doc_id": chunk.doc_id, "chunk_id": chunk.chunk_id, "start": chunk.start, "end": chunk.end,
                **{k: rec[k] for k in ("teacher_model", "prompt_version", "created_at")}}  # fmt: skip
        if rec["status"] != "ok":
            rejects.append({**prov, "reason": rec["reason"], "errors": rec.get("errors", [])})
            continue
        n_repaired += bool(rec.get("repaired"))
        for k, pair in enumerate(rec["pairs"]):
            rows.append({"id": f"{chunk.chunk_id}#{k}", **_format(pair, output_format), **prov,
                         "repaired": bool(rec.get("repaired"))})  # fmt: skip
    rows, n_dup = dedupe_rows(rows, near_dup_threshold)
    write_jsonl_atomic(rows, out / "sft.jsonl")
    write_jsonl_atomic(rejects, out / "rejects.jsonl")
    report = InstructionReport(
        len(chunks), n_cached, n_generated, len(rejects), n_repaired, len(rows), n_dup
    )
    (out / "report.json").write_text(json.dumps(report._asdict(), indent=2))
    return report


def _format(pair: dict, output_format: str) -> dict:
    if output_format == "prompt_completion":
        return {"prompt": pair["instruction"], "completion": pair["answer"]}
    if output_format != "messages":
        raise ValueError(
            f"output_format must be 'messages' or 'prompt_completion', got {output_format!r}"
        )
    return {"messages": [{"role": "user", "content": pair["instruction"]},
                         {"role": "assistant", "content": pair["answer"]}]}  # fmt: skip


def _instruction_of(row: dict) -> str:
    return row["prompt"] if "prompt" in row else row["messages"][0]["content"]


def dedupe_rows(
    rows: list[dict], near_dup_threshold: float | None = None
) -> tuple[list[dict], int]:
    """Drop rows whose instruction repeats an earlier one (normalised exact, then cosine >= t)."""
    kept, seen = [], set()
    for row in rows:
        norm = normalize_instruction(_instruction_of(row))
        if norm not in seen:
            seen.add(norm)
            kept.append(row)
    if near_dup_threshold is not None and len(kept) > 1:
        from alignforge.datagen.diversity import embed_texts, greedy_near_dup_filter

        emb = embed_texts([_instruction_of(r) for r in kept], progress=False)
        kept = [kept[i] for i in greedy_near_dup_filter(emb, near_dup_threshold)]
    return kept, len(rows) - len(kept)
