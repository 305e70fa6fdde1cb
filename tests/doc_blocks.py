"""The fenced code blocks of the docs, read the way a user copies them (tests run what they say)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def blocks(doc: str, lang: str) -> list[str]:
    """The ```lang blocks of ``doc`` (a path from the repository root), in order."""
    return re.findall(rf"```{lang}\n(.*?)```", (ROOT / doc).read_text(), flags=re.S)


def bash_commands(doc: str) -> list[str]:
    """Each command line of the ```bash blocks, continuation lines (``\\``) joined, comments kept."""
    lines = []
    for block in blocks(doc, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                lines.append(line.strip())
    return lines
