"""Extraction F1 against hand-computed cases.

F1 = 2TP / (2TP + FP + FN), micro-averaged by summing TP/FP/FN over items.
"""

import json

import numpy as np
import pytest

from alignforge.evaluate.stats import bootstrap_ci
from alignforge.evaluate.tasks import get_task, load_ner_finance
from alignforge.evaluate.tasks.extraction import (
    lenient_norm,
    micro_f1,
    parse_bracket_entities,
)


def ents(*pairs):
    return {"entities": [{"name": n, "type": t} for n, t in pairs], "relations": []}


def out(*pairs, relations=()):
    return json.dumps(
        {
            "entities": [{"name": n, "type": t} for n, t in pairs],
            "relations": [{"source": s, "relation": r, "target": t} for s, r, t in relations],
        }
    )


@pytest.fixture
def task():
    return get_task("extraction")


def test_duplicates_use_multiset_semantics(task):
    # gold: Acme, Bob, Bob; pred: Acme, Bob, Alice -> TP 2 (Acme, one Bob), FP 1, FN 1
    gold = ents(("Acme Corp", "ORG"), ("Bob", "PERSON"), ("Bob", "PERSON"))
    s = task.score_item(out(("Acme Corp", "ORG"), ("Bob", "PERSON"), ("Alice", "PERSON")), gold)
    assert (s.values["tp"], s.values["fp"], s.values["fn"]) == (2, 1, 1)
    assert s.values["f1"] == pytest.approx(4 / 6)
    # one gold copy predicted three times: TP 1, FP 2 -> F1 = 2 / (2 + 2)
    s = task.score_item(out(*[("Bob", "PERSON")] * 3), ents(("Bob", "PERSON")))
    assert (s.values["tp"], s.values["fp"], s.values["fn"]) == (1, 2, 0)
    assert s.values["f1"] == pytest.approx(0.5)


def test_exact_is_case_sensitive_after_whitespace_collapse(task):
    gold = ents(("Acme Corp", "ORG"))
    assert task.reward(out(("  Acme \n Corp ", "ORG")), gold) == 1.0
    s = task.score_item(out(("ACME corp", "ORG")), gold)
    assert s.values["f1"] == 0.0 and s.values["lenient_f1"] == 1.0
    s = task.score_item(out(("Acme Corp.", "org")), gold)
    assert s.values["f1"] == 0.0 and s.values["lenient_f1"] == 1.0


def test_lenient_partial_name_containment_is_whole_word(task):
    gold = ents(("Silicon Valley Bank", "ORGANIZATION"))
    assert task.score_item(out(("Bank", "ORGANIZATION")), gold).values["lenient_f1"] == 1.0
    assert (
        task.score_item(out(("silicon valley bank inc", "ORGANIZATION")), gold).values["lenient_f1"]
        == 1.0
    )
    # not a whole word, or another type: no match
    assert task.score_item(out(("Ban", "ORGANIZATION")), gold).values["lenient_f1"] == 0.0
    assert task.score_item(out(("Bank", "LOCATION")), gold).values["lenient_f1"] == 0.0
    assert lenient_norm("  Acme,  Corp. ") == "acme corp"


def test_lenient_pairs_each_prediction_once(task):
    # two gold "Bank"-ish entities, one prediction: only one lenient TP
    gold = ents(("Silicon Valley Bank", "ORG"), ("First Bank", "ORG"))
    s = task.score_item(out(("bank", "ORG")), gold)
    assert (s.values["lenient_tp"], s.values["lenient_fp"], s.values["lenient_fn"]) == (1, 0, 1)


def test_empty_prediction_and_gold(task):
    assert task.reward(out(), ents()) == 1.0  # nothing to find, nothing found
    assert task.reward(out(("X", "ORG")), ents()) == 0.0
    assert task.reward(out(), ents(("X", "ORG"))) == 0.0
    assert task.reward('{"entities": []}', ents()) == 1.0


def test_relations_and_pooled_f1(task):
    gold = {
        "entities": [{"name": "A", "type": "ORG"}],
        "relations": [{"source": "A", "relation": "owns", "target": "B"}],
    }
    pred = out(("A", "ORG"), relations=[("A", "owns", "B"), ("B", "owns", "A")])
    s = task.score_item(pred, gold)
    # entities TP1; relations TP1 FP1 -> pooled TP2 FP1 FN0 -> 4/5
    assert s.values["relation_f1"] == pytest.approx(2 / 3)
    assert s.values["entity_f1"] == 1.0
    assert s.values["f1"] == pytest.approx(4 / 5)
    res = task.evaluate([pred], [gold], n_boot=200)
    assert res.breakdown["relation_types"]["owns"]["fp"] == 1


@pytest.mark.parametrize(
    "text",
    [
        "I cannot help with that.",
        "",
        '{"entities": [{"name": "A", "type": "ORG"}',  # truncated
        '{"people": ["A"]}',  # neither entities nor relations
        '{"entities": "A, B"}',
    ],
)
def test_parse_failures_score_zero_and_are_counted(task, text):
    gold = ents(("A", "ORG"), ("B", "ORG"))
    s = task.score_item(text, gold)
    assert not s.parsed and s.error
    assert s.values["f1"] == 0.0 and s.values["lenient_f1"] == 0.0
    assert s.values["fn"] == 2 and s.values["tp"] == 0
    assert task.reward(text, gold) == 0.0
    assert task.evaluate([text], [gold], n_boot=100).parse_failures == 1


def test_noisy_but_parseable_outputs(task):
    gold = ents(("A", "ORG"))
    for text in [
        'Here you go:\n```json\n{"entities": [{"name": "A", "type": "ORG"}]}\n```\nDone.',
        "{'entities': [{'name': 'A', 'type': 'ORG'}]} trailing words",
        '{"entities": [{"name": "A", "type": "ORG"},],}',
        '[{"name": "A", "type": "ORG"}]',
    ]:
        assert task.reward(text, gold) == 1.0, text
    # an invalid entry is dropped and counted, the rest still scores
    s = task.score_item('{"entities": [{"name": "A", "type": "ORG"}, {"name": 3}]}', gold)
    assert s.parsed and s.values["f1"] == 1.0 and s.detail["invalid_entries"] == 1


def test_micro_average_over_items_and_parse_failure_rate(task):
    gold1 = ents(("Acme Corp", "ORG"), ("Bob", "PERSON"), ("Bob", "PERSON"))
    pred1 = out(("Acme Corp", "ORG"), ("Bob", "PERSON"), ("Alice", "PERSON"))
    gold2 = ents(("X", "ORG"), ("Y", "ORG"), ("Z", "LOC"))
    # item1 TP2 FP1 FN1; item2 parse failure: FN3 -> TP2 FP1 FN4 -> F1 = 4/9
    res = task.evaluate([pred1, "junk"], [gold1, gold2], n_boot=200)
    assert res.metrics["f1"].value == pytest.approx(4 / 9)
    assert res.metrics["precision"].value == pytest.approx(2 / 3)
    assert res.metrics["recall"].value == pytest.approx(2 / 6)
    assert res.parse_failures == 1
    assert res.breakdown["parse_failure_rate"] == 0.5
    per = res.breakdown["entity_types"]
    assert per["PERSON"] == pytest.approx(
        {"precision": 0.5, "recall": 0.5, "f1": 0.5, "tp": 1, "fp": 1, "fn": 1, "support": 2}
    )
    assert per["LOC"]["recall"] == 0.0
    assert "relation_f1" not in res.metrics  # no relation anywhere: not reported


def test_reward_equals_per_item_metric(task):
    rng = np.random.default_rng(0)
    names = ["Acme", "Bob", "Alice", "Paris", "bank"]
    for _ in range(30):
        gold = ents(*[(names[i], "T") for i in rng.integers(0, 5, rng.integers(0, 4))])
        pred = out(*[(names[i], "T") for i in rng.integers(0, 5, rng.integers(0, 4))])
        one = task.evaluate([pred], [gold], n_boot=100)
        assert task.reward(pred, gold) == pytest.approx(one.metrics["f1"].value)
    batch = [out(("Acme", "T")), "junk"]
    assert task.rewards(batch, [ents(("Acme", "T"))] * 2) == [1.0, 0.0]
    lenient = get_task("extraction", reward_metric="lenient_f1")
    gold = ents(("Acme Corp", "ORG"))
    assert lenient.reward(out(("acme corp", "ORG")), gold) == 1.0
    assert task.reward(out(("acme corp", "ORG")), gold) == 0.0


def test_marginal_values_by_hand():
    from alignforge.evaluate.tasks.base import marginal_values, mean_of

    # (TP, FP, FN): pooled F1 = 2*1 / (2 + 1 + 0) = 2/3
    rows = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0]])
    # without row 0: F1(0, 1, 0) = 0 -> 3 * 2/3 = 2; without row 1: F1(1, 0, 0) = 1 -> 3 * (2/3 - 1) = -1
    np.testing.assert_allclose(marginal_values(rows, micro_f1), [2.0, -1.0, 0.0])
    # nothing counted anywhere: nothing earned (not the per-item "1.0 for nothing to find")
    np.testing.assert_allclose(marginal_values(np.zeros((2, 3)), micro_f1), [0.0, 0.0])
    # the only counted row is worth the whole metric times N
    np.testing.assert_allclose(
        marginal_values(np.array([[1, 0, 1], [0, 0, 0]]), micro_f1), [2 * 2 / 3, 0.0]
    )
    # for a mean of item scores the marginal value is the item's own score
    np.testing.assert_allclose(
        marginal_values(np.array([[0.2], [0.9], [0.4]]), mean_of(0)), [0.2, 0.9, 0.4]
    )


def test_marginal_values_against_a_context_of_earlier_items():
    from alignforge.evaluate.tasks.base import marginal_values

    miss = np.array([[0, 0, 1]])  # a missed entity
    # alone the pooled F1 is 0 with or without it: no signal at all
    np.testing.assert_allclose(marginal_values(miss, micro_f1), [0.0])
    # pooled with an earlier hit (1, 0, 0): F1 = 2/3, without the miss 1 -> 2 * (2/3 - 1)
    np.testing.assert_allclose(
        marginal_values(miss, micro_f1, context=np.array([[1, 0, 0]])), [-2 / 3]
    )


def test_marginal_rewards_pool_each_batch_with_the_recent_ones():
    task = get_task("extraction", marginal_reward=True, marginal_window=2)
    hit, miss = (out(("Acme", "ORG")), ents(("Acme", "ORG"))), (out(), ents(("Bob", "PER")))
    assert task.rewards([miss[0]], [miss[1]]) == [0.0]  # first batch: F1 0 either way
    assert task.rewards([hit[0]], [hit[1]]) == pytest.approx([2 * (2 / 3 - 0)])  # pool: miss, hit
    # pool: miss, hit, miss (window 2 keeps the last two before it): (1, 0, 2) -> 2/4; without it 2/3
    assert task.rewards([miss[0]], [miss[1]]) == pytest.approx([3 * (0.5 - 2 / 3)])


def test_marginal_reward_credits_what_the_corpus_f1_credits():
    """Per item, an empty answer to a sentence without entities scores 1.0 and a wrong guess 0;
    for the pooled F1 the empty answer adds nothing, a found entity a lot and a wrong one a little."""
    task = get_task("extraction", marginal_reward=True)
    golds = [ents(), ents(("Acme", "ORG")), ents(("Bob", "PER")), ents()]
    preds = [out(), out(("Acme", "ORG")), out(("Rob", "PER")), out(("X", "ORG"))]
    assert get_task("extraction").rewards(preds, golds) == [1.0, 1.0, 0.0, 0.0]
    # pooled (TP, FP, FN) = (1, 2, 1): F1 = 2/5. Without item 1: (0, 2, 1) -> 0; without 2: (1, 1, 0) -> 2/3;
    # without 3: (1, 1, 1) -> 1/2. Rewards: 4 * (F1 - F1 without the item)
    np.testing.assert_allclose(
        task.rewards(preds, golds), [0.0, 1.6, 4 * (0.4 - 2 / 3), 4 * (0.4 - 0.5)]
    )


def test_bootstrap_ci_of_micro_f1_resamples_item_rows(task):
    rng = np.random.default_rng(3)
    golds, preds = [], []
    for _ in range(60):
        g = [(f"E{i}", "T") for i in range(rng.integers(1, 4))]
        p = [e for e in g if rng.random() < 0.7] + [("Z", "T")] * int(rng.random() < 0.3)
        golds.append(ents(*g))
        preds.append(out(*p))
    res = task.evaluate(preds, golds, n_boot=500, seed=1)
    rows = np.array([[it.values[c] for c in ("tp", "fp", "fn")] for it in res.items])
    manual = bootstrap_ci(rows, micro_f1, n_boot=500, seed=1)
    assert res.metrics["f1"] == pytest.approx(manual)
    e = res.metrics["f1"]
    assert e.low < e.value < e.high and e.high - e.low < 0.3
    small = task.evaluate(preds[:15], golds[:15], n_boot=500, seed=1).metrics["f1"]
    assert (small.high - small.low) > (e.high - e.low)


def test_ner_finance_loader_converts_gold():
    rows = load_ner_finance("examples/data/ner_finance.jsonl")
    assert len(rows) == 1164
    first = rows[0]
    assert first["messages"][0]["role"] == "system" and "JSON" in first["messages"][0]["content"]
    assert first["messages"][1]["content"].startswith("This LOAN AND SECURITY AGREEMENT")
    assert first["reference"]["entities"][0] == {
        "name": "SILICON VALLEY BANK",
        "type": "ORGANIZATION",
    }
    assert [e["name"] for e in first["reference"]["entities"]].count("California") == 2
    assert first["reference"]["relations"] == []
    assert parse_bracket_entities("No entities found").entities == []
    with pytest.raises(ValueError, match="NAME - TYPE"):
        parse_bracket_entities("[Acme]")


def test_task_reads_raw_ner_finance_rows(task):
    raw = json.loads(open("examples/data/ner_finance.jsonl").readline())
    ex = task.example(raw, 0)
    assert ex.messages[-1]["role"] == "user"
    gold_json = json.dumps(ex.reference)
    assert task.reward(gold_json, ex.reference) == 1.0


def test_bad_rows_name_the_row(task):
    with pytest.raises(ValueError, match="row 4: no reference"):
        task.example({"text": "hello"}, 4)
    with pytest.raises(ValueError, match="row 2: field 'ideal'"):
        task.example({"input": [{"role": "user", "content": "x"}], "ideal": "[Acme]"}, 2)
