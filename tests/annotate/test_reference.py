"""The reference judge: per-aspect verdicts against gold answers, hand-made pairs, and its place
wherever a judge plugs in (run_judge, the CLI, blind tests)."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from alignforge.annotate.blind import blind_items, blind_report
from alignforge.annotate.cli import app
from alignforge.annotate.importer import RowError
from alignforge.annotate.judge import JudgeError, run_judge
from alignforge.annotate.reference import (
    ReferenceJudge,
    aspect_measures,
    read_references,
    reference_verdict,
)
from alignforge.annotate.store import Store
from tests.annotate.helpers import write_jsonl

MEASURES = {"entities": "entity_f1", "relations": "relation_f1", "summary": "format"}
QUESTIONS = {"entities": "Entities?", "relations": "Relations?", "summary": "Concise, valid?"}
ACME, JANE, PARIS = ("Acme Corp", "ORG"), ("Jane Doe", "PER"), ("Paris", "LOC")
WORKS = ("Jane Doe", "works_for", "Acme Corp")
GOLD = {
    "entities": [{"name": n, "type": t} for n, t in (ACME, JANE, PARIS)],
    "relations": [{"source": s, "relation": r, "target": o} for s, r, o in [WORKS]],
}


def answer(entities=(), relations=()) -> str:
    return json.dumps({
        "entities": [{"name": n, "type": t} for n, t in entities],
        "relations": [{"source": s, "relation": r, "target": o} for s, r, o in relations],
    })  # fmt: skip


def test_more_correct_entities_win_entities():
    """a finds all 3 gold entities (F1 1); b finds 2 and invents one: TP 2, FP 1, FN 1, so
    F1 = 2*2 / (2*2 + 1 + 1) = 2/3. Same relations, both clean JSON: those aspects tie."""
    a = answer([ACME, JANE, PARIS], [WORKS])
    b = answer([ACME, JANE, ("Berlin", "LOC")], [WORKS])
    v = reference_verdict(a, b, GOLD, MEASURES)
    assert v.scores == {"entities": 1, "relations": 0, "summary": 0}
    assert v.a["entity_f1"] == 1.0 and v.b["entity_f1"] == pytest.approx(2 / 3)
    # the other way round the verdict is the mirror image: nothing depends on the order
    assert reference_verdict(b, a, GOLD, MEASURES).scores == {k: -s for k, s in v.scores.items()}


def test_a_relation_difference_decides_relations_only():
    """Same entities; a has the gold relation, b the wrong label (F1 1 vs 0)."""
    a = answer([ACME, JANE], [WORKS])
    b = answer([ACME, JANE], [("Jane Doe", "founded", "Acme Corp")])
    v = reference_verdict(a, b, GOLD, MEASURES)
    assert v.scores == {"entities": 0, "relations": 1, "summary": 0}
    assert (v.a["relation_f1"], v.b["relation_f1"]) == (1.0, 0.0)
    # on the 5-point scale a difference above 0.5 is "much better"
    assert reference_verdict(a, b, GOLD, MEASURES, "likert5").scores["relations"] == 2


def test_invalid_json_loses_format_and_prose_around_it_loses_to_clean_json():
    clean = answer([ACME], [])
    broken = '{"entities": [{"name": "Acme Corp" "type": "ORG"}]}'  # a comma missing
    v = reference_verdict(clean, broken, GOLD, MEASURES)
    assert v.scores["summary"] == 1 and v.b["format"] == 0.0
    assert v.b["problems"] == ["no JSON object found in output"]
    # an unreadable answer scores 0 on everything: it also loses entities
    assert v.scores["entities"] == 1
    chatty = f"Sure! Here it is: {clean} Anything else?"
    v = reference_verdict(clean, chatty, GOLD, MEASURES, "likert5")
    assert (v.a["format"], v.b["format"], v.b["problems"]) == (1.0, 0.5, ["text_around"])
    assert v.scores == {"entities": 0, "relations": 0, "summary": 1}  # 0.5 apart: "better"
    # cut off after the entities: the task still reads them, the cut is a format problem
    v = reference_verdict(clean, clean[:-3], GOLD, MEASURES)
    assert v.scores == {"entities": 0, "relations": 0, "summary": 1}
    assert v.b["problems"] == ["truncated"]


def test_equal_answers_tie_and_likert_magnitudes_by_hand():
    a = answer([ACME, JANE, PARIS], [WORKS])
    for scale in ("ab", "likert5"):
        assert reference_verdict(a, a, GOLD, MEASURES, scale).scores == dict.fromkeys(MEASURES, 0)
    # entity F1: a = 1, b (one of three) = 2/(2+2) = 0.5 -> difference 0.5, not above: "better"
    b = answer([ACME], [WORKS])
    assert reference_verdict(a, b, GOLD, MEASURES, "likert5").scores["entities"] == 1
    # nothing found at all: F1 0, difference 1 -> "much better"
    assert (
        reference_verdict(a, answer([], [WORKS]), GOLD, MEASURES, "likert5").scores["entities"] == 2
    )


def test_overall_is_the_sum_of_aspects_and_the_measures_are_stored(tmp_path):
    store = Store.create(tmp_path / "p")
    a = answer([ACME, JANE, PARIS], [])  # entities +1, relations -1 (b has it), format 0
    b = answer([ACME], [WORKS])
    c = "no JSON here"
    store.insert_items([
        {"pair_key": "k1", "prompt_id": "p1", "prompt": "doc", "a_text": a, "b_text": b},
        {"pair_key": "k2", "prompt_id": "p1", "prompt": "doc", "a_text": a, "b_text": c},
        {"pair_key": "k3", "prompt_id": "nogold", "prompt": "doc", "a_text": a, "b_text": c},
    ])  # fmt: skip
    r = run_judge(store, ReferenceJudge({"p1": GOLD}, MEASURES), "reference", QUESTIONS,
                  workers=2, progress=False)  # fmt: skip
    assert (r.n_judged, r.n_failed, r.n_inconsistent) == (2, 1, 0)
    assert "no reference answer for prompt_id 'nogold'" in r.errors[0]
    with store.connect() as conn:
        js = {j.item_id: j for j in store.judgements(conn)}
        why = json.loads(conn.execute("SELECT answers_json FROM judgements WHERE item_id=1")
                         .fetchone()[0])  # fmt: skip
    assert js[1].user == "judge:reference" and js[1].role == "judge"
    assert js[1].scores == {"entities": 1, "relations": -1, "summary": 0} and js[1].overall == 0
    # c is no JSON: F1 0 everywhere; a has no relation either (relation F1 0): a tie there
    assert js[2].scores == {"entities": 1, "relations": 0, "summary": 1} and js[2].overall == 2
    assert why["measures"] == MEASURES
    assert why["a"]["entity_f1"] == 1.0 and why["b"]["entity_f1"] == 0.5
    assert why["b"]["relation_f1"] == 1.0 and why["a"]["relation_f1"] == 0.0


def test_references_file_and_measures_errors_name_the_line_and_field(tmp_path):
    good = write_jsonl(tmp_path / "g.jsonl", [
        {"prompt_id": "p1", "reference": GOLD}, {"id": 7, "reference": "[Acme Corp - ORG]"},
    ])  # fmt: skip
    assert read_references(good) == {"p1": GOLD, "7": "[Acme Corp - ORG]"}
    for rows, msg in [
        ([{"reference": GOLD}], ":1: field 'prompt_id' (or 'id') is missing"),
        ([{"prompt_id": "p"}], ":1: field 'reference' is missing"),
        ([{"prompt_id": "p", "reference": GOLD}, {"id": "q", "reference": "Acme"}],
         ":2: field 'reference': expected '[NAME - TYPE, ...]'"),
    ]:  # fmt: skip
        with pytest.raises(RowError, match=re.escape(msg)):
            read_references(write_jsonl(tmp_path / "b.jsonl", rows))
    with pytest.raises(JudgeError, match="aspect 'clarity' has no reference measure"):
        aspect_measures(["entities", "clarity"], MEASURES)


def test_blind_test_judged_against_the_gold(tmp_path):
    """System 'good' finds every entity, 'weak' one of three: the reference prefers good on
    every item, so the blind report reads 100% wins."""

    def rows(out: str) -> list[dict]:
        return [{"id": f"d{i}", "prompt": f"doc {i}", "output": out} for i in range(5)]

    pa = write_jsonl(tmp_path / "good.jsonl", rows(answer([ACME, JANE, PARIS], [WORKS])))
    pb = write_jsonl(tmp_path / "weak.jsonl", rows(answer([ACME], [WORKS])))
    store = Store.create(tmp_path / "p")
    store.insert_items(blind_items(pa, pb, "good", "weak"))
    judge = ReferenceJudge({f"d{i}": GOLD for i in range(5)}, MEASURES)
    assert run_judge(store, judge, "reference", QUESTIONS, kind="blind", progress=False).n_judged
    rep = blind_report(store, annotators="judge", n_boot=200)[0]
    assert (rep.system_a, rep.n_items, rep.result.win.value) == ("good", 5, 1.0)


def test_the_judge_command_with_a_references_file(tmp_path):
    from tests.annotate.helpers import make_project

    store, _ = make_project(tmp_path / "p", n_prompts=2, k=3)
    gold = write_jsonl(tmp_path / "gold.jsonl", [
        {"prompt_id": f"p{i}", "reference": {"entities": [{"name": "Acme Corp", "type": "ORG"}]}}
        for i in range(2)
    ])  # fmt: skip
    runner = CliRunner()
    r = runner.invoke(app, ["judge", str(store.dir), "--reference", str(gold)])
    assert r.exit_code == 0 and "judged 6/6 items" in r.output, r.output
    with store.connect() as conn:
        assert {j.user for j in store.judgements(conn)} == {"judge:reference"}
    r = runner.invoke(app, ["judge", str(store.dir)])
    assert r.exit_code == 2 and "either --reference FILE or --base-url and --model" in r.output
    r = runner.invoke(app, ["judge", str(store.dir), "--reference", str(gold), "--model", "m"])
    assert r.exit_code == 2
    r = runner.invoke(app, ["judge", str(store.dir), "--model", "m"])
    assert r.exit_code == 2 and "--base-url is missing" in r.output
    r = runner.invoke(app, ["judge", str(store.dir), "--reference", str(tmp_path / "nope.jsonl")])
    assert r.exit_code == 2 and "does not exist" in r.output
