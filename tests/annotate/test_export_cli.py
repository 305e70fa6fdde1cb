"""Export policies (hand-worked aggregates), blind-test reports and the CLI end to end."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from alignforge.annotate.blind import blind_report
from alignforge.annotate.cli import app
from alignforge.annotate.export import aggregate, build_records, write_records
from alignforge.annotate.store import Judgement
from tests.annotate.helpers import make_project, sample_rows, write_jsonl


def J(user: str, overall: float, scores=None) -> Judgement:
    return Judgement(0, 0, user, "annotator", 1, scores or {"e": overall}, overall, 1.0, 1.0, 0.0)


def test_aggregate_policies_by_hand():
    """Three raters with overall +2, +1, -3: signs +, +, - -> majority '+' with 2/3 agreement.
    mean over all = 0/3 = 0 (a tie!); over the majority only = (2 + 1) / 2 = 1.5."""
    js = [J("r1", 2), J("r2", 1), J("r3", -3)]
    assert aggregate(js, "drop", 0.7) is None  # 2/3 < 0.7
    kept = aggregate(js, "drop", 0.6)
    assert kept.agreement == pytest.approx(2 / 3) and kept.score == 0.0
    maj = aggregate(js, "majority", 0.99)
    assert maj.score == pytest.approx(1.5) and maj.raters == ["r1", "r2"]
    # a 1-1 split between + and - has no majority: tie, agreement 1/2
    split = aggregate([J("r1", 1), J("r2", -1)], "majority", 0.0)
    assert split.score == 0.0 and split.agreement == 0.5


def _judge_everything(store, tokens, rule):
    """Annotators judge all their items; ``rule(name, item) -> canonical score per aspect``."""
    with store.connect() as conn:
        for name in tokens:
            if name == "admin":
                continue
            user = store.user_by_token(conn, tokens[name])
            while (s := store.next_item(conn, user)) is not None:
                v = rule(name, store.item(conn, s.item_id))
                disp = {k: (-x if s.swapped else x) for k, x in v.items()}
                store.submit(conn, user, s.item_id, f"{name}-{s.item_id:06d}", disp)


def test_export_ties_and_splits(tmp_path):
    store, tokens = make_project(tmp_path / "p", annotators=["alice"], n_prompts=6, k=3)

    # a wins entities; summary says b for pairs whose b is the greedy... -> overall +1 or tie
    def rule(name, it):
        tie = it["b_id"] == "c2"
        return {"entities": 1, "relations": 0, "summary": -1 if tie else 0}

    _judge_everything(store, tokens, rule)
    recs, rep = build_records(store, ties="drop")
    assert rep.n_items_judged == 18 and rep.n_ties_dropped == 12 and rep.n_records == 6
    assert all(r["chosen_id"] == "c0" and r["rejected_id"] == "c1" for r in recs)
    r = recs[0]
    assert r["margin"] == 1.0 and r["aspect_scores"] == {
        "entities": 1.0,
        "relations": 0.0,
        "summary": 0.0,
    }
    assert r["policy"] == {"model": "tiny-sft", "fingerprint": "abc123"}
    assert isinstance(r["prompt"], list) and r["chosen"][0]["role"] == "assistant"
    recs_m0, rep_m0 = build_records(store, ties="margin0")
    assert rep_m0.n_records == 18 and sum(x["tie"] for x in recs_m0) == 12
    recs_both, _ = build_records(store, ties="both")
    assert len(recs_both) == 6 + 24
    files = write_records(recs, tmp_path / "out", fmt="both")
    splits = {p.split("/")[-1] for p in files}
    assert {"train.jsonl", "validation.jsonl", "test.jsonl", "train.parquet"} <= splits
    assert rep.per_split == {"train": 4, "validation": 1, "test": 1}
    import pyarrow.parquet as pq

    assert pq.read_table(tmp_path / "out" / "train.parquet").num_rows == 4
    with pytest.raises(ValueError, match="ties must be one of"):
        build_records(store, ties="keep")


def test_blind_report_from_human_judgements_like_the_payoff(tmp_path):
    """49 inputs where ours wins, 27 where the frontier model wins, 24 with no preference."""
    store, tokens = make_project(tmp_path / "p", annotators=["alice"], n_prompts=1, k=2)
    outcome = ["win"] * 49 + ["loss"] * 27 + ["tie"] * 24
    ours = [{"id": f"q{i}", "prompt": f"doc {i}", "output": f"ours {i}"} for i in range(100)]
    theirs = [{"id": f"q{i}", "prompt": f"doc {i}", "output": f"frontier {i}"} for i in range(100)]
    runner = CliRunner()
    res = runner.invoke(app, ["blind", "import", str(store.dir),
                              str(write_jsonl(tmp_path / "a.jsonl", ours)),
                              str(write_jsonl(tmp_path / "b.jsonl", theirs)),
                              "--name-a", "ours", "--name-b", "frontier", "--batch", "blind1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    from fastapi.testclient import TestClient

    from alignforge.annotate.server import create_app

    c = TestClient(create_app(store.dir))
    hdr = {"Authorization": f"Bearer {tokens['alice']}"}
    seen_sides = set()
    while (it := c.get("/api/next", headers=hdr).json()["item"]) is not None:
        page = c.get("/task", headers=hdr).text
        assert "frontier" not in page.replace("frontier " + it["document"][4:], "")  # names hidden
        i = int(it["document"].split()[1]) if it["document"].startswith("doc ") else None
        if i is None:  # the one sampling pair of the project
            want = "tie"
        else:
            want = {"win": "ours", "loss": "frontier", "tie": "tie"}[outcome[i]]
        if i is not None:
            seen_sides.add(it["a"].split()[0])
        key = "2" if want == "tie" else ("1" if it["a"].startswith(want) else "3")
        body = {"item_id": it["item_id"], "submission_id": f"x-{it['item_id']:06d}",
                "answers": {"entities": key, "relations": key, "summary": key}}  # fmt: skip
        assert c.post("/api/submit", json=body, headers=hdr).status_code == 200
    assert seen_sides == {"ours", "frontier"}  # sides were randomised
    (rep,) = blind_report(store)
    w = rep.result
    assert rep.n_items == 100
    assert (w.win.value, w.loss.value, w.tie.value) == pytest.approx((0.49, 0.27, 0.24))
    assert w.win.low < 0.49 < w.win.high and w.win.high - w.win.low < 0.25
    res = runner.invoke(app, ["blind", "report", str(store.dir)])
    assert res.exit_code == 0 and "ours preferred" in res.output and "49.0%" in res.output


def test_cli_end_to_end(tmp_path):
    runner = CliRunner()
    proj = tmp_path / "ann"
    aspects = tmp_path / "aspects.yaml"
    aspects.write_text("aspects:\n  - {key: entities, question: 'Which has better entities?'}\n"
                       "  - {key: relations, question: 'Which has better relations?'}\nscale: ab\n")  # fmt: skip
    r = runner.invoke(app, ["init", str(proj), "--config", str(aspects)])
    assert r.exit_code == 0, r.output
    bad = tmp_path / "bad.yaml"
    bad.write_text("aspects:\n  - {key: entities, question: 'Q1?'}\noverlapp: 0.3\n")
    r = runner.invoke(app, ["init", str(tmp_path / "x"), "--config", str(bad)])
    assert r.exit_code == 2 and "overlapp" in r.output
    r = runner.invoke(app, ["add-user", str(proj), "alice", "--role", "annotator"])
    assert r.exit_code == 0
    token = r.stdout.strip().splitlines()[0]
    assert len(token) >= 40
    assert runner.invoke(app, ["add-user", str(proj), "alice"]).exit_code == 2
    assert runner.invoke(app, ["add-user", str(proj), "eve", "--role", "root"]).exit_code == 2
    samples = write_jsonl(tmp_path / "s.jsonl", sample_rows(4, 3))
    r = runner.invoke(app, ["import", str(proj), str(samples)])
    assert r.exit_code == 0 and "12 new" in r.output, r.output
    r = runner.invoke(app, ["import", str(proj), str(samples)])
    assert "0 new, 12 already imported" in r.output
    leak = sample_rows(4, 3)
    leak[0]["split"] = "test"
    r = runner.invoke(app, ["import", str(proj), str(write_jsonl(tmp_path / "l.jsonl", leak))])
    assert r.exit_code == 2 and "split prompts before pairing" in r.output
    r = runner.invoke(app, ["release", str(proj), "--batch", "t", "--size", "3", "--trial"])
    assert r.exit_code == 0 and "3 shared (trial)" in r.output
    r = runner.invoke(app, ["release", str(proj), "--batch", "b1", "--overlap", "0.5"])
    assert r.exit_code == 0 and "9 items" in r.output
    r = runner.invoke(app, ["stats", str(proj)])
    assert r.exit_code == 0 and "0 judgements, 12/12 items released" in r.output
    r = runner.invoke(app, ["stats", str(proj), "--json"])
    assert json.loads(r.output)["n_items"] == 12
    r = runner.invoke(app, ["export", str(proj), str(tmp_path / "o.jsonl")])
    assert r.exit_code == 0 and "0 records" in r.output
    r = runner.invoke(app, ["export", str(proj), str(tmp_path / "o.jsonl"), "--ties", "x"])
    assert r.exit_code == 2
    for cmd in ["init", "add-user", "import", "release", "serve", "export", "judge", "stats",
                "blind"]:  # fmt: skip
        r = runner.invoke(app, [cmd, "--help"])
        assert r.exit_code == 0 and "Usage" in r.output, cmd
    assert runner.invoke(app, ["stats", str(tmp_path / "nope")]).exit_code == 2
