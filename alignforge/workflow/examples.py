"""The example configs and data (``examples/`` in the repository), installed with the package.

    alignforge examples            # copies them into ./examples
    alignforge examples my-project/examples

``alignforge/examples`` links to the repository's ``examples/``, so a source checkout and an
installed wheel read the same files.
"""

from __future__ import annotations

import shutil
from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"


def copy_examples(dest: str | Path) -> tuple[list[Path], list[Path]]:
    """Copy every example file into ``dest``; files already there are kept as they are.

    Returns the files written and the files kept, as paths relative to ``dest``.
    """
    src_root, dest = EXAMPLES_DIR.resolve(), Path(dest)
    if not src_root.is_dir():
        raise FileNotFoundError(f"{EXAMPLES_DIR}: the example files are missing from this install")
    written, kept = [], []
    for src in sorted(src_root.rglob("*")):
        rel = src.relative_to(src_root)
        if not src.is_file() or "__pycache__" in rel.parts:
            continue
        target = dest / rel
        if target.exists():
            kept.append(rel)
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        written.append(rel)
    return written, kept
