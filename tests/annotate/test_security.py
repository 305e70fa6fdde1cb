"""Security headers, oversized bodies however they are sent, and cookies behind a TLS proxy."""

from __future__ import annotations

import re

import pytest
from fastapi.testclient import TestClient

from alignforge.annotate.config import AnnotateConfig
from alignforge.annotate.server import create_app
from tests.annotate.helpers import answers_for, login, make_project


@pytest.fixture
def project(tmp_path):
    return make_project(tmp_path / "p", annotators=["alice"])


def _client(app, ip: str = "127.0.0.1") -> TestClient:
    return TestClient(app, follow_redirects=False, client=(ip, 40000))


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("content-security-policy", "default-src 'self'; script-src 'self'; style-src 'self'"),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
    ],
)
def test_every_response_carries_the_security_header(project, header, value):
    store, tokens = project
    c = _client(create_app(store.dir))
    responses = [c.get("/login"), c.get("/task"), c.get("/api/me"), c.get("/static/app.css")]
    login(c, tokens["admin"])
    responses += [c.get("/admin"), c.get("/admin/api/stats"), c.get("/admin/plot/rate.png"),
                  c.get("/api/next"), c.get("/no-such-page")]  # fmt: skip
    for r in responses:
        assert r.headers.get(header, "").startswith(value), (r.url, r.status_code, r.headers)
    assert "frame-ancestors 'none'" in responses[0].headers["content-security-policy"]


def test_pages_with_data_are_not_stored_static_files_may_be(project):
    store, tokens = project
    c = _client(create_app(store.dir))
    login(c, tokens["alice"])
    for path in ["/task", "/api/next", "/api/me", "/login"]:
        assert c.get(path).headers["cache-control"] == "no-store", path
    assert "no-store" not in c.get("/static/app.js").headers.get("cache-control", "")


def test_oversized_bodies_get_413_declared_or_chunked(project):
    store, tokens = project
    c = _client(create_app(store.dir))
    csrf = login(c, tokens["alice"])
    item = c.get("/api/next").json()["item"]["item_id"]
    big = b'{"item_id": 1, "comment": "' + b"x" * 70_000 + b'"}'

    def chunks():
        for k in range(0, len(big), 4096):
            yield big[k : k + 4096]

    h = {"X-CSRF-Token": csrf, "Content-Type": "application/json"}
    assert c.post("/api/submit", content=big, headers=h).status_code == 413
    r = c.post("/api/submit", content=chunks(), headers=h)
    assert r.status_code == 413 and "too large" in r.text
    assert "content-length" not in {k.lower() for k in r.request.headers}  # it was chunked
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    for path in [f"/task/{item}/submit", "/login", "/logout"]:
        assert c.post(path, content=chunks(), headers=form).status_code == 413, path
    # a body within the limit still works
    body = {"item_id": item, "submission_id": "sec-000001", "answers": answers_for(store)}
    assert c.post("/api/submit", json=body, headers={"X-CSRF-Token": csrf}).status_code == 200


def _login_cookie(c: TestClient, token: str, headers: dict) -> str:
    page = c.get("/login", headers=headers)
    nonce = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    # sent by hand: the client would hold back a Secure cookie on the plain-HTTP hop
    cookie = {"Cookie": f"af_login={page.cookies['af_login']}"}
    r = c.post("/login", data={"csrf": nonce, "token": token}, headers={**headers, **cookie})
    assert r.status_code == 303
    return next(v for k, v in r.headers.multi_items() if k == "set-cookie" and "af_session" in v)


def test_secure_cookie_and_hsts_only_behind_a_trusted_tls_proxy(tmp_path):
    cfg = AnnotateConfig(trusted_proxies=["10.0.0.2"])
    store, tokens = make_project(tmp_path / "p", annotators=["alice"], cfg=cfg)
    app = create_app(store.dir)
    tls = {"X-Forwarded-Proto": "https", "X-Forwarded-For": "203.0.113.9"}
    proxied = _login_cookie(_client(app, "10.0.0.2"), tokens["alice"], tls)
    assert "secure" in proxied.lower() and "httponly" in proxied.lower()
    assert "samesite=strict" in proxied.lower()
    assert _client(app, "10.0.0.2").get("/login", headers=tls).headers[
        "strict-transport-security"].startswith("max-age=")  # fmt: skip
    # anyone else claiming TLS is not believed
    spoofed = _login_cookie(_client(app, "10.0.0.66"), tokens["alice"], tls)
    assert "secure" not in spoofed.lower()
    assert "strict-transport-security" not in _client(app, "10.0.0.66").get(
        "/login", headers=tls).headers  # fmt: skip
    # no proxy configured: forwarded headers are ignored
    store_q, tokens_q = make_project(tmp_path / "q", annotators=["bob"])
    plain = create_app(store_q.dir)
    assert "secure" not in _login_cookie(_client(plain, "10.0.0.2"), tokens_q["bob"], tls).lower()
