import json

import pytest
from typer.testing import CliRunner

from alignforge.datagen.chunking import (
    DocumentError,
    chunk_documents,
    chunk_text,
    read_chunks,
    read_documents,
    split_sentences,
)

WIKI = "examples/data/wikipedia_paragraphs.jsonl"


def test_chunks_cover_every_character_and_respect_sizes():
    docs, skips = read_documents(WIKI)
    assert len(docs) == 1000 and skips == []
    chunks = chunk_documents(docs, target_size=300, max_size=450, min_size=80)
    by_doc: dict[str, list] = {}
    for c in chunks:
        by_doc.setdefault(c.doc_id, []).append(c)
    for doc in docs:
        parts = by_doc[doc.doc_id]
        assert "".join(doc.text[c.start : c.end] for c in parts) == doc.text
        assert all(c.text == doc.text[c.start : c.end] for c in parts)
        assert all(a.end == b.start for a, b in zip(parts, parts[1:], strict=False))  # contiguous
        assert all(len(c.text) <= 450 for c in parts)
        if len(parts) > 1:  # a short tail was merged unless merging would break max_size
            tail, prev = parts[-1], parts[-2]
            assert len(tail.text) >= 80 or len(prev.text) + len(tail.text) > 450
    assert len({c.chunk_id for c in chunks}) == len(chunks)


def test_sentence_boundaries_and_short_tail_merge():
    text = "First sentence here. Second one follows! Third? Tail."
    spans = split_sentences(text)
    assert [text[s:e] for s, e in spans] == [
        "First sentence here. ",
        "Second one follows! ",
        "Third? ",
        "Tail.",
    ]
    chunks = chunk_text(text, "d", target_size=25, max_size=40, min_size=10)
    assert [c.text for c in chunks] == [
        "First sentence here. ",
        "Second one follows! ",
        "Third? Tail.",
    ]


def test_abbreviations_initials_and_decimals_do_not_end_a_sentence():
    text = (
        "Dr. Ruiz moved to the U.S. in 1998, e.g. to work at J. R. Smith & Co. on 3.5 GHz "
        "radios. She left in 2004! Did she return?\n\nA title without a full stop\n\nLast."
    )
    spans = split_sentences(text)
    assert [text[s:e] for s, e in spans] == [
        "Dr. Ruiz moved to the U.S. in 1998, e.g. to work at J. R. Smith & Co. on 3.5 GHz radios. ",
        "She left in 2004! ",
        "Did she return?\n\n",
        "A title without a full stop\n\n",  # a blank line always ends a sentence
        "Last.",
    ]


def test_overlong_sentence_is_cut_at_spaces_or_hard():
    words = " ".join(["word"] * 100)
    chunks = chunk_text(words, "d", target_size=50, max_size=60)
    assert "".join(c.text for c in chunks) == words
    assert all(len(c.text) <= 60 for c in chunks)
    assert all(c.text.endswith(" ") for c in chunks[:-1])  # cut at whitespace
    blob = "x" * 250
    chunks = chunk_text(blob, "d", target_size=100, max_size=100, min_size=0)
    assert [len(c.text) for c in chunks] == [100, 100, 50]


def test_token_sized_chunks(tokenizer):
    docs, _ = read_documents(WIKI)
    chunks = chunk_documents(
        docs[:20], target_size=40, max_size=60, unit="tokens", tokenizer=tokenizer
    )
    for c in chunks:
        assert (
            len(tokenizer(c.text, add_special_tokens=False)["input_ids"]) <= 62
        )  # merges at joins
    with pytest.raises(ValueError, match="needs a tokenizer"):
        chunk_documents(docs[:1], unit="tokens")


def test_empty_malformed_and_non_utf8_inputs_are_reported(tmp_path):
    jl = tmp_path / "docs.jsonl"
    jl.write_bytes(
        b'{"id": "a", "text": "Fine text."}\n'
        b'{"id": "b", "text": "   "}\n'
        b"{not json\n"
        b'{"id": "d", "text": "caf\xe9"}\n'
        b'{"id": "e", "body": "no text field"}\n'
    )
    docs, skips = read_documents(jl)
    assert [d.doc_id for d in docs] == ["a"]
    reasons = {s.row: s.reason for s in skips}
    assert reasons[2] == "empty document"
    assert "malformed JSON" in reasons[3]
    assert "UTF-8" in reasons[4]
    assert "missing string field 'text'" in reasons[5]
    assert all(str(jl) in str(s) for s in skips)
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "good.txt").write_text("Hello world. Bye.")
    (folder / "empty.txt").write_text("\n\n")
    (folder / "latin1.txt").write_bytes("Dvořák".encode("cp1250"))
    docs, skips = read_documents(folder)
    assert [d.doc_id for d in docs] == ["good"]
    assert {s.source.rsplit("/", 1)[-1]: s.reason.split(" (")[0] for s in skips} == {
        "empty.txt": "empty document",
        "latin1.txt": "not valid UTF-8",
    }
    with pytest.raises(DocumentError, match="latin1.txt: not valid UTF-8"):
        read_documents(folder / "latin1.txt", strict=True)
    with pytest.raises(DocumentError, match="is empty"):
        chunk_text("  ", "empty-doc")


def test_chunk_cli(tmp_path):
    from alignforge.datagen.cli import app

    out = tmp_path / "chunks.jsonl"
    res = CliRunner().invoke(app, ["chunk", WIKI, "--output", str(out), "--target-size", "400"])
    assert res.exit_code == 0, res.output
    chunks = read_chunks(out)
    assert len(chunks) > 1000 and "1000 documents" in res.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": 1}) + "\n")
    res = CliRunner().invoke(app, ["chunk", str(bad), "-o", str(out), "--strict"])
    assert res.exit_code == 2 and "row 1" in res.output
