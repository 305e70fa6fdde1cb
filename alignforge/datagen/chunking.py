"""Read documents and cut them into sentence-aware chunks that cover every character.

    from alignforge.datagen.chunking import read_documents, chunk_documents
    docs, skips = read_documents("examples/data/wikipedia_paragraphs.jsonl")
    chunks = chunk_documents(docs, target_size=800, max_size=1200)            # characters
    chunks = chunk_documents(docs, target_size=200, max_size=300, unit="tokens", tokenizer=tok)

    alignforge data chunk examples/data/wikipedia_paragraphs.jsonl --output runs/chunks.jsonl

Rules: sentences are packed greedily up to ``target_size``; a sentence longer than ``max_size`` is cut at whitespace (or hard, if it has
none). A last chunk shorter than ``min_size`` merges into its neighbour when the result stays
within ``max_size``. Chunks are contiguous slices: ``doc.text[c.start:c.end] == c.text`` and
their concatenation is the document, so nothing is dropped.

Sentences: paragraphs (split at blank lines) are cut into sentences by pySBD (Sadvilkar &
Neumann 2020, "PySBD: Pragmatic Sentence Boundary Disambiguation"), a rule-based splitter that
does not end a sentence after abbreviations ("Dr.", "U.S.", "e.g."), initials or decimals.

Documents that cannot be read (non-UTF-8 file, malformed JSON line, missing or empty text) are
skipped and reported as :class:`Skip` records naming the file and row; ``strict=True`` raises
:class:`DocumentError` instead.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

from alignforge.errors import UserError

_PARAGRAPH_END = re.compile(r"\n[^\S\n]*\n\s*")


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    source: str = ""


@dataclass(frozen=True)
class Chunk:
    doc_id: str
    chunk_id: str
    start: int
    end: int
    text: str

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Skip:
    source: str
    row: int | None
    reason: str

    def __str__(self) -> str:
        where = f"{self.source}" + (f" row {self.row}" if self.row is not None else "")
        return f"{where}: {self.reason}"


class DocumentError(UserError, ValueError):
    """A document could not be read; the message names the file and row."""


def read_documents(
    path: str | Path, *, text_field: str = "text", id_field: str = "id", strict: bool = False
) -> tuple[list[Document], list[Skip]]:
    """Documents from a ``.jsonl`` file, a text file, or a directory of ``.txt``/``.md`` files."""
    path = Path(path)
    if not path.exists():
        raise DocumentError(f"{path}: no such file or directory")
    files = (
        sorted(p for p in path.rglob("*") if p.suffix in {".txt", ".md", ".jsonl"})
        if path.is_dir()
        else [path]
    )
    docs: list[Document] = []
    skips: list[Skip] = []
    for file in files:
        reader = _read_jsonl if file.suffix == ".jsonl" else _read_text
        for item in reader(file, text_field, id_field):
            if isinstance(item, Skip):
                if strict:
                    raise DocumentError(str(item))
                skips.append(item)
            else:
                docs.append(item)
    return docs, skips


def _read_text(file: Path, text_field: str, id_field: str) -> Iterable[Document | Skip]:
    try:
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        yield Skip(
            str(file), None, f"not valid UTF-8 (byte {e.start}): re-encode the file as UTF-8"
        )
        return
    if not text.strip():
        yield Skip(str(file), None, "empty document")
        return
    yield Document(file.stem, text, str(file))


def _read_jsonl(file: Path, text_field: str, id_field: str) -> Iterable[Document | Skip]:
    with open(file, "rb") as fh:
        for row, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                yield Skip(str(file), row, f"not valid UTF-8 (byte {e.start})")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield Skip(str(file), row, f"malformed JSON: {e.msg}")
                continue
            text = obj.get(text_field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                yield Skip(str(file), row, f"missing string field {text_field!r}")
            elif not text.strip():
                yield Skip(str(file), row, "empty document")
            else:
                doc_id = obj.get(id_field, f"{file.stem}-{row}")
                yield Document(str(doc_id), text, f"{file}:{row}")


@functools.cache
def _segmenter():
    import pysbd

    return pysbd.Segmenter(language="en", clean=False)


def _sentence_starts(paragraph: str) -> list[int]:
    """Where pySBD starts each sentence after the first, as offsets into ``paragraph``.

    Each segment is found again in the text from where the last one began: a segment pySBD
    returns altered (it may normalise some characters) is not found and joins the sentence
    before it, so the spans always tile the text.
    """
    starts, pos = [], 0
    for seg in _segmenter().segment(paragraph):
        body = seg.strip()
        at = paragraph.find(body, pos) if body else -1
        if at > 0:
            starts.append(at)
        if at >= 0:
            pos = at + len(body)
    return starts


def split_sentences(text: str) -> list[tuple[int, int]]:
    """Contiguous ``(start, end)`` spans covering ``text``; each span keeps its trailing space.

    A blank line always ends a sentence; within a paragraph pySBD decides.
    """
    cuts = []
    para_start = 0
    for m in [*_PARAGRAPH_END.finditer(text), None]:
        para_end = m.end() if m else len(text)
        cuts += [para_start + i for i in _sentence_starts(text[para_start:para_end])]
        cuts.append(para_end)
        para_start = para_end
    bounds = [0, *sorted(set(c for c in cuts if 0 < c <= len(text)))]
    return [(a, b) for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


def _cut_long(text: str, start: int, end: int, max_size: int, size: Callable[[str], int]):
    """Split one over-long span at whitespace so each piece fits ``max_size``."""
    pieces = []
    while size(text[start:end]) > max_size:
        lo, hi = start + 1, end  # largest cut with size <= max_size, by bisection
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if size(text[start:mid]) <= max_size:
                lo = mid
            else:
                hi = mid - 1
        cut = text.rfind(" ", start + 1, lo)
        cut = cut + 1 if cut > start else lo
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def chunk_text(
    text: str, doc_id: str, *, target_size: int = 1000, max_size: int | None = None,
    min_size: int | None = None, size: Callable[[str], int] = len,
) -> list[Chunk]:  # fmt: skip
    """Chunks of one document (see the module docstring for the rules)."""
    max_size = max_size or int(target_size * 1.5)
    min_size = target_size // 4 if min_size is None else min_size
    if not 0 < target_size <= max_size:
        raise ValueError(f"need 0 < target_size <= max_size, got {target_size} and {max_size}")
    if not text.strip():
        raise DocumentError(f"document {doc_id!r} is empty")
    spans = [p for s, e in split_sentences(text) for p in _cut_long(text, s, e, max_size, size)]
    bounds: list[list[int]] = []
    for s, e in spans:
        if bounds and size(text[bounds[-1][0] : e]) <= target_size:
            bounds[-1][1] = e
        else:
            bounds.append([s, e])
    if len(bounds) > 1 and size(text[bounds[-1][0] : bounds[-1][1]]) < min_size:
        if size(text[bounds[-2][0] : bounds[-1][1]]) <= max_size:
            last = bounds.pop()
            bounds[-1][1] = last[1]
    return [Chunk(doc_id, f"{doc_id}:{i}", s, e, text[s:e]) for i, (s, e) in enumerate(bounds)]


def token_size(tokenizer) -> Callable[[str], int]:
    return lambda s: len(tokenizer(s, add_special_tokens=False)["input_ids"])


def chunk_documents(
    docs: Iterable[Document], *, target_size: int = 1000, max_size: int | None = None,
    min_size: int | None = None, unit: str = "chars", tokenizer=None,
) -> list[Chunk]:  # fmt: skip
    """Chunk every document; ``unit="tokens"`` measures sizes with ``tokenizer``."""
    if unit not in {"chars", "tokens"}:
        raise ValueError(f"unit must be 'chars' or 'tokens', got {unit!r}")
    if unit == "tokens" and tokenizer is None:
        raise ValueError("unit='tokens' needs a tokenizer")
    size = token_size(tokenizer) if unit == "tokens" else len
    out: list[Chunk] = []
    for doc in docs:
        out.extend(chunk_text(doc.text, doc.doc_id, target_size=target_size, max_size=max_size,
                              min_size=min_size, size=size))  # fmt: skip
    return out


def write_chunks(chunks: Iterable[Chunk], path: str | Path) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for c in chunks:
            fh.write(json.dumps(c.to_dict(), ensure_ascii=False) + "\n")
            n += 1
    tmp.replace(path)
    return n


def read_chunks(path: str | Path) -> list[Chunk]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for row, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                out.append(
                    Chunk(
                        str(d["doc_id"]),
                        str(d["chunk_id"]),
                        int(d["start"]),
                        int(d["end"]),
                        d["text"],
                    )
                )
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                raise DocumentError(
                    f"{path} row {row}: not a chunk record ({type(e).__name__}: {e})"
                ) from None
    return out
