"""The annotator's queue over HTTP: revise, undo a skip (audited), own progress, own order."""

from __future__ import annotations

import re

from fastapi.testclient import TestClient

from alignforge.annotate.server import create_app
from tests.annotate.helpers import answers_for, login, make_project


def _client(app) -> TestClient:
    return TestClient(app, follow_redirects=False)


def test_the_page_without_javascript_carries_a_submission_id_and_its_form_saves(tmp_path):
    store, tokens = make_project(tmp_path / "p", annotators=["alice"])
    c = _client(create_app(store.dir))
    csrf = login(c, tokens["alice"])
    html = c.get("/task").text
    item = int(re.search(r'data-item="(\d+)"', html).group(1))
    sub = re.search(r'name="submission_id" id="submission_id" value="([^"]*)"', html).group(1)
    assert re.fullmatch(r"[A-Za-z0-9_-]{8,64}", sub)
    form = {"csrf": csrf, "mode": "judge", "submission_id": sub, "comment": "fine",
            **{f"answer_{k}": v for k, v in answers_for(store, "3").items()}}  # fmt: skip
    r = c.post(f"/task/{item}/submit", data=form)
    assert r.status_code == 303 and r.headers["location"] == "/task"
    assert c.post(f"/task/{item}/submit", data=form).status_code == 303  # resent: same id, once
    with store.connect() as conn:
        (j,) = store.judgements(conn)
    assert j.item_id == item and j.comment == "fine"


def test_revise_keeps_the_old_answers_in_the_audit_trail(tmp_path):
    store, tokens = make_project(tmp_path / "p", annotators=["alice", "bob"])
    app = create_app(store.dir)
    c = _client(app)
    csrf = login(c, tokens["alice"])
    h = {"X-CSRF-Token": csrf}
    item = c.get("/api/next").json()["item"]["item_id"]
    body = {"item_id": item, "submission_id": "rev-000001", "answers": answers_for(store, "1"),
            "comment": "first"}  # fmt: skip
    assert c.post("/api/submit", json=body, headers=h).status_code == 200
    page = c.get(f"/task/{item}").text  # a judged item opens for revision, answers filled in
    assert 'data-mode="revise"' in page and "first</textarea>" in page
    assert re.search(r'name="answer_entities" value="1" required checked', page)
    rev = {"item_id": item, "answers": answers_for(store, "3"), "comment": "second look"}
    assert c.post("/api/revise", json=rev).status_code == 403  # CSRF
    r = c.post("/api/revise", json=rev, headers=h)
    assert r.status_code == 200 and r.json()["saved"] is True
    assert c.post("/api/revise", json={**rev, "answers": {"entities": "1"}},
                  headers=h).status_code == 422  # fmt: skip
    with store.connect() as conn:
        (j,) = store.judgements(conn)
        uid = store.user_by_token(conn, tokens["alice"]).id
        swapped = store.assignment(conn, uid, item)[0].swapped
        (trail,) = store.audit_trail(conn)
    s = -1 if swapped else 1
    assert j.scores == {k: -s for k in answers_for(store)} and j.comment == "second look"
    assert trail["action"] == "revise" and trail["user"] == "alice"
    assert trail["detail"]["old_scores"] == {k: s for k in answers_for(store)}
    assert trail["detail"]["old_comment"] == "first"
    # nobody revises what they did not judge; a second *submit* is still a conflict
    bob = _client(app)
    cb = login(bob, tokens["bob"])
    assert bob.post("/api/revise", json=rev, headers={"X-CSRF-Token": cb}).status_code == 404
    again = {**body, "submission_id": "rev-000002"}
    assert c.post("/api/submit", json=again, headers=h).status_code == 409
    assert "revise item" in c.get("/history").text


def test_undo_a_skip_and_what_cannot_be_undone(tmp_path):
    store, tokens = make_project(tmp_path / "p", annotators=["alice", "bob"], overlap=0.0)
    app = create_app(store.dir)
    alice, bob = _client(app), _client(app)
    ca, cb = login(alice, tokens["alice"]), login(bob, tokens["bob"])
    ha, hb = {"X-CSRF-Token": ca}, {"X-CSRF-Token": cb}
    item = alice.get("/api/next").json()["item"]["item_id"]
    alice.post("/api/draft", json={"item_id": item, "answers": {"entities": "3"}}, headers=ha)
    assert alice.post("/api/skip", json={"item_id": item}, headers=ha).status_code == 200
    page = alice.get("/task").text
    assert f'action="/task/{item}/unskip"' in page and f'data-last-skip="{item}"' in page
    assert alice.get(f"/task/{item}").status_code == 404  # skipped: undo first
    r = alice.post("/api/unskip", json={"item_id": item}, headers=ha)
    assert r.status_code == 200
    page = alice.get(f"/task/{item}").text
    assert 'data-mode="judge"' in page and '"entities": "3"' in page
    assert alice.post("/api/unskip", json={"item_id": item}, headers=ha).status_code == 404
    # skipped again, and bob takes the unshared item meanwhile: the undo is refused
    alice.post("/api/skip", json={"item_id": item}, headers=ha)
    taken = None
    while (it := bob.get("/api/next").json()["item"]) is not None:
        if it["item_id"] == item:
            taken = item
            break
        bob.post("/api/skip", json={"item_id": it["item_id"]}, headers=hb)
    assert taken == item
    r = alice.post("/api/unskip", json={"item_id": item}, headers=ha)
    assert r.status_code == 409 and "taken by another annotator" in r.json()["error"]
    with store.connect() as conn:
        uid = store.user_by_token(conn, tokens["alice"]).id
        actions = [t["action"] for t in store.audit_trail(conn, uid)]
    assert actions == ["skip", "unskip", "skip"]


def test_progress_counts_the_annotators_own_queue(tmp_path):
    store, tokens = make_project(tmp_path / "p", annotators=["a1", "a2", "a3", "a4"],
                                 n_prompts=6, k=3, overlap=0.5)  # fmt: skip
    with store.connect() as conn:
        n_shared, n_items = conn.execute("SELECT SUM(shared), COUNT(*) FROM items").fetchone()
    assert (n_shared, n_items) == (9, 18)
    c = _client(create_app(store.dir))
    hdr = {"Authorization": f"Bearer {tokens['a1']}"}
    me = c.get("/api/me", headers=hdr).json()
    # 9 shared + a quarter of the 9 unclaimed unshared items (rounded up), not all 18
    assert (me["done"], me["left"]) == (0, 9 + 3)
    it = c.get("/api/next", headers=hdr).json()["item"]
    body = {"item_id": it["item_id"], "submission_id": "prog-00001",
            "answers": answers_for(store, "1")}  # fmt: skip
    c.post("/api/submit", json=body, headers=hdr)
    me = c.get("/api/me", headers=hdr).json()
    assert me["done"] == 1 and me["left"] in (8 + 3, 9 + 2)  # one shared or one from the pool


def test_shared_items_come_in_an_order_of_each_annotators_own(tmp_path):
    names = [f"a{k}" for k in range(4)]
    store, tokens = make_project(tmp_path / "p", annotators=names, n_prompts=6, k=3, overlap=1.0)
    app = create_app(store.dir)
    orders = {}
    for name in names:
        hdr = {"Authorization": f"Bearer {tokens[name]}"}
        c, seen = _client(app), []
        while (it := c.get("/api/next", headers=hdr).json()["item"]) is not None:
            seen.append(it["item_id"])
            c.post("/api/skip", json={"item_id": it["item_id"]}, headers=hdr)
        orders[name] = seen
    assert all(sorted(o) == sorted(orders["a0"]) for o in orders.values())
    assert len({tuple(o) for o in orders.values()}) == len(names)  # four different orders
    assert len({o[0] for o in orders.values()}) > 1  # they do not all start on the same item


def test_shortcuts_are_configurable_and_checked_for_clashes(tmp_path):
    import json

    import pytest

    from alignforge.annotate.config import AnnotateConfig

    cfg = AnnotateConfig(shortcuts={"save": "s", "skip": "x", "next_question": "ArrowRight"})
    store, tokens = make_project(tmp_path / "p", annotators=["alice"], cfg=cfg)
    c = _client(create_app(store.dir))
    login(c, tokens["alice"])
    html = c.get("/task").text
    keys = json.loads(re.search(r"data-keys='([^']+)'", html).group(1))
    assert (keys["save"], keys["skip"], keys["next_question"], keys["raw"]) == (
        "s", "x", "ArrowRight", "r")  # fmt: skip
    assert "<kbd>s</kbd>" in html
    with pytest.raises(ValueError, match=r"shortcuts.save: key '2' is already taken by answer"):
        AnnotateConfig(shortcuts={"save": "2"})
    with pytest.raises(ValueError, match=r"shortcuts.comment: key 'r' is already taken by "
                                         r"shortcuts.raw"):  # fmt: skip
        AnnotateConfig(shortcuts={"comment": "r"})
    with pytest.raises(ValueError, match="shortcuts.bogus"):
        AnnotateConfig(shortcuts={"bogus": "q"})
