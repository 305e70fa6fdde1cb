"""The lead's review pages: one annotator's record, and the adjudication queue into the export."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from alignforge.annotate.export import build_records
from alignforge.annotate.server import create_app
from tests.annotate.helpers import answers_for, key_for, login, make_project


def _client(app) -> TestClient:
    return TestClient(app, follow_redirects=False)


def _judge(app, store, token: str, want: str, comment: str = "") -> list[int]:
    """Judge every item of the queue as ``want`` ('a' / 'b' in the item's own terms)."""
    c, hdr, done = _client(app), {"Authorization": f"Bearer {token}"}, []
    while (it := c.get("/api/next", headers=hdr).json()["item"]) is not None:
        ans = {k: key_for(store, it, want) for k in answers_for(store)}
        body = {"item_id": it["item_id"], "submission_id": f"{want}-{token[:6]}-{it['item_id']}",
                "answers": ans, "comment": comment}  # fmt: skip
        assert c.post("/api/submit", json=body, headers=hdr).status_code == 200
        done.append(it["item_id"])
    return done


def test_adjudication_queue_decision_and_export(tmp_path):
    store, tokens = make_project(tmp_path / "p", annotators=["alice", "bob", "carol"],
                                 n_prompts=2, k=3, overlap=1.0)  # fmt: skip
    app = create_app(store.dir)
    items = _judge(app, store, tokens["alice"], "a", comment="a is complete")
    _judge(app, store, tokens["bob"], "b")
    _judge(app, store, tokens["carol"], "a")
    admin = _client(app)
    csrf = login(admin, tokens["admin"])
    page = admin.get("/admin/adjudicate").text
    listed = [int(x) for x in re.findall(r'href="/admin/adjudicate/(\d+)"', page)]
    assert sorted(listed) == sorted(items)  # every item is 2 against 1
    assert "2 / 0 / 1" in page and "67%" in page
    target = items[0]
    detail = admin.get(f"/admin/adjudicate/{target}").text
    assert "a is complete" in detail and "bob" in detail
    decision = {
        "csrf": csrf,
        "note": "b invents nothing",
        **{f"answer_{k}": "3" for k in answers_for(store)},
    }  # B: the item's b
    assert admin.post(f"/admin/adjudicate/{target}", data={**decision, "csrf": "x"}).status_code \
        == 403  # fmt: skip
    r = admin.post(f"/admin/adjudicate/{target}", data=decision)
    assert r.status_code == 303
    page = admin.get("/admin/adjudicate").text
    listed = [int(x) for x in re.findall(r'href="/admin/adjudicate/(\d+)"', page)]
    assert listed[-1] == target and page.count(">decided<") == 1  # decided items go last
    records = {r["pair_id"]: r for r in build_records(store, ties="margin0")[0]}
    with store.connect() as conn:
        it = store.item(conn, target)
        assert store.audit_trail(conn)[0]["action"] == "adjudicate"
    rec = records[it["pair_key"]]
    assert rec["adjudicated"] is True and rec["chosen"][0]["content"] == it["b_text"]
    assert rec["margin"] == 3.0 and rec["agreement"] == 2 / 3
    assert sum(r["adjudicated"] for r in records.values()) == 1
    # a judge's or one annotator's export stays raw
    solo = build_records(store, ties="margin0", annotators="bob")[0]
    assert not any(r["adjudicated"] for r in solo)
    bad = {**decision, "answer_entities": "9"}
    assert admin.post(f"/admin/adjudicate/{target}", data=bad).status_code == 422


def test_annotator_page_majority_comments_and_trail(tmp_path):
    store, tokens = make_project(tmp_path / "p", annotators=["alice", "bob", "carol", "dave"],
                                 n_prompts=2, k=3, overlap=1.0)  # fmt: skip
    app = create_app(store.dir)
    alice = _client(app)
    ca = login(alice, tokens["alice"])
    skipped = alice.get("/api/next").json()["item"]["item_id"]
    alice.post("/api/skip", json={"item_id": skipped}, headers={"X-CSRF-Token": ca})
    _judge(app, store, tokens["alice"], "b", comment="b is better")
    _judge(app, store, tokens["bob"], "a")
    _judge(app, store, tokens["carol"], "a")
    _judge(app, store, tokens["dave"], "a")
    admin = _client(app)
    login(admin, tokens["admin"])
    page = admin.get("/admin/annotators/alice").text
    assert re.search(r'id="majority">0% of 5 items', page), page[:3000]
    assert page.count("b is better") == 5
    assert re.search(rf">skip</td><td><a href=\"/admin/adjudicate/{skipped}\">", page)
    bob = admin.get("/admin/annotators/bob").text
    assert re.search(r'id="majority">100% of 6 items', bob)
    assert admin.get("/admin/annotators/nobody").status_code == 404
    assert alice.get("/admin/annotators/bob").status_code == 403
    assert alice.get("/admin/adjudicate").status_code == 403
