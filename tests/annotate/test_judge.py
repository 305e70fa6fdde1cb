"""AI judge over real HTTP (a local OpenAI-compatible server), position-swap debiasing."""

import json

import pytest

from alignforge.annotate.blind import blind_items, blind_report
from alignforge.annotate.export import export_dataset
from alignforge.annotate.judge import (
    JudgeError,
    OpenAIChatBackend,
    judge_human_agreement,
    judge_pair,
    parse_verdict,
    run_judge,
)
from tests.annotate.helpers import extraction, make_project, write_jsonl
from tests.annotate.judge_server import JudgeServer, count_entities

QS = {"entities": "Which has more complete and accurate entities?",
      "relations": "Which infers the key relationships better?"}  # fmt: skip
BIG = extraction([("Acme", "ORG"), ("Jane", "PER"), ("Paris", "LOC")])
SMALL = extraction([("Acme", "ORG")])


def test_fair_judge_over_http_is_consistent_under_swap():
    with JudgeServer("entities", fenced=True) as srv:
        be = OpenAIChatBackend(srv.url, "rule-judge", backoff=0.01)
        v = judge_pair(be, "Acme hired Jane in Paris.", BIG, SMALL, QS)
        assert v.scores == {"entities": 1, "relations": 1}
        assert all(v.consistent.values())
        v = judge_pair(be, "Acme hired Jane in Paris.", SMALL, BIG, QS)
        assert v.scores == {"entities": -1, "relations": -1}
        assert len(srv.requests) == 4
        # both orders were really asked
        users = [r["messages"][-1]["content"] for r in srv.requests[:2]]
        assert users[0].index(BIG) < users[0].index(SMALL)
        assert users[1].index(SMALL) < users[1].index(BIG)
        # structured output: the schema admits only a verdict on the asked aspects
        fmt = srv.requests[0]["response_format"]
        assert fmt["type"] == "json_schema"
        schema = fmt["json_schema"]["schema"]
        assert (
            set(schema["required"]) == set(schema["properties"])
            and schema["additionalProperties"] is False
        )
        assert all(v["enum"] == ["1", "2", "tie"] for v in schema["properties"].values())
        assert srv.requests[0]["model"] == "rule-judge"


def test_position_biased_judge_becomes_tie():
    with JudgeServer("first") as srv:
        v = judge_pair(OpenAIChatBackend(srv.url, "biased"), "doc", BIG, SMALL, QS)
    assert v.scores == {"entities": 0, "relations": 0}
    assert not any(v.consistent.values())


def test_retries_and_json_mode_fallback():
    with JudgeServer("entities", fail_first=2) as srv:
        be = OpenAIChatBackend(srv.url, "m", backoff=0.01, max_retries=3)
        assert judge_pair(be, "doc", BIG, SMALL, QS).scores["entities"] == 1
        assert len(srv.requests) == 4  # two 503s, then both orders
    with JudgeServer("entities", fail_first=100) as srv:
        be = OpenAIChatBackend(srv.url, "m", backoff=0.01, max_retries=2)
        with pytest.raises(JudgeError, match="HTTP 503"):
            be.chat([{"role": "user", "content": "x"}])
        assert len(srv.requests) == 3
    with JudgeServer("entities", reject_json_mode=True) as srv:
        be = OpenAIChatBackend(srv.url, "m")
        assert judge_pair(be, "doc", SMALL, BIG, QS).scores["entities"] == -1
        assert "response_format" in srv.requests[0]
        assert all("response_format" not in r for r in srv.requests[1:])


def test_check_fails_fast_naming_the_field():
    with JudgeServer("entities") as srv:
        OpenAIChatBackend(srv.url, "m").check("--base-url")  # any reply counts
        port = int(srv.url.split(":")[-1].split("/")[0])
    be = OpenAIChatBackend(f"http://127.0.0.1:{port}/v1", "m")
    with pytest.raises(JudgeError, match=rf"--base-url http://127.0.0.1:{port}/v1: cannot connect"):
        be.check("--base-url")


def test_parse_verdict_is_robust():
    keys = ["entities", "relations"]
    assert parse_verdict('{"Entities": "Response 1", "relations": "tie"}', keys) == {
        "entities": 1,
        "relations": 0,
    }
    assert parse_verdict('blah {"answers": {"entities": 2, "relations": "B"}}', keys) == {
        "entities": -1,
        "relations": -1,
    }
    assert parse_verdict("entities: 1\nrelations = 2", keys) == {"entities": 1, "relations": -1}
    assert parse_verdict('{"entities": -2, "relations": 1}', keys, "likert5") == {
        "entities": -2,
        "relations": 1,
    }
    with pytest.raises(JudgeError, match="relations"):
        parse_verdict('{"entities": "1"}', keys)
    with pytest.raises(JudgeError):
        parse_verdict('{"entities": "maybe", "relations": "1"}', keys)


def test_callable_backend_and_likert_swap_rule():
    calls = []

    def fn(messages, **kw):
        calls.append(messages)
        return '{"entities": 2, "relations": -1}'  # always favours response 1 strongly on one

    v = judge_pair(fn, "doc", "x", "y", QS, scale="likert5")
    # (a,b): entities +2; (b,a): +2 for b -> -2 for a: signs differ -> 0
    # relations: -1 then -1 for b -> +1 for a: signs differ -> 0
    assert v.scores == {"entities": 0, "relations": 0} and len(calls) == 2


def test_run_judge_stores_verdicts_export_and_kappa_against_humans(tmp_path):
    store, tokens = make_project(tmp_path / "p", n_prompts=4, k=3, overlap=1.0)
    cfg_q = {"entities": "E?", "relations": "R?", "summary": "S?"}
    with JudgeServer("entities") as srv:
        be = OpenAIChatBackend(srv.url, "rule")
        r = run_judge(store, be, "rule", cfg_q, workers=3, progress=False)
        assert (r.n_items, r.n_judged, r.n_failed) == (12, 12, 0)
        again = run_judge(store, be, "rule", cfg_q, progress=False)
        assert again.n_items == 0 and again.n_already == 12  # resumable: nothing asked twice
    with store.connect() as conn:
        js = store.judgements(conn)
        assert {j.user for j in js} == {"judge:rule"}
        # humans: alice follows the same rule, bob the opposite
        for name, sign in [("alice", 1), ("bob", -1)]:
            user = store.user_by_token(conn, tokens[name])
            while (s := store.next_item(conn, user)) is not None:
                it = store.item(conn, s.item_id)
                d = count_entities(it["a_text"]) - count_entities(it["b_text"])
                canon = sign * ((d > 0) - (d < 0))
                disp = -canon if s.swapped else canon
                store.submit(conn, user, s.item_id, f"{name}-{s.item_id:05d}",
                             {k: disp for k in cfg_q})  # fmt: skip
        js = store.judgements(conn)
    ag = {a.aspect: a for a in judge_human_agreement(js, "judge:rule", list(cfg_q))}
    assert ag["entities"].n == 24
    assert ag["entities"].accuracy == pytest.approx(0.5)  # agrees with alice, never with bob
    rep = export_dataset(store.dir, tmp_path / "judge.jsonl", annotators="judge:rule", ties="drop")
    rows = [json.loads(x) for x in open(tmp_path / "judge.jsonl")]
    assert rep.n_records == len(rows) > 0
    for row in rows:
        chosen = row["chosen"][0]["content"]
        assert count_entities(chosen) > count_entities(row["rejected"][0]["content"])
        assert row["annotators"] == ["judge:rule"]


def test_blind_test_from_the_ai_judge(tmp_path):
    store, _ = make_project(tmp_path / "p", n_prompts=1, k=2)
    ours, theirs = [], []
    for i in range(20):
        big_first = i % 4 != 0  # ours has more entities on 15 of 20 inputs
        ours.append({"id": f"q{i}", "prompt": f"doc {i}", "output": BIG if big_first else SMALL})
        theirs.append({"id": f"q{i}", "prompt": f"doc {i}", "output": SMALL if big_first else BIG})
    items = blind_items(write_jsonl(tmp_path / "a.jsonl", ours), write_jsonl(tmp_path / "b.jsonl", theirs),
                        "ours", "frontier")  # fmt: skip
    store.insert_items(items)
    with JudgeServer("entities") as srv:
        run_judge(
            store, OpenAIChatBackend(srv.url, "rule"), "rule", QS, kind="blind", progress=False
        )
    (rep,) = blind_report(store, annotators="judge")
    assert (rep.system_a, rep.system_b, rep.n_items) == ("ours", "frontier", 20)
    assert rep.result.win.value == pytest.approx(0.75)
    assert rep.result.loss.value == pytest.approx(0.25)
    assert rep.result.win.low < 0.75 < rep.result.win.high


def test_local_judge_answers_within_the_verdict_schema(tiny_model_dir):
    """A local model under constrained decoding can only emit a parseable verdict."""
    from alignforge.annotate.judge import judge_pair
    from alignforge.workflow.steps import _ai_backend

    v = judge_pair(_ai_backend(tiny_model_dir, None), "Name the city.", "Paris", "Lyon",
                   {"accuracy": "Which is right?", "style": "Which reads better?"})  # fmt: skip
    assert set(v.scores) == {"accuracy", "style"} and all(
        s in (-1, 0, 1) for s in v.scores.values()
    )


def test_callable_backend_passes_only_the_options_the_function_takes():
    from alignforge.annotate.judge import as_backend

    seen = []
    assert as_backend(lambda m: "x").chat([], response_format={"type": "json_object"}) == "x"
    as_backend(lambda m, **kw: seen.append(kw) or "y").chat([], response_format={"a": 1})
    assert seen == [{"response_format": {"a": 1}}]


def test_the_command_fails_when_items_were_not_judged(tmp_path, monkeypatch, capsys):
    """Every request refused (HTTP 400): the command says so and exits non-zero instead of
    printing "judged 0/12" and succeeding."""
    from alignforge.cli import main

    make_project(tmp_path / "p", n_prompts=4, k=3, overlap=1.0)
    with JudgeServer(reject_all=True) as srv:
        argv = ["alignforge", "annotate", "judge", str(tmp_path / "p"), "--base-url", srv.url,
                "--model", "rule"]  # fmt: skip
        monkeypatch.setattr("sys.argv", argv)
        with pytest.raises(SystemExit) as done:
            main()
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "12 of 12 items were not judged" in err and "longer than the context" in err
    assert "Traceback" not in err
