"""The Python examples in docs/evaluate.md run as written."""

import re
from pathlib import Path

import pytest

DOC = Path("docs/evaluate.md")
BLOCKS = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S) if DOC.exists() else []


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_doc_example_runs(code, capsys):
    exec(compile(code, str(DOC), "exec"), {"__name__": "doc_example"})
    assert capsys.readouterr().out.strip()  # each example prints something


def test_docs_have_examples():
    assert len(BLOCKS) >= 5
