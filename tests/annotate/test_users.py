"""User management: list, add, revoke, reset, roles; a revoked token stops working at once."""

from __future__ import annotations

import re
import sqlite3

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from alignforge.annotate.cli import app as cli
from alignforge.annotate.export import build_records
from alignforge.annotate.server import create_app
from alignforge.annotate.store import DB_NAME, Store, StoreError
from tests.annotate.helpers import answers_for, login, make_project


def _client(app) -> TestClient:
    return TestClient(app, follow_redirects=False)


def _judge_all(c: TestClient, store, headers: dict, prefix: str, choice: str = "1") -> int:
    n = 0
    while (it := c.get("/api/next", headers=headers).json()["item"]) is not None:
        body = {"item_id": it["item_id"], "submission_id": f"{prefix}-{it['item_id']:06d}",
                "answers": answers_for(store, choice)}  # fmt: skip
        assert c.post("/api/submit", json=body, headers=headers).status_code == 200
        n += 1
    return n


def test_a_revoked_token_is_refused_at_once_by_session_and_by_bearer(tmp_path):
    store, tokens = make_project(tmp_path / "p", annotators=["alice", "bob"], overlap=0.0)
    app = create_app(store.dir)
    session, bearer = _client(app), _client(app)
    login(session, tokens["alice"])
    hdr = {"Authorization": f"Bearer {tokens['alice']}"}
    held = session.get("/api/next").json()["item"]["item_id"]  # an unshared item she holds
    assert bearer.get("/api/me", headers=hdr).status_code == 200
    admin = _client(app)
    csrf = login(admin, tokens["admin"])
    assert admin.post("/admin/users/alice/revoke", data={}).status_code == 403  # CSRF needed
    r = admin.post("/admin/users/alice/revoke", data={"csrf": csrf})
    assert r.status_code == 303
    # the very next requests, same server process, no restart
    assert session.get("/api/me").status_code == 401
    assert session.get("/task").headers["location"] == "/login"
    assert bearer.get("/api/me", headers=hdr).status_code == 401
    fresh = _client(app)
    nonce = re.search(r'name="csrf" value="([^"]+)"', fresh.get("/login").text).group(1)
    r = fresh.post("/login", data={"csrf": nonce, "token": tokens["alice"]})
    assert r.headers["location"].startswith("/login?error")
    # the unshared item she held goes back to the pool
    bob = {"Authorization": f"Bearer {tokens['bob']}"}
    seen = set()
    while (it := _client(app).get("/api/next", headers=bob).json()["item"]) is not None:
        seen.add(it["item_id"])
        _client(app).post("/api/skip", json={"item_id": it["item_id"]}, headers=bob)
    assert held in seen
    page = admin.get("/admin/users").text
    assert re.search(r'data-user="alice">.*?revoked', page, re.S)


def test_reset_token_and_roles_from_the_admin_page(tmp_path):
    store, tokens = make_project(tmp_path / "p", annotators=["alice"])
    app = create_app(store.dir)
    admin = _client(app)
    csrf = login(admin, tokens["admin"])
    page = admin.post("/admin/users/alice/reset", data={"csrf": csrf})
    new = re.search(r'<pre class="plain" id="token-value">([^<]+)</pre>', page.text).group(1)
    assert new != tokens["alice"]
    assert _client(app).get("/api/me", headers={"Authorization": f"Bearer {new}"}).json()[
        "name"] == "alice"  # fmt: skip
    old = _client(app).get("/api/me", headers={"Authorization": f"Bearer {tokens['alice']}"})
    assert old.status_code == 401
    alice = _client(app)
    login(alice, new)
    assert alice.get("/admin").status_code == 403
    r = admin.post("/admin/users/alice/role", data={"csrf": csrf, "role": "admin"})
    assert r.status_code == 303
    assert alice.get("/admin").status_code == 200  # the role counts from the next request
    page = admin.post("/admin/users", data={"csrf": csrf, "name": "carol", "role": "annotator"})
    token = re.search(r'id="token-value">([^<]+)<', page.text).group(1)
    assert _client(app).get("/api/me", headers={"Authorization": f"Bearer {token}"}).json()[
        "role"] == "annotator"  # fmt: skip
    assert admin.post("/admin/users", data={"csrf": csrf, "name": "carol"}).status_code == 409
    assert admin.post("/admin/users/nobody/revoke", data={"csrf": csrf}).status_code == 404
    assert alice.post("/admin/users/carol/revoke", data={"csrf": "x"}).status_code == 403


def test_the_last_admin_cannot_be_revoked_or_demoted(tmp_path):
    store, _ = make_project(tmp_path / "p", annotators=["alice"])
    with pytest.raises(StoreError, match="last active admin"):
        store.revoke("admin")
    with pytest.raises(StoreError, match="last active admin"):
        store.set_role("admin", "annotator")
    store.set_role("alice", "admin")
    store.revoke("admin")


def test_admins_count_as_annotators_only_when_they_annotate(tmp_path):
    store, tokens = make_project(tmp_path / "p", annotators=["alice"], n_prompts=2, overlap=1.0)
    app = create_app(store.dir)
    for name in ("alice", "admin"):
        _judge_all(_client(app), store, {"Authorization": f"Bearer {tokens[name]}"}, name)
    people = lambda recs: {a for r in recs for a in r["annotators"]}  # noqa: E731
    assert people(build_records(store, ties="margin0")[0]) == {"alice"}
    assert people(build_records(store, ties="margin0", annotators="admins")[0]) == {"admin"}
    assert people(build_records(store, ties="margin0", annotators="all")[0]) == {"alice", "admin"}
    admin = _client(app)
    login(admin, tokens["admin"])
    assert [r["user"] for r in admin.get("/admin/api/stats").json()["annotators"]] == ["alice"]
    store.set_role("admin", "admin", annotates=True)
    assert people(build_records(store, ties="margin0")[0]) == {"alice", "admin"}
    assert {r["user"] for r in admin.get("/admin/api/stats").json()["annotators"]} == {
        "alice", "admin"}  # fmt: skip


def test_user_commands(tmp_path):
    runner = CliRunner()
    proj = tmp_path / "p"
    assert runner.invoke(cli, ["init", str(proj)]).exit_code == 0
    r = runner.invoke(cli, ["add-user", str(proj), "lead", "--role", "admin", "--annotates"])
    lead_token = r.stdout.strip()
    assert r.exit_code == 0
    assert runner.invoke(cli, ["add-user", str(proj), "alice"]).exit_code == 0
    out = runner.invoke(cli, ["users", str(proj)]).stdout
    assert re.search(r"lead\s+admin\s+default\s+yes\s+active", out), out
    assert re.search(r"alice\s+annotator\s+default\s+yes\s+active", out), out
    assert runner.invoke(cli, ["revoke", str(proj), "alice"]).exit_code == 0
    assert re.search(r"alice\s+annotator\s+default\s+yes\s+revoked", runner.invoke(
        cli, ["users", str(proj)]).stdout)  # fmt: skip
    r = runner.invoke(cli, ["reset-token", str(proj), "alice"])
    assert r.exit_code == 0
    with Store(proj).connect() as conn:
        assert Store(proj).user_by_token(conn, r.stdout.strip()).name == "alice"
        assert Store(proj).user_by_token(conn, lead_token).annotates is True
    r = runner.invoke(cli, ["set-role", str(proj), "alice", "--role", "admin", "--no-annotates"])
    assert r.exit_code == 0
    assert re.search(r"alice\s+admin\s+default\s+no\s+active", runner.invoke(
        cli, ["users", str(proj)]).stdout)  # fmt: skip
    r = runner.invoke(cli, ["revoke", str(proj), "nobody"])
    assert r.exit_code == 2 and "no user named 'nobody'" in r.output
    assert runner.invoke(cli, ["set-role", str(proj), "alice", "--role", "root"]).exit_code == 2


def test_a_version_1_project_is_migrated_and_its_admins_stop_counting(tmp_path):
    store, tokens = make_project(tmp_path / "p", annotators=["alice"], n_prompts=1, overlap=1.0)
    app = create_app(store.dir)
    for name in ("alice", "admin"):
        _judge_all(_client(app), store, {"Authorization": f"Bearer {tokens[name]}"}, name)
    conn = sqlite3.connect(store.dir / DB_NAME)  # back to the version 1 layout
    for table, col in [("users", "annotates"), ("users", "revoked_at"),
                       ("judgements", "updated_at"), ("judgements", "revisions"),
                       ("drafts", "comment"), ("users", "simulated")]:  # fmt: skip
        conn.execute(f"ALTER TABLE {table} DROP COLUMN {col}")
    conn.execute("DROP TABLE audit")
    conn.execute("DROP TABLE adjudications")
    conn.execute("UPDATE meta SET value='1' WHERE key='schema_version'")
    conn.commit()
    conn.close()
    migrated = Store(store.dir)
    with migrated.connect() as c:
        assert c.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()[0] == "3"
        assert migrated.judgements(c)[0].role in ("annotator", "admin")  # none is simulated
        assert migrated.user_by_token(c, tokens["admin"]).annotates is False
        assert migrated.user_by_token(c, tokens["alice"]).annotates is True
    assert {a for r in build_records(migrated, ties="margin0")[0] for a in r["annotators"]} == {
        "alice"}  # fmt: skip
