"""SQLite store of an annotation project: users, items (pairs), batches, assignments, judgements.

    from alignforge.annotate.store import Store
    store = Store.create("ann/")                 # ann/annotate.db, WAL mode
    token = store.add_user("alice", role="annotator", group="g1")   # shown once, hash kept
    with store.connect() as conn:
        item = store.next_item(conn, user_id=1)  # claims one item for alice (random A/B sides)

Every write is one ``BEGIN IMMEDIATE`` transaction. Judgements commit with ``synchronous=FULL``:
when ``submit`` returns, the judgement is on disk (WAL + fsync), so a server killed (or a
machine losing power) right after answering "saved" loses nothing.

Scores are stored *canonically*: positive means the item's ``a`` completion is better,
whatever side the annotator saw it on (``assignments.swapped`` records the display order).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

from alignforge.errors import UserError

DB_NAME = "annotate.db"
ROLES = ("annotator", "admin", "judge")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT);
CREATE TABLE IF NOT EXISTS users (
  id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL,
  role TEXT NOT NULL CHECK (role IN ('annotator', 'admin', 'judge')),
  grp TEXT NOT NULL DEFAULT 'default', token_hash TEXT UNIQUE, created_at REAL NOT NULL,
  annotates INTEGER NOT NULL DEFAULT 1, revoked_at REAL, simulated INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS sessions (
  sid_hash TEXT PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id),
  csrf TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS batches (
  id INTEGER PRIMARY KEY, name TEXT UNIQUE NOT NULL, grp TEXT, trial INTEGER NOT NULL,
  overlap REAL NOT NULL, released_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS items (
  id INTEGER PRIMARY KEY, pair_key TEXT UNIQUE NOT NULL, kind TEXT NOT NULL DEFAULT 'pair',
  prompt_id TEXT, doc_id TEXT, split TEXT, prompt_json TEXT NOT NULL, source_document TEXT,
  a_id TEXT, b_id TEXT, a_text TEXT NOT NULL, b_text TEXT NOT NULL, meta_json TEXT,
  batch_id INTEGER REFERENCES batches(id), trial INTEGER NOT NULL DEFAULT 0,
  shared INTEGER NOT NULL DEFAULT 0, claimed_by INTEGER REFERENCES users(id),
  created_at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS items_batch ON items(batch_id, trial, shared, claimed_by);
CREATE TABLE IF NOT EXISTS assignments (
  user_id INTEGER NOT NULL REFERENCES users(id), item_id INTEGER NOT NULL REFERENCES items(id),
  swapped INTEGER NOT NULL, served_at REAL NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('served', 'done', 'skipped')),
  PRIMARY KEY (user_id, item_id));
CREATE INDEX IF NOT EXISTS assignments_item ON assignments(item_id);
CREATE TABLE IF NOT EXISTS judgements (
  id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id),
  item_id INTEGER NOT NULL REFERENCES items(id), submission_id TEXT NOT NULL,
  swapped INTEGER NOT NULL, scores_json TEXT NOT NULL, overall REAL NOT NULL,
  answers_json TEXT NOT NULL, server_seconds REAL, client_seconds REAL, comment TEXT,
  created_at REAL NOT NULL, updated_at REAL, revisions INTEGER NOT NULL DEFAULT 0,
  UNIQUE (user_id, item_id));
CREATE TABLE IF NOT EXISTS drafts (
  user_id INTEGER NOT NULL, item_id INTEGER NOT NULL, answers_json TEXT NOT NULL,
  updated_at REAL NOT NULL, comment TEXT, PRIMARY KEY (user_id, item_id));
CREATE TABLE IF NOT EXISTS audit (
  id INTEGER PRIMARY KEY, user_id INTEGER NOT NULL REFERENCES users(id), item_id INTEGER,
  action TEXT NOT NULL, detail_json TEXT, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS audit_user ON audit(user_id, at);
CREATE TABLE IF NOT EXISTS adjudications (
  item_id INTEGER PRIMARY KEY REFERENCES items(id), user_id INTEGER NOT NULL REFERENCES users(id),
  scores_json TEXT NOT NULL, overall REAL NOT NULL, note TEXT, created_at REAL NOT NULL);
"""
SCHEMA_VERSION = "3"
# columns added after version 1: (table, column, declaration)
ADDED_COLUMNS = [
    ("users", "annotates", "INTEGER NOT NULL DEFAULT 1"),
    ("users", "revoked_at", "REAL"),
    ("judgements", "updated_at", "REAL"),
    ("judgements", "revisions", "INTEGER NOT NULL DEFAULT 0"),
    ("drafts", "comment", "TEXT"),
    ("users", "simulated", "INTEGER NOT NULL DEFAULT 0"),
]


class StoreError(UserError, ValueError):
    """A request the store refuses; ``status`` is the HTTP code the web app answers with."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


class User(NamedTuple):
    id: int
    name: str
    role: str
    group: str
    annotates: bool = True  # an admin's judgements count as an annotator's only when set
    simulated: bool = False  # a simulated annotator (annotate/panel.py), never a person


class UserRow(NamedTuple):
    name: str
    role: str
    group: str
    annotates: bool
    active: bool  # False once revoked
    created_at: float
    revoked_at: float | None
    n_judgements: int
    last_at: float | None


class Served(NamedTuple):
    item_id: int
    swapped: bool
    served_at: float


class Judgement(NamedTuple):
    id: int
    user_id: int
    user: str
    role: str  # as counted: 'annotator' (an admin who annotates too), 'admin', 'judge' or
    # 'simulated' (a simulated annotator: kept apart from people wherever judgements are counted)
    item_id: int
    scores: dict[str, int]
    overall: float
    server_seconds: float | None
    client_seconds: float | None
    created_at: float
    comment: str | None = None


class Draft(NamedTuple):
    answers: dict[str, str]  # aspect -> choice key, as displayed
    comment: str


class SubmitResult(NamedTuple):
    judgement_id: int
    duplicate: bool
    overall: float


class BatchInfo(NamedTuple):
    id: int
    name: str
    n_items: int
    n_shared: int
    trial: bool


def hash_secret(secret: str) -> str:
    """SHA-256 of a random 256-bit token (no slow hash needed: tokens are not passwords)."""
    return hashlib.sha256(secret.encode()).hexdigest()


class Store:
    """Handle on ``PROJECT_DIR/annotate.db``; open one connection per thread with ``connect``."""

    def __init__(self, project_dir: str | Path):
        self.dir = Path(project_dir)
        self.path = self.dir / DB_NAME
        self._local = threading.local()
        if not self.path.exists():
            raise FileNotFoundError(
                f"{self.path} does not exist; run `alignforge annotate init {self.dir}` first"
            )
        with self.connect() as conn:
            _migrate(conn)

    @classmethod
    def create(cls, project_dir: str | Path) -> Store:
        d = Path(project_dir)
        d.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(d / DB_NAME)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.executescript(SCHEMA)
            conn.execute(
                "INSERT OR IGNORE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,)
            )
            conn.commit()
        finally:
            conn.close()
        return cls(d)

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        """This thread's connection (autocommit; writes go through ``_tx``).

        One connection per thread is opened once and reused: opening one costs more than most
        of the queries a request makes, and the web app's worker threads live long.
        """
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        yield conn

    # ---------------------------------------------------------------- users and sessions
    def add_user(
        self, name: str, role: str = "annotator", group: str = "default",
        annotates: bool | None = None,
    ) -> str:  # fmt: skip
        """Create a user and return its login token (only the hash is stored).

        ``annotates`` (default: True for annotators, False for admins) says whether the user's
        judgements count as an annotator's in agreement and exports.
        """
        _check_role(role)
        _check_name(name)
        token = secrets.token_urlsafe(32)
        ann = role == "annotator" if annotates is None else bool(annotates)
        with self.connect() as conn, _tx(conn):
            if conn.execute("SELECT 1 FROM users WHERE name=?", (name,)).fetchone():
                raise StoreError(f"user {name!r} already exists", 409)
            conn.execute(
                "INSERT INTO users (name, role, grp, token_hash, created_at, annotates) "
                "VALUES (?,?,?,?,?,?)",
                (name, role, group, hash_secret(token), time.time(), int(ann)),
            )
        return token

    def user_rows(self, conn: sqlite3.Connection) -> list[UserRow]:
        """Every login (AI judges and simulated annotators excluded), its status and activity."""
        rows = conn.execute(
            "SELECT u.name, u.role, u.grp, u.annotates, u.revoked_at IS NULL, u.created_at, "
            "u.revoked_at, COUNT(j.id), MAX(j.created_at) FROM users u LEFT JOIN judgements j "
            "ON j.user_id = u.id WHERE u.role != 'judge' AND u.simulated = 0 GROUP BY u.id "
            "ORDER BY u.name"
        ).fetchall()
        return [UserRow(r[0], r[1], r[2], bool(r[3]), bool(r[4]), *r[5:]) for r in rows]

    def revoke(self, name: str) -> None:
        """Refuse the user's token and end their sessions at once; their open items go back."""
        with self.connect() as conn, _tx(conn):
            uid = self._login_id(conn, name)
            self._keep_an_admin(conn, uid)
            conn.execute(
                "UPDATE users SET token_hash=NULL, revoked_at=? WHERE id=?", (time.time(), uid)
            )
            conn.execute("DELETE FROM sessions WHERE user_id=?", (uid,))
            conn.execute(
                "UPDATE items SET claimed_by=NULL WHERE claimed_by=? AND id IN (SELECT item_id "
                "FROM assignments WHERE user_id=? AND status='served')",
                (uid, uid),
            )
            conn.execute("DELETE FROM assignments WHERE user_id=? AND status='served'", (uid,))
            conn.execute("DELETE FROM drafts WHERE user_id=?", (uid,))

    def reset_token(self, name: str) -> str:
        """A new token for the user (the old one and its sessions stop working); re-activates."""
        token = secrets.token_urlsafe(32)
        with self.connect() as conn, _tx(conn):
            uid = self._login_id(conn, name)
            conn.execute(
                "UPDATE users SET token_hash=?, revoked_at=NULL WHERE id=?",
                (hash_secret(token), uid),
            )
            conn.execute("DELETE FROM sessions WHERE user_id=?", (uid,))
        return token

    def set_role(self, name: str, role: str, annotates: bool | None = None) -> None:
        """Change a user's role (and whether their judgements count as an annotator's)."""
        _check_role(role)
        ann = role == "annotator" if annotates is None else bool(annotates)
        with self.connect() as conn, _tx(conn):
            uid = self._login_id(conn, name)
            if role != "admin":
                self._keep_an_admin(conn, uid)
            conn.execute("UPDATE users SET role=?, annotates=? WHERE id=?", (role, int(ann), uid))

    def _login_id(self, conn: sqlite3.Connection, name: str) -> int:
        row = conn.execute(
            "SELECT id FROM users WHERE name=? AND role != 'judge' AND simulated = 0", (name,)
        ).fetchone()
        if row is None:
            raise StoreError(f"no user named {name!r}", 404)
        return row[0]

    def _keep_an_admin(self, conn: sqlite3.Connection, uid: int) -> None:
        others = conn.execute(
            "SELECT COUNT(*) FROM users WHERE role='admin' AND revoked_at IS NULL AND id != ?",
            (uid,),
        ).fetchone()[0]
        is_admin = conn.execute("SELECT role='admin' FROM users WHERE id=?", (uid,)).fetchone()[0]
        if is_admin and others == 0:
            raise StoreError("this is the last active admin; make another admin first", 409)

    def judge_user(self, conn: sqlite3.Connection, model: str) -> User:
        """The pseudo-user ``judge:<model>`` under which AI judgements are stored."""
        name = f"judge:{model}"
        conn.execute(
            "INSERT OR IGNORE INTO users (name, role, grp, created_at) VALUES (?, 'judge', '*', ?)",
            (name, time.time()),
        )
        row = conn.execute(
            "SELECT id, name, role, grp, 0 FROM users WHERE name=?", (name,)
        ).fetchone()
        return User(*row[:4], False)

    def simulated_user(self, conn: sqlite3.Connection, name: str, group: str = "default") -> User:
        """The simulated annotator ``name``, created on first use: an annotator without a token
        (nobody logs in as it) whose judgements are marked simulated wherever they are counted."""
        _check_name(name)
        with _tx(conn):
            conn.execute(
                "INSERT OR IGNORE INTO users (name, role, grp, created_at, simulated) "
                "VALUES (?, 'annotator', ?, ?, 1)",
                (name, group, time.time()),
            )
            row = conn.execute(
                "SELECT id, name, role, grp, simulated FROM users WHERE name=?", (name,)
            ).fetchone()
        if not row[4]:
            raise StoreError(f"user {name!r} exists and is not simulated; name the panel otherwise")
        return User(*row[:4], True, True)

    def user_by_token(self, conn: sqlite3.Connection, token: str) -> User | None:
        row = conn.execute(
            "SELECT id, name, role, grp, annotates FROM users WHERE token_hash=? "
            "AND role != 'judge' AND revoked_at IS NULL",
            (hash_secret(token),),
        ).fetchone()
        return User(*row[:4], bool(row[4])) if row else None

    def new_session(self, conn: sqlite3.Connection, user_id: int, hours: float) -> tuple[str, str]:
        """Return (session id for the cookie, CSRF token for forms and the JSON API)."""
        sid, csrf = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
        now = time.time()
        with _tx(conn, durable=False):
            conn.execute("DELETE FROM sessions WHERE expires_at < ?", (now,))
            conn.execute(
                "INSERT INTO sessions VALUES (?,?,?,?,?)",
                (hash_secret(sid), user_id, csrf, now, now + hours * 3600),
            )
        return sid, csrf

    def session_user(self, conn: sqlite3.Connection, sid: str) -> tuple[User, str] | None:
        row = conn.execute(
            "SELECT u.id, u.name, u.role, u.grp, u.annotates, s.csrf FROM sessions s JOIN users u "
            "ON u.id = s.user_id WHERE s.sid_hash=? AND s.expires_at > ? AND u.revoked_at IS NULL",
            (hash_secret(sid), time.time()),
        ).fetchone()
        return (User(*row[:4], bool(row[4])), row[5]) if row else None

    def end_session(self, conn: sqlite3.Connection, sid: str) -> None:
        with _tx(conn, durable=False):
            conn.execute("DELETE FROM sessions WHERE sid_hash=?", (hash_secret(sid),))

    # ---------------------------------------------------------------- items and batches
    def insert_items(self, rows: list[dict[str, Any]]) -> tuple[int, int]:
        """Insert item dicts (see ``importer``); returns (added, already present)."""
        added = 0
        now = time.time()
        with self.connect() as conn, _tx(conn):
            for r in rows:
                cur = conn.execute(
                    "INSERT OR IGNORE INTO items (pair_key, kind, prompt_id, doc_id, split, "
                    "prompt_json, source_document, a_id, b_id, a_text, b_text, meta_json, "
                    "created_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        r["pair_key"], r.get("kind", "pair"), r.get("prompt_id"),
                        r.get("doc_id"), r.get("split"), json.dumps(r["prompt"]),
                        r.get("source_document"), r.get("a_id"), r.get("b_id"),
                        r["a_text"], r["b_text"], json.dumps(r.get("meta") or {}), now,
                    ),
                )  # fmt: skip
                added += cur.rowcount
        return added, len(rows) - added

    def release(
        self,
        name: str,
        size: int | None,
        group: str | None = None,
        overlap: float = 0.2,
        trial: bool = False,
        kind: str | None = None,
        split: str | None = None,
        seed: int = 0,
    ) -> BatchInfo:
        """Release up to ``size`` unreleased items as batch ``name`` for ``group`` (None = all).

        A share ``overlap`` of the batch is *shared*: every annotator of the group sees it, which
        is what agreement is measured on. A trial batch is shared entirely and served first.
        """
        import random

        if not 0.0 <= overlap <= 1.0:
            raise StoreError(f"overlap must be in [0, 1], got {overlap}")
        where, args = "batch_id IS NULL", []
        if kind:
            where, args = where + " AND kind=?", [*args, kind]
        if split:
            where, args = where + " AND split=?", [*args, split]
        with self.connect() as conn, _tx(conn):
            if conn.execute("SELECT 1 FROM batches WHERE name=?", (name,)).fetchone():
                raise StoreError(f"batch {name!r} already exists", 409)
            limit = -1 if size is None else int(size)
            ids = [
                r[0]
                for r in conn.execute(
                    f"SELECT id FROM items WHERE {where} ORDER BY id LIMIT ?", (*args, limit)
                )
            ]
            if not ids:
                raise StoreError("no unreleased items match; import some first", 409)
            n_shared = len(ids) if trial else round(overlap * len(ids))
            shared = set(random.Random(seed).sample(ids, n_shared))
            cur = conn.execute(
                "INSERT INTO batches (name, grp, trial, overlap, released_at) VALUES (?,?,?,?,?)",
                (name, group, int(trial), 1.0 if trial else overlap, time.time()),
            )
            bid = cur.lastrowid
            conn.executemany(
                "UPDATE items SET batch_id=?, trial=?, shared=? WHERE id=?",
                [(bid, int(trial), int(i in shared), i) for i in ids],
            )
        return BatchInfo(bid, name, len(ids), n_shared, trial)

    def item(self, conn: sqlite3.Connection, item_id: int) -> dict[str, Any] | None:
        row = conn.execute("SELECT * FROM items WHERE id=?", (item_id,)).fetchone()
        if row is None:
            return None
        d = dict(row)
        d["prompt"] = json.loads(d.pop("prompt_json"))
        d["meta"] = json.loads(d.pop("meta_json") or "{}")
        return d

    # ---------------------------------------------------------------- the annotator's queue
    def next_item(self, conn: sqlite3.Connection, user: User, rng_seed: int | None = None):
        """The item the user works on now: the one already served, else claim the next one.

        Order: trial items first, then batches in release order; within a batch, an order of
        the user's own (the same shared items reach every annotator in a different order, so
        position and fatigue effects do not line up across raters). A shared item is served to
        every member of the batch's group; any other item to exactly one annotator.
        """
        import random

        open_q = (
            "SELECT item_id, swapped, served_at FROM assignments WHERE user_id=? "
            "AND status='served' ORDER BY served_at LIMIT 1"
        )
        unseen = "NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.user_id = ?)"
        row = conn.execute(open_q, (user.id,)).fetchone()  # read-only fast path
        if row:
            return Served(row[0], bool(row[1]), row[2])
        # Choose outside the write lock (the ordered scan is the slow part), then claim inside
        # it after checking, by primary key, that nobody took the item in between.
        while True:
            cand = conn.execute(
                "SELECT i.id, i.shared FROM items i JOIN batches b ON b.id = i.batch_id "
                "WHERE (b.grp IS NULL OR b.grp = ?) AND (i.shared = 1 OR i.claimed_by IS NULL) "
                f"AND {unseen} ORDER BY i.trial DESC, b.id, {_SHUFFLE} LIMIT 1",
                (user.group, user.id, _salt(user.id), _salt(user.id)),
            ).fetchone()
            with _tx(conn, durable=False):
                row = conn.execute(open_q, (user.id,)).fetchone()
                if row:  # claimed meanwhile by the same user (another tab)
                    return Served(row[0], bool(row[1]), row[2])
                if cand is None:
                    return None
                item_id, shared = cand
                still = conn.execute(
                    f"SELECT 1 FROM items i WHERE i.id = ? AND (i.shared = 1 OR "
                    f"i.claimed_by IS NULL) AND {unseen}",
                    (item_id, user.id),
                ).fetchone()
                if still is None:
                    continue  # another annotator claimed it first: choose again
                swapped = random.Random(rng_seed).random() < 0.5
                now = time.time()
                conn.execute(
                    "INSERT INTO assignments VALUES (?,?,?,?,'served')",
                    (user.id, item_id, int(swapped), now),
                )
                if not shared:
                    conn.execute("UPDATE items SET claimed_by=? WHERE id=?", (user.id, item_id))
                return Served(item_id, swapped, now)

    def assignment(self, conn: sqlite3.Connection, user_id: int, item_id: int):
        row = conn.execute(
            "SELECT item_id, swapped, served_at, status FROM assignments WHERE user_id=? "
            "AND item_id=?",
            (user_id, item_id),
        ).fetchone()
        return (Served(row[0], bool(row[1]), row[2]), row[3]) if row else None

    def progress(self, conn: sqlite3.Connection, user: User) -> dict[str, int]:
        """``done``: items the user judged; ``left``: what is ahead in their own queue.

        That is the shared items they have not seen, the items they hold, and their share of
        each batch's unclaimed unshared items (split evenly over the annotators who may take
        them, rounded up): not the whole pool, which everyone draws from.
        """
        done = conn.execute(
            "SELECT COUNT(*) FROM judgements WHERE user_id=?", (user.id,)
        ).fetchone()[0]
        unseen = "NOT EXISTS (SELECT 1 FROM assignments a WHERE a.item_id = i.id AND a.user_id = ?)"
        shared = conn.execute(
            "SELECT COUNT(*) FROM items i JOIN batches b ON b.id = i.batch_id WHERE "
            f"(b.grp IS NULL OR b.grp = ?) AND i.shared = 1 AND {unseen}",
            (user.group, user.id),
        ).fetchone()[0]
        held = conn.execute(
            "SELECT COUNT(*) FROM assignments WHERE user_id=? AND status='served'", (user.id,)
        ).fetchone()[0]
        pools = conn.execute(
            "SELECT b.grp, COUNT(*) FROM items i JOIN batches b ON b.id = i.batch_id WHERE "
            "(b.grp IS NULL OR b.grp = ?) AND i.shared = 0 AND i.claimed_by IS NULL "
            f"AND {unseen} GROUP BY b.id",
            (user.group, user.id),
        ).fetchall()
        share = 0
        for grp, n in pools:
            takers = conn.execute(
                "SELECT COUNT(*) FROM users WHERE role != 'judge' AND revoked_at IS NULL "
                "AND (role = 'annotator' OR annotates = 1) AND (? IS NULL OR grp = ?)",
                (grp, grp),
            ).fetchone()[0]
            share += -(-n // max(1, takers))
        return {"done": done, "left": shared + held + share}

    def skip(self, conn: sqlite3.Connection, user: User, item_id: int) -> None:
        """Pass on a served item (recorded in the audit trail; ``unskip`` takes it back)."""
        with _tx(conn, durable=False):
            a = self.assignment(conn, user.id, item_id)
            if a is None:
                raise StoreError(f"item {item_id} is not in your queue", 404)
            if a[1] != "served":
                raise StoreError(f"item {item_id} is already {a[1]}", 409)
            conn.execute(
                "UPDATE assignments SET status='skipped' WHERE user_id=? AND item_id=?",
                (user.id, item_id),
            )
            # someone else may take an unshared item this annotator passed on
            conn.execute(
                "UPDATE items SET claimed_by=NULL WHERE id=? AND claimed_by=?", (item_id, user.id)
            )
            _audit(conn, user.id, item_id, "skip", {"served_at": a[0].served_at})

    def unskip(self, conn: sqlite3.Connection, user: User, item_id: int) -> None:
        """Undo a skip: the item is served to the user again (its draft is still there)."""
        with _tx(conn, durable=False):
            a = self.assignment(conn, user.id, item_id)
            if a is None or a[1] != "skipped":
                raise StoreError(f"item {item_id} is not skipped in your queue", 404)
            shared, holder = conn.execute(
                "SELECT shared, claimed_by FROM items WHERE id=?", (item_id,)
            ).fetchone()
            if not shared and holder is not None:
                raise StoreError(f"item {item_id} was taken by another annotator meanwhile", 409)
            if not shared:
                conn.execute("UPDATE items SET claimed_by=? WHERE id=?", (user.id, item_id))
            conn.execute(
                "UPDATE assignments SET status='served', served_at=? WHERE user_id=? AND item_id=?",
                (time.time(), user.id, item_id),
            )
            _audit(conn, user.id, item_id, "unskip", None)

    def last_skip(self, conn: sqlite3.Connection, user: User, since: float) -> int | None:
        """The item the user skipped last (after ``since``), if it is still skipped."""
        row = conn.execute(
            "SELECT a.item_id FROM audit a JOIN assignments s ON s.user_id = a.user_id "
            "AND s.item_id = a.item_id WHERE a.user_id=? AND a.action='skip' AND a.at > ? "
            "AND s.status='skipped' ORDER BY a.id DESC LIMIT 1",
            (user.id, since),
        ).fetchone()
        return row[0] if row else None

    def audit_trail(self, conn: sqlite3.Connection, user_id: int | None = None) -> list[dict]:
        """Skips, undone skips and revisions, newest first (one user's, or everyone's)."""
        rows = conn.execute(
            "SELECT a.id, u.name, a.item_id, a.action, a.detail_json, a.at FROM audit a "
            "JOIN users u ON u.id = a.user_id WHERE ? IS NULL OR a.user_id = ? "
            "ORDER BY a.id DESC",
            (user_id, user_id),
        ).fetchall()
        return [
            {"id": r[0], "user": r[1], "item_id": r[2], "action": r[3],
             "detail": json.loads(r[4]) if r[4] else None, "at": r[5]}
            for r in rows
        ]  # fmt: skip

    def save_draft(
        self, conn: sqlite3.Connection, user: User, item_id: int, answers: dict, comment: str = ""
    ) -> None:
        with _tx(conn, durable=False):
            a = self.assignment(conn, user.id, item_id)
            if a is None or a[1] != "served":
                raise StoreError(f"item {item_id} is not open in your queue", 404)
            conn.execute(
                "INSERT OR REPLACE INTO drafts (user_id, item_id, answers_json, updated_at, "
                "comment) VALUES (?,?,?,?,?)",
                (user.id, item_id, json.dumps(answers), time.time(), comment),
            )

    def draft(self, conn: sqlite3.Connection, user_id: int, item_id: int) -> Draft:
        row = conn.execute(
            "SELECT answers_json, comment FROM drafts WHERE user_id=? AND item_id=?",
            (user_id, item_id),
        ).fetchone()
        return Draft(json.loads(row[0]), row[1] or "") if row else Draft({}, "")

    # ---------------------------------------------------------------- judgements
    def submit(
        self,
        conn: sqlite3.Connection,
        user: User,
        item_id: int,
        submission_id: str,
        display_scores: dict[str, int],
        client_seconds: float | None = None,
        comment: str | None = None,
    ) -> SubmitResult:
        """Record a judgement given in display orientation; idempotent per (user, item, id).

        Re-sending the same ``submission_id`` returns the stored judgement (``duplicate``);
        a different id for an item already judged is a conflict (409).
        """
        with _tx(conn):
            a = self.assignment(conn, user.id, item_id)
            if a is None:
                raise StoreError(f"item {item_id} is not in your queue", 404)
            old = conn.execute(
                "SELECT id, submission_id, overall FROM judgements WHERE user_id=? AND item_id=?",
                (user.id, item_id),
            ).fetchone()
            if old is not None:
                if old[1] == submission_id:
                    return SubmitResult(old[0], True, old[2])
                raise StoreError(f"item {item_id} was already judged", 409)
            if a[1] != "served":
                raise StoreError(f"item {item_id} was {a[1]}", 409)
            served = a[0]
            sign = -1 if served.swapped else 1
            scores = {k: sign * int(v) for k, v in display_scores.items()}
            overall = float(sum(scores.values()))
            now = time.time()
            cur = conn.execute(
                "INSERT INTO judgements (user_id, item_id, submission_id, swapped, scores_json, "
                "overall, answers_json, server_seconds, client_seconds, comment, created_at) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    user.id, item_id, submission_id, int(served.swapped), json.dumps(scores),
                    overall, json.dumps(display_scores), now - served.served_at, client_seconds,
                    comment, now,
                ),
            )  # fmt: skip
            conn.execute(
                "UPDATE assignments SET status='done' WHERE user_id=? AND item_id=?",
                (user.id, item_id),
            )
            conn.execute("DELETE FROM drafts WHERE user_id=? AND item_id=?", (user.id, item_id))
        return SubmitResult(cur.lastrowid, False, overall)

    def revise(
        self, conn: sqlite3.Connection, user: User, item_id: int, display_scores: dict[str, int],
        comment: str | None = None,
    ) -> SubmitResult:  # fmt: skip
        """Change the user's saved judgement of an item; the old one goes to the audit trail."""
        with _tx(conn):
            a = self.assignment(conn, user.id, item_id)
            old = conn.execute(
                "SELECT id, scores_json, answers_json, comment, overall FROM judgements "
                "WHERE user_id=? AND item_id=?",
                (user.id, item_id),
            ).fetchone()
            if a is None or old is None:
                raise StoreError(f"you have not judged item {item_id}", 404)
            sign = -1 if a[0].swapped else 1
            scores = {k: sign * int(v) for k, v in display_scores.items()}
            overall = float(sum(scores.values()))
            conn.execute(
                "UPDATE judgements SET scores_json=?, overall=?, answers_json=?, comment=?, "
                "updated_at=?, revisions=revisions+1 WHERE id=?",
                (json.dumps(scores), overall, json.dumps(display_scores), comment, time.time(),
                 old[0]),
            )  # fmt: skip
            _audit(conn, user.id, item_id, "revise", {
                "judgement_id": old[0], "old_scores": json.loads(old[1]),
                "old_answers": json.loads(old[2]), "old_comment": old[3], "old_overall": old[4],
            })  # fmt: skip
        return SubmitResult(old[0], False, overall)

    def own_judgement(self, conn: sqlite3.Connection, user_id: int, item_id: int) -> dict | None:
        """The user's judgement of an item as they saw it: display scores, comment, times."""
        row = conn.execute(
            "SELECT answers_json, comment, created_at, updated_at, revisions FROM judgements "
            "WHERE user_id=? AND item_id=?",
            (user_id, item_id),
        ).fetchone()
        if row is None:
            return None
        return {"display_scores": json.loads(row[0]), "comment": row[1] or "",
                "created_at": row[2], "updated_at": row[3], "revisions": row[4]}  # fmt: skip

    def history(self, conn: sqlite3.Connection, user_id: int, limit: int = 100) -> list[dict]:
        """The user's latest judgements, newest first."""
        rows = conn.execute(
            "SELECT item_id, answers_json, comment, created_at, revisions FROM judgements "
            "WHERE user_id=? ORDER BY created_at DESC, id DESC LIMIT ?",
            (user_id, limit),
        ).fetchall()
        return [
            {"item_id": r[0], "display_scores": json.loads(r[1]), "comment": r[2] or "",
             "created_at": r[3], "revisions": r[4]}
            for r in rows
        ]  # fmt: skip

    def adjudicate(
        self, conn: sqlite3.Connection, user: User, item_id: int, scores: dict[str, int],
        note: str | None = None,
    ) -> None:  # fmt: skip
        """Record an admin's decision on an item the annotators disagree on (canonical scores:
        + means the item's ``a`` is better). A later decision replaces it; both are audited."""
        with _tx(conn):
            if conn.execute("SELECT 1 FROM items WHERE id=?", (item_id,)).fetchone() is None:
                raise StoreError(f"no item {item_id}", 404)
            overall = float(sum(scores.values()))
            conn.execute(
                "INSERT OR REPLACE INTO adjudications VALUES (?,?,?,?,?,?)",
                (item_id, user.id, json.dumps(scores), overall, note, time.time()),
            )
            _audit(conn, user.id, item_id, "adjudicate", {"scores": scores, "note": note})

    def adjudications(self, conn: sqlite3.Connection) -> dict[int, dict[str, Any]]:
        """item id -> {scores, overall, note, by, at}."""
        rows = conn.execute(
            "SELECT a.item_id, a.scores_json, a.overall, a.note, u.name, a.created_at "
            "FROM adjudications a JOIN users u ON u.id = a.user_id"
        ).fetchall()
        return {
            r[0]: {"scores": json.loads(r[1]), "overall": r[2], "note": r[3], "by": r[4],
                   "at": r[5]}
            for r in rows
        }  # fmt: skip

    def record_judge(
        self, conn: sqlite3.Connection, judge: User, item_id: int, scores: dict[str, int], raw: Any
    ) -> bool:
        """Store an AI judgement (canonical orientation); False if this judge already did it."""
        with _tx(conn):
            cur = conn.execute(
                "INSERT OR IGNORE INTO judgements (user_id, item_id, submission_id, swapped, "
                "scores_json, overall, answers_json, created_at) VALUES (?,?,?,0,?,?,?,?)",
                (
                    judge.id, item_id, f"judge-{item_id}", json.dumps(scores),
                    float(sum(scores.values())), json.dumps(raw), time.time(),
                ),
            )  # fmt: skip
        return cur.rowcount == 1

    def stats_version(self, conn: sqlite3.Connection) -> tuple:
        """Changes whenever anything the dashboard statistics read changes."""
        return tuple(conn.execute(
            "SELECT (SELECT COUNT(*) FROM judgements), (SELECT MAX(id) FROM judgements), "
            "(SELECT COUNT(*) FROM assignments WHERE status='skipped'), "
            "(SELECT COUNT(*) FROM items WHERE batch_id IS NOT NULL), "
            "(SELECT SUM(revisions) FROM judgements), (SELECT MAX(created_at) FROM adjudications), "
            "(SELECT COUNT(*) FROM adjudications), "
            "(SELECT group_concat(id || role || annotates, ',') FROM users)"
        ).fetchone())  # fmt: skip

    def judgements(
        self, conn: sqlite3.Connection, item_ids: list[int] | None = None
    ) -> list[Judgement]:
        sql = (
            "SELECT j.id, j.user_id, u.name, CASE WHEN u.simulated = 1 THEN 'simulated' "
            "WHEN u.role = 'admin' AND u.annotates = 1 THEN 'annotator' ELSE u.role END, "
            "j.item_id, j.scores_json, j.overall, j.server_seconds, j.client_seconds, "
            "j.created_at, j.comment FROM judgements j JOIN users u ON u.id = j.user_id"
        )
        rows = conn.execute(sql + " ORDER BY j.id").fetchall()
        keep = set(item_ids) if item_ids is not None else None
        return [
            Judgement(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7], r[8], r[9], r[10])
            for r in rows
            if keep is None or r[4] in keep
        ]


# Writers of one process queue on this lock instead of polling SQLite's busy handler, whose
# sleep-and-retry backoff starves some writers for seconds when 50 annotators submit at once.
# Other processes (the CLI next to a running server) still wait through busy_timeout.
_WRITE_LOCK = threading.Lock()


@contextlib.contextmanager
def _tx(conn: sqlite3.Connection, durable: bool = True) -> Iterator[None]:
    """One write transaction; nested use joins the outer one.

    ``durable=True`` commits with ``synchronous=FULL`` (the WAL is fsynced before COMMIT
    returns: judgements, users, imports). ``durable=False`` uses NORMAL, which survives a killed
    process but not a power cut; it is used for claims, drafts and sessions, whose loss costs
    nothing (the item is served again), and it halves the fsyncs on the hot path.
    """
    if conn.in_transaction:
        yield
        return
    with _WRITE_LOCK:
        conn.execute(f"PRAGMA synchronous={'FULL' if durable else 'NORMAL'}")
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")


# a per-user scramble of item ids in SQL: (h | s) - (h & s) is h XOR s
_SHUFFLE = (
    "((((i.id * 48271) % 2147483647) | ?) - (((i.id * 48271) % 2147483647) & ?)) "
    "* 69621 % 2147483647"
)


def _salt(user_id: int) -> int:
    return int.from_bytes(hashlib.sha256(f"order-{user_id}".encode()).digest()[:4]) >> 1


def _audit(conn: sqlite3.Connection, user_id: int, item_id: int, action: str, detail) -> None:
    conn.execute(
        "INSERT INTO audit (user_id, item_id, action, detail_json, at) VALUES (?,?,?,?,?)",
        (user_id, item_id, action, json.dumps(detail) if detail is not None else None, time.time()),
    )


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a project made by an older version to ``SCHEMA_VERSION`` (new tables, columns)."""
    got = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    if got and got[0] == SCHEMA_VERSION:
        return
    with _tx(conn):
        for stmt in SCHEMA.split(";"):
            if stmt.strip():
                conn.execute(stmt)
        for table, col, decl in ADDED_COLUMNS:
            have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
            if col not in have:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {col} {decl}")
                if (table, col) == ("users", "annotates"):
                    # admins' judgements used to count as human; now only when they annotate
                    conn.execute("UPDATE users SET annotates=0 WHERE role='admin'")
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (SCHEMA_VERSION,))


def _check_role(role: str) -> None:
    if role not in ("annotator", "admin"):
        raise StoreError(f"role must be annotator or admin, got {role!r}")


def _check_name(name: str) -> None:
    import re

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}", name or ""):
        raise StoreError(
            f"user name {name!r} must be 1-64 letters, digits or _.@- (starting alphanumeric)"
        )
