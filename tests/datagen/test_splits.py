import json
from collections import Counter

from typer.testing import CliRunner

from alignforge.datagen.cli import app
from alignforge.datagen.exemplars import select_exemplars
from alignforge.datagen.splits import assign_split, check_leaks, make_pairs


def test_assign_split_is_deterministic_and_follows_ratios():
    counts = Counter(assign_split(f"doc-{i}") for i in range(5000))
    assert abs(counts["train"] / 5000 - 0.8) < 0.03 and abs(counts["test"] / 5000 - 0.1) < 0.02
    assert assign_split("doc-7") == assign_split("doc-7")
    assert assign_split("x", {"only": 1.0}) == "only"
    assert {assign_split(f"k{i}", {"a": 1, "b": 0}) for i in range(50)} == {"a"}


def test_make_pairs_gives_all_pairs_in_one_split():
    row = {"prompt_id": "p", "doc_id": "d", "split": "test", "prompt": "q",
           "completions": [{"completion_id": f"c{i}"} for i in range(4)]}  # fmt: skip
    pairs = list(make_pairs(row))
    assert len(pairs) == 6 and {p["split"] for p in pairs} == {"test"}
    assert len({(p["a"]["completion_id"], p["b"]["completion_id"]) for p in pairs}) == 6


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_check_leaks_catches_exact_and_near_duplicates(tmp_path):
    train = _write(tmp_path / "train.jsonl", [
        {"prompt": "Extract the entities from: Apple bought Beats in 2014.", "doc_id": "d1"},
        {"prompt": "Who is the CEO of Microsoft?", "doc_id": "d2"},
        {"prompt": "Describe the water cycle in two sentences.", "doc_id": "d3"},
    ])  # fmt: skip
    test = _write(tmp_path / "test.jsonl", [
        {"prompt": "What is the capital of Peru?", "doc_id": "d9"},
        {"prompt": "who is the CEO of   Microsoft?", "doc_id": "d8"},          # exact after normalising
        {"prompt": "Describe the water cycle in two short sentences.", "doc_id": "d7"},  # near duplicate
        {"prompt": "List three prime numbers.", "doc_id": "d1"},               # same document
    ])  # fmt: skip
    report = check_leaks({"train": train, "test": test}, near_dup_threshold=0.9)
    kinds = {(leak.kind, leak.field) for leak in report.leaks}
    assert kinds == {("exact", "prompt"), ("exact", "doc_id"), ("near", "prompt")}
    text = report.format()
    assert f"{train}:2 [train]" in text and f"{test}:2 [test]" in text  # the CEO prompt
    near = next(leak for leak in report.leaks if leak.kind == "near")
    assert {r[1] for r in near.rows} == {3} and near.similarity >= 0.9
    clean = check_leaks(
        {
            "train": train,
            "test": _write(tmp_path / "t2.jsonl", [{"prompt": "Name a planet.", "doc_id": "z"}]),
        }
    )
    assert clean.leaks == []


def test_check_leaks_cli_exit_codes(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"prompt": "same prompt", "split": "train", "doc_id": "x"},
                                      {"prompt": "same prompt", "split": "test", "doc_id": "y"}])  # fmt: skip
    res = CliRunner().invoke(app, ["check-leaks", a, "--near-dup-threshold", "0"])
    assert res.exit_code == 1 and f"{a}:1 [train]" in res.output and f"{a}:2 [test]" in res.output
    b = _write(
        tmp_path / "b.jsonl",
        [{"prompt": "one", "split": "train"}, {"prompt": "two", "split": "test"}],
    )
    res = CliRunner().invoke(app, ["check-leaks", b, "--near-dup-threshold", "0"])
    assert res.exit_code == 0 and "no leaks" in res.output


def test_exemplar_selection_is_greedy_forward():
    pool = ["a", "b", "c", "d"]
    dev_inputs, dev_refs = [1, 2, 3], ["x", "y", "z"]
    value = {"a": 0.1, "b": 0.5, "c": 0.3, "d": 0.0}

    def predict(exemplars, inputs):
        score = sum(value[e] for e in exemplars) + (
            0.4 if exemplars[:1] == ["c"] and "d" in exemplars else 0
        )
        return [score] * len(inputs)

    def metric(preds, refs):
        return preds[0]

    sel = select_exemplars(pool, dev_inputs, dev_refs, predict=predict, metric=metric, k=2)
    assert sel.indices == [1, 2] and sel.exemplars == ["b", "c"] and sel.baseline == 0.0
    assert sel.scores == [0.5, 0.8]
    stop = select_exemplars(
        pool, dev_inputs, dev_refs, predict=predict, metric=metric, k=4, stop_when_no_gain=True
    )
    assert stop.indices == [1, 2, 0]


def test_a_shared_system_message_is_no_leak_but_the_same_question_is(tmp_path):
    """Near duplicates are judged on what prompts ask, not on the instruction they all share
    (embedded with it, two different ner_finance sentences come out 0.96 alike)."""
    with open("examples/data/ner_finance.jsonl") as fh:
        system = json.loads(fh.readline())["input"][0]
    assert system["role"] == "system" and len(system["content"]) > 500

    def row(sentence, doc):
        return {"prompt": [system, {"role": "user", "content": sentence}], "doc_id": doc}

    train = _write(tmp_path / "train.jsonl", [
        row("Acme Corp hired Jane Doe in Paris.", "a"),
        row("The Borrower shall repay the Loan in full on the Maturity Date.", "b"),
    ])  # fmt: skip
    test = _write(tmp_path / "test.jsonl", [
        row("Globex bought Initech for $3 million.", "c"),
        row("The Borrower shall repay the loan in full on the maturity date .", "d"),
    ])  # fmt: skip
    report = check_leaks({"train": train, "test": test})
    assert [(leak.kind, {r[1] for r in leak.rows}) for leak in report.leaks] == [("near", {2})]
    assert report.leaks[0].value.startswith("The Borrower")  # the question, not the instruction
