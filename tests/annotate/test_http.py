"""HTTP-level behaviour of the web app (FastAPI TestClient against a real SQLite project)."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from alignforge.annotate.config import AnnotateConfig
from alignforge.annotate.server import create_app
from tests.annotate.helpers import answers_for, flagged_rows, key_for, login, make_project


@pytest.fixture
def app_and_tokens(tmp_path):
    store, tokens = make_project(tmp_path / "p", overlap=0.5)
    return create_app(store.dir), store, tokens


def client(app) -> TestClient:
    return TestClient(app, follow_redirects=False)


def test_every_page_and_api_needs_a_token(app_and_tokens):
    app, _, _ = app_and_tokens
    c = client(app)
    for path in ["/", "/task", "/task/1", "/admin", "/admin/plot/rate.png"]:
        r = c.get(path)
        assert r.status_code == 303 and r.headers["location"] == "/login", path
    for path in ["/api/me", "/api/next", "/admin/api/stats"]:
        assert c.get(path).status_code == 401, path
    assert c.post("/api/submit", json={}).status_code == 401
    assert c.get("/api/me", headers={"Authorization": "Bearer nope"}).status_code == 401
    # a wrong token on the login form does not log in
    nonce = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text).group(1)
    r = c.post("/login", data={"csrf": nonce, "token": "wrong"})
    assert r.headers["location"].startswith("/login?error")
    assert c.get("/api/me").status_code == 401


def test_login_requires_csrf_and_posts_require_session_csrf(app_and_tokens):
    app, store, tokens = app_and_tokens
    c = client(app)
    c.get("/login")
    assert c.post("/login", data={"token": tokens["alice"]}).status_code == 403
    csrf = login(c, tokens["alice"])
    item_id = c.get("/api/next").json()["item"]["item_id"]
    body = {"item_id": item_id, "submission_id": "sub-00001", "answers": answers_for(store)}
    assert c.post("/api/submit", json=body).status_code == 403  # no header
    r = c.post("/api/submit", json=body, headers={"X-CSRF-Token": "x" * 43})
    assert r.status_code == 403
    assert c.post("/api/skip", json={"item_id": item_id}).status_code == 403
    assert c.post("/logout", data={}).status_code == 403
    r = c.post(f"/task/{item_id}/submit", data={"submission_id": "sub-00001"})
    assert r.status_code == 403
    r = c.post("/api/submit", json=body, headers={"X-CSRF-Token": csrf})
    assert r.status_code == 200 and r.json()["saved"] is True
    assert c.post("/logout", data={"csrf": csrf}).status_code == 303
    assert c.get("/api/me").status_code == 401  # session is gone server-side


def test_annotator_cannot_reach_admin_or_another_annotators_items(app_and_tokens):
    app, store, tokens = app_and_tokens
    alice, bob = client(app), client(app)
    ca, cb = login(alice, tokens["alice"]), login(bob, tokens["bob"])
    assert alice.get("/admin").status_code == 403
    assert alice.get("/admin/api/stats").status_code == 403
    assert alice.get("/admin/plot/rate.png").status_code == 403
    # drain alice's queue so that every item she holds is known
    mine = set()
    while (nxt := alice.get("/api/next").json()["item"]) is not None:
        mine.add(nxt["item_id"])
        body = {"item_id": nxt["item_id"], "submission_id": f"a-{nxt['item_id']:06d}",
                "answers": answers_for(store, "1")}  # fmt: skip
        assert alice.post("/api/submit", json=body, headers={"X-CSRF-Token": ca}).status_code == 200
    bob_item = bob.get("/api/next").json()["item"]["item_id"]
    with store.connect() as conn:
        all_ids = [r[0] for r in conn.execute("SELECT id FROM items")]
        shared = {r[0] for r in conn.execute("SELECT id FROM items WHERE shared=1")}
    not_bobs = [i for i in all_ids if i not in shared and i in mine]
    assert not_bobs, "alice should have claimed unshared items"
    for i in not_bobs[:3]:
        assert bob.get(f"/task/{i}").status_code == 404
        body = {"item_id": i, "submission_id": "b-0000001", "answers": answers_for(store)}
        assert bob.post("/api/submit", json=body, headers={"X-CSRF-Token": cb}).status_code == 404
        assert (
            bob.post("/api/skip", json={"item_id": i}, headers={"X-CSRF-Token": cb}).status_code
            == 404
        )
        assert bob.post("/api/draft", json={"item_id": i, "answers": {}},
                        headers={"X-CSRF-Token": cb}).status_code == 404  # fmt: skip
    # nothing in bob's views reveals alice's answers or name
    page = bob.get(f"/task/{bob_item}").text
    assert "alice" not in page
    assert "alice" not in bob.get("/api/me").text
    # shared items reach both, unshared exactly one
    assert shared <= mine


def test_bad_ids_and_oversized_inputs_are_rejected(app_and_tokens):
    app, store, tokens = app_and_tokens
    c = client(app)
    csrf = login(c, tokens["alice"])
    h = {"X-CSRF-Token": csrf}
    item_id = c.get("/api/next").json()["item"]["item_id"]
    good = {"item_id": item_id, "submission_id": "s-0000001", "answers": answers_for(store)}
    cases = [
        ({**good, "item_id": "abc"}, 422),
        ({**good, "item_id": -5}, 422),
        ({**good, "item_id": 10**30}, 422),
        ({**good, "item_id": 99999}, 404),
        ({**good, "submission_id": "short"}, 422),
        ({**good, "submission_id": "bad id with spaces!"}, 422),
        ({**good, "answers": {**good["answers"], "entities": "7"}}, 422),
        ({**good, "answers": {"entities": "1"}}, 422),
        ({**good, "answers": {**good["answers"], "bogus": "1"}}, 422),
        ({**good, "comment": "x" * 3000}, 422),
        ({**good, "client_active_ms": -1}, 422),
        ({**good, "extra": 1}, 422),
    ]
    for body, status in cases:
        r = c.post("/api/submit", json=body, headers=h)
        assert r.status_code == status, (body, r.status_code, r.text)
    r = c.post(
        "/api/submit",
        content=b"{" + b" " * 70_000 + b"}",
        headers={**h, "Content-Type": "application/json"},
    )
    assert r.status_code == 413
    assert c.get("/task/abc").status_code == 422
    assert c.get("/task/0").status_code == 404
    assert c.get("/task/99999999999999999999999").status_code in (404, 422)
    assert (
        c.post(
            "/api/submit", content=b"not json", headers={**h, "Content-Type": "application/json"}
        ).status_code
        == 422
    )
    # nothing was stored by any of these
    with store.connect() as conn:
        assert conn.execute("SELECT COUNT(*) FROM judgements").fetchone()[0] == 0
    assert c.post("/api/submit", json=good, headers=h).status_code == 200


def test_submit_is_idempotent_and_stores_canonical_scores(app_and_tokens):
    app, store, tokens = app_and_tokens
    c = client(app)
    csrf = login(c, tokens["alice"])
    h = {"X-CSRF-Token": csrf}
    item_id = c.get("/api/next").json()["item"]["item_id"]
    with store.connect() as conn:
        swapped = store.assignment(conn, store.user_by_token(conn, tokens["alice"]).id, item_id)[
            0
        ].swapped
    # displayed A wins entities and relations, tie on summary
    body = {"item_id": item_id, "submission_id": "s-0000001",
            "answers": {"entities": "1", "relations": "1", "summary": "2"}, "client_active_ms": 4200}  # fmt: skip
    r1 = c.post("/api/submit", json=body, headers=h).json()
    r2 = c.post("/api/submit", json=body, headers=h).json()
    assert r1["duplicate"] is False and r2["duplicate"] is True
    assert r1["judgement_id"] == r2["judgement_id"]
    r3 = c.post("/api/submit", json={**body, "submission_id": "s-0000002"}, headers=h)
    assert r3.status_code == 409
    with store.connect() as conn:
        (j,) = store.judgements(conn)
    sign = -1 if swapped else 1
    assert j.scores == {"entities": sign, "relations": sign, "summary": 0}
    assert j.overall == 2 * sign
    assert j.client_seconds == pytest.approx(4.2)
    assert j.server_seconds is not None and j.server_seconds >= 0
    # the next item is a different one
    assert c.get("/api/next").json()["item"]["item_id"] != item_id


def test_task_page_structure_draft_skip_and_form_fallback(app_and_tokens):
    app, store, tokens = app_and_tokens
    c = client(app)
    csrf = login(c, tokens["alice"])
    h = {"X-CSRF-Token": csrf}
    page = c.get("/task")
    assert page.status_code == 200
    html = page.text
    item_id = int(re.search(r'data-item="(\d+)"', html).group(1))
    assert '<table class="ents">' in html and "<mark class=" in html
    assert "Which has more complete and accurate entities?" in html
    assert "<kbd>1</kbd> A" in html and "Backspace" in html
    # reloading shows the same item (served once, timed from the first serve)
    assert f'data-item="{item_id}"' in c.get("/task").text
    r = c.post("/api/draft", json={"item_id": item_id, "answers": {"entities": "3"}}, headers=h)
    assert r.status_code == 200
    assert (
        "&#34;entities&#34;: &#34;3&#34;" in c.get("/task").text
        or '"entities": "3"' in c.get("/task").text
    )
    assert c.post("/api/draft", json={"item_id": item_id, "answers": {"entities": "9"}},
                  headers=h).status_code == 422  # fmt: skip
    assert c.post("/api/skip", json={"item_id": item_id}, headers=h).status_code == 200
    assert c.post("/api/skip", json={"item_id": item_id}, headers=h).status_code == 409
    nxt = int(re.search(r'data-item="(\d+)"', c.get("/task").text).group(1))
    assert nxt != item_id
    form = {"csrf": csrf, "submission_id": "form-000001", "answer_entities": "3",
            "answer_relations": "3", "answer_summary": "1"}  # fmt: skip
    r = c.post(f"/task/{nxt}/submit", data=form)
    assert r.status_code == 303 and r.headers["location"] == "/task"
    with store.connect() as conn:
        assert [j.item_id for j in store.judgements(conn)] == [nxt]


def test_overlap_shared_items_reach_every_annotator_unshared_exactly_one(tmp_path):
    store, tokens = make_project(tmp_path / "p", annotators=["a1", "a2", "a3"], overlap=0.5)
    app = create_app(store.dir)
    seen: dict[str, set[int]] = {}
    for name in ["a1", "a2", "a3"]:
        c = client(app)
        hdr = {"Authorization": f"Bearer {tokens[name]}"}  # scripts: no cookie, no CSRF
        seen[name] = set()
        while (it := c.get("/api/next", headers=hdr).json()["item"]) is not None:
            seen[name].add(it["item_id"])
            body = {"item_id": it["item_id"], "submission_id": f"{name}-{it['item_id']:05d}",
                    "answers": answers_for(store, "3")}  # fmt: skip
            assert c.post("/api/submit", json=body, headers=hdr).status_code == 200
    with store.connect() as conn:
        shared = {r[0] for r in conn.execute("SELECT id FROM items WHERE shared=1")}
        unshared = {r[0] for r in conn.execute("SELECT id FROM items WHERE shared=0")}
    assert len(shared) == round(0.5 * 18)
    for name in seen:
        assert shared <= seen[name]
    counts = {i: sum(i in s for s in seen.values()) for i in unshared}
    assert set(counts.values()) == {1}


def test_trial_items_come_first_and_admin_dashboard_alerts(tmp_path):
    """Trial: both agree on every item; afterwards they disagree -> an alert and plots."""
    cfg = AnnotateConfig(min_agreement_items=6)
    store, tokens = make_project(tmp_path / "p", trial=6, overlap=1.0, cfg=cfg)
    app = create_app(store.dir)
    for name, later in [("alice", "a"), ("bob", "b")]:
        hdr = {"Authorization": f"Bearer {tokens[name]}"}
        c = client(app)
        n = 0
        while (it := c.get("/api/next", headers=hdr).json()["item"]) is not None:
            assert it["trial"] == (n < 6)
            # trial: agree except one item; afterwards: opposite answers
            want = ("a" if n % 3 else "b") if n < 6 else later
            ans = {k: key_for(store, it, want) for k in answers_for(store)}
            body = {"item_id": it["item_id"], "submission_id": f"{name}-{n:06d}", "answers": ans}
            assert c.post("/api/submit", json=body, headers=hdr).status_code == 200
            n += 1
        assert n == 18
    admin = client(app)
    login(admin, tokens["admin"])
    s = admin.get("/admin/api/stats").json()
    assert s["n_judgements"] == 36
    assert any("below the floor" in a for a in s["alerts"]), s["alerts"]
    assert {r["user"] for r in s["annotators"]} == {"alice", "bob"}
    page = admin.get("/admin").text
    assert "Alerts" in page and "Krippendorff" in page
    for name in ["rate", "time", "agreement"]:
        r = admin.get(f"/admin/plot/{name}.png")
        assert r.status_code == 200 and r.content[:4] == b"\x89PNG"
    assert admin.get("/admin/plot/nope.png").status_code == 404


def test_task_page_flags_format_problems_and_carries_the_raw_answers(tmp_path):
    store, tokens = make_project(tmp_path / "p", annotators=["alice"], rows=flagged_rows())
    c = client(create_app(store.dir))
    login(c, tokens["alice"])
    html = c.get("/task").text
    flags = set(re.findall(r'data-flag="([a-z_]+)"', html))
    assert flags == {"text_around", "multiple", "truncated"}
    assert "finish: length" in html and "finish: stop" in html
    assert 'id="show-raw"' in html
    raw = re.findall(r'<pre class="plain raw-view">(.*?)</pre>', html, re.S)
    assert len(raw) == 2 and any("Sure! Here is the extraction:" in r for r in raw)
    nxt = c.get("/api/next").json()["item"]
    assert {f["code"] for s in "ab" for f in nxt["flags"][s]} == flags


def test_dashboard_statistics_and_plots_are_computed_once_per_change(tmp_path, monkeypatch):
    from alignforge.annotate import dashboard

    calls = {"stats": 0, "plot": 0}
    real_stats, real_plot = dashboard.project_stats, dashboard.plot_agreement

    def counted_stats(*a, **k):
        calls["stats"] += 1
        return real_stats(*a, **k)

    def counted_plot(*a, **k):
        calls["plot"] += 1
        return real_plot(*a, **k)

    monkeypatch.setattr(dashboard, "project_stats", counted_stats)
    monkeypatch.setattr(dashboard, "plot_agreement", counted_plot)
    store, tokens = make_project(tmp_path / "p", overlap=1.0)
    app = create_app(store.dir)
    admin = client(app)
    login(admin, tokens["admin"])

    def load():
        for path in ["/admin", "/admin/plot/rate.png", "/admin/plot/time.png",
                     "/admin/plot/agreement.png", "/admin/api/stats"]:  # fmt: skip
            assert admin.get(path).status_code == 200, path

    load()
    load()
    assert calls == {"stats": 1, "plot": 1}
    hdr = {"Authorization": f"Bearer {tokens['alice']}"}
    it = client(app).get("/api/next", headers=hdr).json()["item"]
    body = {"item_id": it["item_id"], "submission_id": "dash-00001", "answers": answers_for(store)}
    assert client(app).post("/api/submit", json=body, headers=hdr).status_code == 200
    load()
    assert calls == {"stats": 2, "plot": 2}
    assert admin.get("/admin/api/stats").json()["n_judgements"] == 1
