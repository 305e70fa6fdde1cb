"""The annotation web app: FastAPI, server-rendered Jinja pages and one small vanilla JS file.

    from alignforge.annotate.server import create_app
    app = create_app("ann/")                       # then: uvicorn.run(app, port=8000)
    # or: alignforge annotate serve ann/ --port 8000

Authentication: a login form exchanges an admin-issued token for a session cookie (HttpOnly,
SameSite=Strict). Every POST made with the cookie carries the session's CSRF token (hidden form
field, or the ``X-CSRF-Token`` header for the JSON API). Scripts may instead send
``Authorization: Bearer <token>`` (no cookie, so no CSRF exposure). Annotators reach only their
own queue; ``/admin`` is for admins.

JSON API (all require auth): ``GET /api/next``, ``POST /api/submit``, ``POST /api/skip``,
``POST /api/unskip``, ``POST /api/revise``, ``POST /api/draft``, ``GET /api/me``; admins:
``GET /admin/api/stats``. Skips, undone skips and revisions are kept in an audit trail.
"""

from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path
from typing import Any, NamedTuple

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import MutableHeaders
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from alignforge.annotate.config import AnnotateConfig, load_project_config
from alignforge.annotate.render import highlight, mention_classes, parse_completion, split_prompt
from alignforge.annotate.store import Draft, Store, StoreError, User

HERE = Path(__file__).parent
SESSION_COOKIE = "af_session"
LOGIN_COOKIE = "af_login"
SUBMISSION_ID = r"^[A-Za-z0-9_-]{8,64}$"
MAX_ITEM_ID = 2**62


class Auth(NamedTuple):
    user: User
    csrf: str | None  # None when authenticated by bearer token (no cookie: no CSRF risk)


class SubmitIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: int = Field(ge=1, le=MAX_ITEM_ID)
    submission_id: str = Field(pattern=SUBMISSION_ID)
    answers: dict[str, str] = Field(max_length=9)
    client_active_ms: int = Field(0, ge=0, le=86_400_000)
    comment: str = Field("", max_length=100_000)


class ReviseIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: int = Field(ge=1, le=MAX_ITEM_ID)
    answers: dict[str, str] = Field(max_length=9)
    comment: str = Field("", max_length=100_000)


class ItemIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    item_id: int = Field(ge=1, le=MAX_ITEM_ID)


class DraftIn(ItemIn):
    answers: dict[str, str] = Field(max_length=9)
    comment: str = Field("", max_length=100_000)


class BodyLimit:
    """Reject request bodies over ``max_bytes`` with 413, whether declared or streamed (chunked).

    A streamed body is cut off inside ``receive`` by raising ``HTTPException(413)``, which the
    route's body parsing lets through (any other exception there would become a 400).
    """

    def __init__(self, app, max_bytes: int):
        self.app, self.max = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cl = dict(scope["headers"]).get(b"content-length")
        if cl is not None and (not cl.isdigit() or int(cl) > self.max):
            return await PlainTextResponse("request body too large", 413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            msg = await receive()
            seen += len(msg.get("body", b""))
            if seen > self.max:
                raise HTTPException(413, "request body too large")
            return msg

        await self.app(scope, limited, send)


CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"
)


class SecurityHeaders:
    """CSP, no framing, no MIME sniffing, no referrer on every response; ``no-store`` on all but
    the static files (pages and API answers carry annotation data); HSTS over HTTPS."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        static = scope["path"].startswith("/static/")

        async def with_headers(msg):
            if msg["type"] == "http.response.start":
                h = MutableHeaders(scope=msg)
                h["Content-Security-Policy"] = CSP
                h["X-Frame-Options"] = "DENY"
                h["X-Content-Type-Options"] = "nosniff"
                h["Referrer-Policy"] = "no-referrer"
                if not static:
                    h["Cache-Control"] = "no-store"
                if scope.get("scheme") == "https":
                    h["Strict-Transport-Security"] = "max-age=31536000"
            await send(msg)

        await self.app(scope, receive, with_headers)


def create_app(project_dir: str | Path, cfg: AnnotateConfig | None = None) -> FastAPI:
    store = Store(project_dir)
    cfg = cfg or load_project_config(project_dir)
    app = FastAPI(title="alignforge annotate", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.store, app.state.cfg = store, cfg
    app.add_middleware(BodyLimit, max_bytes=cfg.max_body_bytes)
    app.add_middleware(SecurityHeaders)
    if cfg.trusted_proxies:
        # behind a TLS-terminating proxy: its X-Forwarded-Proto makes the cookies Secure
        app.add_middleware(ProxyHeadersMiddleware, trusted_hosts=cfg.trusted_proxies)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    app.state.templates = templates

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException):
        if exc.status_code == 401 and not _wants_json(request):
            return RedirectResponse("/login", 303)
        if _wants_json(request):
            return JSONResponse({"error": exc.detail}, exc.status_code)
        return templates.TemplateResponse(
            request, "error.html", {"status": exc.status_code, "detail": exc.detail},
            status_code=exc.status_code,
        )  # fmt: skip

    _login_routes(app, store, cfg, templates)
    _task_routes(app, store, cfg, templates)
    _api_routes(app, store, cfg)
    stats = _admin_routes(app, store, cfg, templates)
    _review_routes(app, store, cfg, templates, stats)
    _user_routes(app, store, templates)
    return app


def _wants_json(request: Request) -> bool:
    p = request.url.path
    return (
        p.startswith("/api/")
        or p.startswith("/admin/api/")
        or "bearer" in (request.headers.get("authorization", "").lower())
    )


async def auth(request: Request) -> Auth:
    """Who is asking. A coroutine on purpose: its two indexed reads are cheaper than the hop to
    a worker thread that a plain function dependency costs on every request."""
    store: Store = request.app.state.store
    header = request.headers.get("authorization", "")
    with store.connect() as conn:
        if header.lower().startswith("bearer "):
            tok = header[7:].strip()
            user = store.user_by_token(conn, tok) if 0 < len(tok) <= 200 else None
            if user is None:
                raise HTTPException(401, "unknown token")
            return Auth(user, None)
        sid = request.cookies.get(SESSION_COOKIE, "")
        got = store.session_user(conn, sid) if 0 < len(sid) <= 200 else None
    if got is None:
        raise HTTPException(401, "log in first")
    return Auth(got[0], got[1])


def check_csrf(a: Auth, supplied: str | None) -> None:
    if a.csrf is None:
        return
    if not supplied or not secrets.compare_digest(str(supplied), a.csrf):
        raise HTTPException(403, "missing or wrong CSRF token")


async def admin_auth(a: Auth = Depends(auth)) -> Auth:
    if a.user.role != "admin":
        raise HTTPException(403, "admins only")
    return a


def _set_cookie(resp, name: str, value: str, max_age: int, request: Request) -> None:
    resp.set_cookie(
        name, value, max_age=max_age, httponly=True, samesite="strict",
        secure=request.url.scheme == "https", path="/",
    )  # fmt: skip


def _login_routes(app: FastAPI, store: Store, cfg: AnnotateConfig, templates) -> None:
    @app.get("/login", response_class=HTMLResponse)
    def login_page(request: Request, error: str = ""):
        nonce = secrets.token_urlsafe(24)
        ctx = {"csrf": nonce, "error": error[:100], "title": cfg.title}
        resp = templates.TemplateResponse(request, "login.html", ctx)
        _set_cookie(resp, LOGIN_COOKIE, nonce, 3600, request)
        return resp

    @app.post("/login")
    async def login(request: Request):
        form = await request.form()
        nonce = request.cookies.get(LOGIN_COOKIE, "")
        if not nonce or not secrets.compare_digest(str(form.get("csrf", "")), nonce):
            raise HTTPException(403, "missing or wrong CSRF token; reload the login page")
        token = str(form.get("token", "")).strip()
        with store.connect() as conn:
            user = store.user_by_token(conn, token) if 0 < len(token) <= 200 else None
            if user is None:
                return RedirectResponse("/login?error=unknown+token", 303)
            sid, _ = store.new_session(conn, user.id, cfg.session_hours)
        resp = RedirectResponse("/", 303)
        _set_cookie(resp, SESSION_COOKIE, sid, int(cfg.session_hours * 3600), request)
        resp.delete_cookie(LOGIN_COOKIE, path="/")
        return resp

    @app.post("/logout")
    async def logout(request: Request, a: Auth = Depends(auth)):
        form = await request.form()
        check_csrf(a, form.get("csrf"))
        with store.connect() as conn:
            store.end_session(conn, request.cookies.get(SESSION_COOKIE, ""))
        resp = RedirectResponse("/login", 303)
        resp.delete_cookie(SESSION_COOKIE, path="/")
        return resp

    @app.get("/")
    def root(a: Auth = Depends(auth)):
        return RedirectResponse("/admin" if a.user.role == "admin" else "/task", 303)


UNDO_WINDOW_S = 1800  # a skip can be undone from the task page for this long


def item_view(
    store: Store, cfg: AnnotateConfig, conn, user: User, served, mode: str = "judge"
) -> dict[str, Any]:
    """Everything the task page (and ``GET /api/next``) shows, in display order.

    ``mode`` 'judge' shows a served item with its draft; 'revise' an item the user judged,
    with their saved answers.
    """
    it = store.item(conn, served.item_id)
    sides = ("b", "a") if served.swapped else ("a", "b")
    meta = it["meta"] or {}
    pa, pb = (
        parse_completion(it[f"{s}_text"], _finish_reason(meta, s), cfg.expect_json) for s in sides
    )
    instruction, document = split_prompt(it["prompt"], it.get("source_document"))
    if mode == "revise":
        own = store.own_judgement(conn, user.id, it["id"])
        key_of = {c.score: c.key for c in cfg.choices}
        keys = {k: key_of[v] for k, v in own["display_scores"].items() if v in key_of}
        draft = Draft(keys, own["comment"])
    else:
        own, draft = None, store.draft(conn, user.id, it["id"])
    last = store.last_skip(conn, user, time.time() - UNDO_WINDOW_S)
    previous = store.history(conn, user.id, 1)
    return {
        "item_id": it["id"], "mode": mode, "judged": own, "trial": bool(it["trial"]),
        "instruction": instruction, "document": document,
        "segments": highlight(document, mention_classes(pa, pb)), "a": pa, "b": pb,
        "served_at": served.served_at, "draft": draft, "progress": store.progress(conn, user),
        "submission_id": secrets.token_urlsafe(18),
        "last_skip": last if last != it["id"] else None,
        "previous": previous[0]["item_id"] if previous else None,
    }  # fmt: skip


def _finish_reason(meta: dict[str, Any], side: str) -> str | None:
    got = meta.get(side)
    reason = got.get("finish_reason") if isinstance(got, dict) else None
    return str(reason) if reason is not None else None


def _task_routes(app: FastAPI, store: Store, cfg: AnnotateConfig, templates) -> None:
    def page(request: Request, a: Auth, view: dict | None):
        ctx = {"user": a.user, "csrf": a.csrf or "", "cfg": cfg, "v": view,
               "keys": cfg.shortcuts.model_dump()}  # fmt: skip
        if view is None:
            with store.connect() as conn:
                ctx["progress"] = store.progress(conn, a.user)
                ctx["last_skip"] = store.last_skip(conn, a.user, time.time() - UNDO_WINDOW_S)
            return templates.TemplateResponse(request, "done.html", ctx)
        return templates.TemplateResponse(request, "task.html", ctx)

    @app.get("/task", response_class=HTMLResponse)
    def task(request: Request, a: Auth = Depends(auth)):
        with store.connect() as conn:
            served = store.next_item(conn, a.user)
            view = item_view(store, cfg, conn, a.user, served) if served else None
        return page(request, a, view)

    @app.get("/task/{item_id}", response_class=HTMLResponse)
    def task_item(request: Request, item_id: int, a: Auth = Depends(auth)):
        """A served item, or one already judged (to revise it)."""
        with store.connect() as conn:
            got = store.assignment(conn, a.user.id, _item_id(item_id))
            if got is None or got[1] == "skipped":
                raise HTTPException(404, "no such item in your queue (undo a skip first)")
            mode = "revise" if got[1] == "done" else "judge"
            view = item_view(store, cfg, conn, a.user, got[0], mode)
        return page(request, a, view)

    @app.get("/history", response_class=HTMLResponse)
    def history(request: Request, a: Auth = Depends(auth)):
        with store.connect() as conn:
            rows = store.history(conn, a.user.id)
        for r in rows:
            r["when"] = time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created_at"]))
        label = {c.score: c.label for c in cfg.choices}
        ctx = {"user": a.user, "csrf": a.csrf or "", "cfg": cfg, "rows": rows, "label": label}
        return templates.TemplateResponse(request, "history.html", ctx)

    async def form_of(request: Request, a: Auth) -> dict[str, str]:
        got = {k: str(v) for k, v in (await request.form()).items()}
        check_csrf(a, got.get("csrf"))
        return got

    @app.post("/task/{item_id}/submit")
    async def task_submit_form(request: Request, item_id: int, a: Auth = Depends(auth)):
        """The form the page posts without JavaScript: save, or revise a saved judgement."""
        form = await form_of(request, a)
        answers = {k[7:]: v for k, v in form.items() if k.startswith("answer_")}
        if form.get("mode") == "revise":
            _do_revise(store, cfg, a.user, ReviseIn(item_id=item_id, answers=answers,
                                                    comment=form.get("comment", "")))  # fmt: skip
            return RedirectResponse("/task", 303)
        body = {"item_id": item_id, "submission_id": form.get("submission_id", ""),
                "answers": answers, "comment": form.get("comment", "")}  # fmt: skip
        try:
            sub = SubmitIn.model_validate(body)
        except ValueError as e:
            raise HTTPException(422, f"invalid submission: {e}") from None
        _do_submit(store, cfg, a.user, sub)
        return RedirectResponse("/task", 303)

    @app.post("/task/{item_id}/skip")
    async def task_skip_form(request: Request, item_id: int, a: Auth = Depends(auth)):
        await form_of(request, a)
        _store_call(store.skip, a.user, _item_id(item_id))
        return RedirectResponse("/task", 303)

    @app.post("/task/{item_id}/unskip")
    async def task_unskip_form(request: Request, item_id: int, a: Auth = Depends(auth)):
        await form_of(request, a)
        _store_call(store.unskip, a.user, _item_id(item_id))
        return RedirectResponse(f"/task/{item_id}", 303)


def _store_call(fn, *args):
    """``fn(conn, *args)`` in a fresh connection, with store refusals as HTTP errors."""
    try:
        with fn.__self__.connect() as conn:
            return fn(conn, *args)
    except StoreError as e:
        raise HTTPException(e.status, str(e)) from None


def _item_id(item_id: int) -> int:
    if not 1 <= item_id <= MAX_ITEM_ID:
        raise HTTPException(404, "no such item in your queue")
    return item_id


def _display_scores(cfg: AnnotateConfig, answers: dict[str, str], partial: bool) -> dict[str, int]:
    by_key = {c.key: c.score for c in cfg.choices}
    keys = {a.key for a in cfg.aspects}
    unknown = sorted(set(answers) - keys)
    if unknown:
        raise HTTPException(422, f"unknown aspect(s): {', '.join(k[:40] for k in unknown)}")
    missing = sorted(keys - set(answers))
    if missing and not partial:
        raise HTTPException(422, f"aspect(s) not answered: {', '.join(missing)}")
    bad = [k for k, v in answers.items() if v not in by_key]
    if bad:
        raise HTTPException(422, f"answer to '{bad[0]}' must be one of {', '.join(by_key)}")
    return {k: by_key[v] for k, v in answers.items()}


def _do_submit(store: Store, cfg: AnnotateConfig, user: User, sub: SubmitIn):
    scores = _display_scores(cfg, sub.answers, partial=False)
    if len(sub.comment) > cfg.max_comment_chars:
        raise HTTPException(422, f"comment longer than {cfg.max_comment_chars} characters")
    try:
        with store.connect() as conn:
            return store.submit(
                conn, user, sub.item_id, sub.submission_id, scores,
                client_seconds=sub.client_active_ms / 1000.0, comment=sub.comment or None,
            )  # fmt: skip
    except StoreError as e:
        raise HTTPException(e.status, str(e)) from None


def _do_revise(store: Store, cfg: AnnotateConfig, user: User, rev: ReviseIn):
    scores = _display_scores(cfg, rev.answers, partial=False)
    if len(rev.comment) > cfg.max_comment_chars:
        raise HTTPException(422, f"comment longer than {cfg.max_comment_chars} characters")
    return _store_call(store.revise, user, rev.item_id, scores, rev.comment or None)


def _api_routes(app: FastAPI, store: Store, cfg: AnnotateConfig) -> None:
    def _csrf(request: Request, a: Auth) -> None:
        check_csrf(a, request.headers.get("x-csrf-token"))

    @app.get("/api/me")
    def me(a: Auth = Depends(auth)):
        with store.connect() as conn:
            prog = store.progress(conn, a.user)
        return {"name": a.user.name, "role": a.user.role, "group": a.user.group, **prog}

    @app.get("/api/next")
    def api_next(a: Auth = Depends(auth)):
        with store.connect() as conn:
            served = store.next_item(conn, a.user)
            if served is None:
                return {"item": None, "progress": store.progress(conn, a.user)}
            v = item_view(store, cfg, conn, a.user, served)
        return {
            "item": {
                "item_id": v["item_id"], "trial": v["trial"], "instruction": v["instruction"],
                "document": v["document"], "a": v["a"].text, "b": v["b"].text,
                "flags": {"a": _clean(v["a"].flags), "b": _clean(v["b"].flags)},
                "draft": v["draft"].answers, "draft_comment": v["draft"].comment,
            },
            "aspects": [x.key for x in cfg.aspects],
            "choices": {c.key: c.label for c in cfg.choices},
            "progress": v["progress"],
        }  # fmt: skip

    @app.post("/api/submit")
    def api_submit(request: Request, sub: SubmitIn, a: Auth = Depends(auth)):
        _csrf(request, a)
        r = _do_submit(store, cfg, a.user, sub)
        return {"ok": True, "saved": True, "judgement_id": r.judgement_id,
                "duplicate": r.duplicate, "saved_at": time.time()}  # fmt: skip

    @app.post("/api/skip")
    def api_skip(request: Request, body: ItemIn, a: Auth = Depends(auth)):
        _csrf(request, a)
        _store_call(store.skip, a.user, body.item_id)
        return {"ok": True}

    @app.post("/api/unskip")
    def api_unskip(request: Request, body: ItemIn, a: Auth = Depends(auth)):
        _csrf(request, a)
        _store_call(store.unskip, a.user, body.item_id)
        return {"ok": True, "item_id": body.item_id}

    @app.post("/api/revise")
    def api_revise(request: Request, body: ReviseIn, a: Auth = Depends(auth)):
        _csrf(request, a)
        r = _do_revise(store, cfg, a.user, body)
        return {"ok": True, "saved": True, "judgement_id": r.judgement_id}

    @app.post("/api/draft")
    def api_draft(request: Request, body: DraftIn, a: Auth = Depends(auth)):
        _csrf(request, a)
        _display_scores(cfg, body.answers, partial=True)
        if len(body.comment) > cfg.max_comment_chars:
            raise HTTPException(422, f"comment longer than {cfg.max_comment_chars} characters")
        _store_call(store.save_draft, a.user, body.item_id, body.answers, body.comment)
        return {"ok": True}


def _admin_routes(app: FastAPI, store: Store, cfg: AnnotateConfig, templates) -> None:
    from alignforge.annotate import dashboard as db

    aspects = [a.key for a in cfg.aspects]
    cache: dict[str, dict[str, Any]] = {r: {"key": None} for r in db.RATERS}
    lock = threading.Lock()

    def stats(raters: str = "humans"):
        """(statistics, judgements, plots) of people's judgements, or of the simulated
        annotators' (``raters``): computed once per change of the data and shared by the page,
        its plots and the API, not recomputed per request. ``plots`` holds the PNGs drawn for
        this version of the data."""
        if raters not in db.RATERS:
            raise HTTPException(422, f"annotators must be one of {', '.join(db.RATERS)}")
        with store.connect() as conn, lock:
            key, c = store.stats_version(conn), cache[raters]
            if c["key"] != key:
                s = db.project_stats(store, conn, aspects, cfg.level, cfg.alert_rules(),
                                     cfg.idle_cap_seconds, cfg.bootstrap_samples,
                                     raters)  # fmt: skip
                c.update(key=key, value=(s, store.judgements(conn), {}))
            return c["value"]

    @app.get("/admin", response_class=HTMLResponse)
    def admin(request: Request, annotators: str = "humans", a: Auth = Depends(admin_auth)):
        s = stats(annotators)[0]
        ctx = {"user": a.user, "csrf": a.csrf or "", "cfg": cfg, "s": s, "now": time.time()}
        return templates.TemplateResponse(request, "admin.html", ctx)

    @app.get("/admin/api/stats")
    def admin_stats(annotators: str = "humans", a: Auth = Depends(admin_auth)):
        return _clean(stats(annotators)[0]._asdict())

    @app.get("/admin/plot/{name}.png")
    def plot(name: str, annotators: str = "humans", a: Auth = Depends(admin_auth)):
        from fastapi.responses import Response

        s, js, plots = stats(annotators)
        makers = {
            "rate": lambda: db.plot_rate(js, annotators),
            "time": lambda: db.plot_time(js, cfg.idle_cap_seconds, annotators),
            "agreement": lambda: db.plot_agreement(s, cfg.alpha_floor),
        }
        if name not in makers:
            raise HTTPException(404, "no such plot")
        if name not in plots:
            plots[name] = makers[name]()
        return Response(plots[name], media_type="image/png")

    return stats


def _review_routes(app: FastAPI, store: Store, cfg: AnnotateConfig, templates, stats) -> None:
    """One annotator's page, and the adjudication queue of items the annotators disagree on."""
    from alignforge.annotate import dashboard as db

    aspects = [a.key for a in cfg.aspects]
    label = {c.score: c.label for c in cfg.choices}

    def render(request: Request, a: Auth, name: str, **ctx):
        ctx = {"user": a.user, "csrf": a.csrf or "", "cfg": cfg, "label": label, **ctx}
        return templates.TemplateResponse(request, name, ctx)

    @app.get("/admin/annotators/{name}", response_class=HTMLResponse)
    def annotator(request: Request, name: str, a: Auth = Depends(admin_auth)):
        for raters in db.RATERS:  # a simulated annotator's page is computed with the panel's
            s, js, _ = stats(raters)
            row = next((r for r in s.annotators if r.user == name), None)
            if row is not None:
                break
        else:
            raise HTTPException(404, f"no annotator named {name!r} has judged or skipped")
        main = next((w for w in s.windows if w.kind == "main"), None)
        pairs = [p for w in [main] if w for r in w.rows if r.aspect == "overall" and r.ties
                 for p in r.pairs if name in (p.rater1, p.rater2)]  # fmt: skip
        with store.connect() as conn:
            uid = conn.execute("SELECT id FROM users WHERE name=?", (name,)).fetchone()[0]
            trail = store.audit_trail(conn, uid)
        comments = [j for j in js if j.user == name and j.comment]
        return render(request, a, "annotator.html", r=row, pairs=pairs, trail=trail,
                      comments=comments, now=time.time())  # fmt: skip

    @app.get("/admin/adjudicate", response_class=HTMLResponse)
    def queue(request: Request, a: Auth = Depends(admin_auth)):
        with store.connect() as conn:
            js = db.humans(store.judgements(conn))
            rows = db.disagreements(js, db.item_infos(conn), aspects,
                                    set(store.adjudications(conn)))  # fmt: skip
        return render(request, a, "adjudicate.html", rows=rows)

    @app.get("/admin/adjudicate/{item_id}", response_class=HTMLResponse)
    def adjudicate_item(request: Request, item_id: int, a: Auth = Depends(admin_auth)):
        with store.connect() as conn:
            it = store.item(conn, _item_id(item_id))
            if it is None:
                raise HTTPException(404, f"no item {item_id}")
            js = [j for j in db.humans(store.judgements(conn)) if j.item_id == item_id]
            decision = store.adjudications(conn).get(item_id)
        meta = it["meta"] or {}
        pa, pb = (parse_completion(it[f"{s}_text"], _finish_reason(meta, s), cfg.expect_json)
                  for s in ("a", "b"))  # fmt: skip
        instruction, document = split_prompt(it["prompt"], it.get("source_document"))
        return render(request, a, "adjudicate_item.html", it=it, js=js, a_view=pa, b_view=pb,
                      document=document, instruction=instruction, decision=decision,
                      segments=highlight(document, mention_classes(pa, pb)))  # fmt: skip

    @app.post("/admin/adjudicate/{item_id}")
    async def decide(request: Request, item_id: int, a: Auth = Depends(admin_auth)):
        form = {k: str(v) for k, v in (await request.form()).items()}
        check_csrf(a, form.get("csrf"))
        answers = {k[7:]: v for k, v in form.items() if k.startswith("answer_")}
        scores = _display_scores(cfg, answers, partial=False)  # shown unswapped: canonical
        note = form.get("note", "")[: cfg.max_comment_chars] or None
        _store_call(store.adjudicate, a.user, _item_id(item_id), scores, note)
        return RedirectResponse("/admin/adjudicate", 303)


def _user_routes(app: FastAPI, store: Store, templates) -> None:
    """``/admin/users``: list, add, revoke, reset a token, change a role. A new token is shown
    once, in the answer to the POST that made it (never in a URL)."""

    def page(request: Request, a: Auth, new_token: tuple[str, str] | None = None):
        with store.connect() as conn:
            rows = store.user_rows(conn)
        ctx = {"user": a.user, "csrf": a.csrf or "", "rows": rows, "new_token": new_token,
               "title": "Users"}  # fmt: skip
        return templates.TemplateResponse(request, "users.html", ctx)

    async def form(request: Request, a: Auth) -> dict[str, str]:
        got = {k: str(v) for k, v in (await request.form()).items()}
        check_csrf(a, got.get("csrf"))
        return got

    def run(fn, *args):
        try:
            return fn(*args)
        except StoreError as e:
            raise HTTPException(e.status, str(e)) from None

    @app.get("/admin/users", response_class=HTMLResponse)
    def users(request: Request, a: Auth = Depends(admin_auth)):
        return page(request, a)

    @app.post("/admin/users", response_class=HTMLResponse)
    async def add(request: Request, a: Auth = Depends(admin_auth)):
        f = await form(request, a)
        name = f.get("name", "").strip()
        token = run(store.add_user, name, f.get("role", "annotator"),
                    f.get("group", "").strip() or "default", _annotates(f))  # fmt: skip
        return page(request, a, (name, token))

    @app.post("/admin/users/{name}/revoke")
    async def revoke(request: Request, name: str, a: Auth = Depends(admin_auth)):
        await form(request, a)
        run(store.revoke, name)
        return RedirectResponse("/admin/users", 303)

    @app.post("/admin/users/{name}/reset", response_class=HTMLResponse)
    async def reset(request: Request, name: str, a: Auth = Depends(admin_auth)):
        await form(request, a)
        return page(request, a, (name, run(store.reset_token, name)))

    @app.post("/admin/users/{name}/role")
    async def role(request: Request, name: str, a: Auth = Depends(admin_auth)):
        f = await form(request, a)
        run(store.set_role, name, f.get("role", ""), _annotates(f))
        return RedirectResponse("/admin/users", 303)


def _annotates(form: dict[str, str]) -> bool | None:
    """The form's 'annotates' choice: 'yes', 'no', or absent (the role's default)."""
    return {"yes": True, "no": False}.get(form.get("annotates", ""))


def _clean(x: Any) -> Any:
    """NamedTuples to dicts and NaN to None, so the stats serialise as strict JSON."""
    if isinstance(x, tuple) and hasattr(x, "_asdict"):
        return {k: _clean(v) for k, v in x._asdict().items()}
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, float) and x != x:
        return None
    return x
