"""Rebuild docs/benchmarks.md from the per-area pages in docs/benchmarks/ (headings one level down).

python scripts/assemble_benchmarks.py
"""

from pathlib import Path

DOCS = Path(__file__).resolve().parent.parent / "docs"
ORDER = ["sft", "dpo", "ppo", "diversity", "annotate", "evaluate", "serving", "losses"]
HEADER = """# Benchmarks

Every figure below was measured on this project's development machine (2 CPU cores, 24 GiB, no GPU)
with the command printed beside it. Some were taken while the machine's two cores were shared with
other work, which slows everything and adds noise; each section says so where it applies, and
ratios measured in one run (both sides under the same load) are the figures to trust.
The per-area pages in `docs/benchmarks/` hold the same text; this page gathers them
(`python scripts/assemble_benchmarks.py`).
"""


def demote(text: str) -> str:
    out, fenced = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        out.append("#" + line if line.startswith("#") and not fenced else line)
    return "\n".join(out)


def main() -> None:
    parts = [HEADER] + [
        demote((DOCS / "benchmarks" / f"{n}.md").read_text()).strip() + "\n" for n in ORDER
    ]
    (DOCS / "benchmarks.md").write_text("\n".join(parts))


if __name__ == "__main__":
    main()
