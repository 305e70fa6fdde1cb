"""The example configs and data ship inside the package: `alignforge examples` copies them out,
and the demo reads its corpus from there, so both work from any directory."""

import tomllib
from pathlib import Path

from alignforge.workflow.examples import EXAMPLES_DIR, copy_examples

ROOT = Path(__file__).resolve().parents[2]


def shipped() -> set[Path]:
    root = EXAMPLES_DIR.resolve()
    return {
        p.relative_to(root) for p in root.rglob("*") if p.is_file() and "__pycache__" not in str(p)
    }


def test_the_package_holds_the_repositorys_examples_and_the_wheel_takes_them():
    assert EXAMPLES_DIR.parent == ROOT / "alignforge"
    assert EXAMPLES_DIR.resolve() == (ROOT / "examples").resolve()  # one copy: a link in the repo
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "examples/**/*" in patterns["package-data"]["alignforge"]
    from alignforge.workflow.demo import CORPUS, WIKI

    assert CORPUS.is_file() and WIKI.is_file() and CORPUS.parent.parent == EXAMPLES_DIR


def test_copy_writes_every_example_and_keeps_files_already_there(tmp_path):
    dest = tmp_path / "examples"
    dest.mkdir()
    (dest / "sft_default.yaml").write_text("stage: sft  # mine\n")
    written, kept = copy_examples(dest)
    assert kept == [Path("sft_default.yaml")]
    assert (dest / "sft_default.yaml").read_text() == "stage: sft  # mine\n"
    assert set(written) == shipped() - {Path("sft_default.yaml")}
    assert {Path("rm.yaml"), Path("data/alpaca_en_demo.json")} <= set(written)
    assert (dest / "data/ner_finance.jsonl").read_bytes() == (
        EXAMPLES_DIR / "data/ner_finance.jsonl"
    ).read_bytes()
    assert copy_examples(dest) == ([], sorted(shipped()))  # a second copy writes nothing
