"""The Python examples in docs/evaluate.md and docs/guide.md run as written."""

import pytest
from doc_blocks import ROOT, blocks

DOCS = ["docs/evaluate.md", "docs/guide.md"]
BLOCKS = [(doc, i, code) for doc in DOCS for i, code in enumerate(blocks(doc, "python"))]


@pytest.mark.parametrize(
    "doc,code", [(d, c) for d, _, c in BLOCKS], ids=[f"{d}-block{i}" for d, i, _ in BLOCKS]
)
def test_doc_example_runs(doc, code, capsys):
    exec(compile(code, str(ROOT / doc), "exec"), {"__name__": "doc_example"})
    assert capsys.readouterr().out.strip()  # each example prints something


def test_docs_have_examples():
    assert sum(doc == "docs/evaluate.md" for doc, _, _ in BLOCKS) >= 5
    assert any(doc == "docs/guide.md" for doc, _, _ in BLOCKS)
