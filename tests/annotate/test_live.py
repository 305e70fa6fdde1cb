"""A real uvicorn server in a subprocess: many annotators at once, and SIGKILL mid-session."""

from __future__ import annotations

import random
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx

from tests.annotate.helpers import answers_for, login, make_project

N_ANNOTATORS = 20


def _annotate(url: str, token: str, store, name: str, acked: list, max_items: int | None = None):
    """Log in with the form, then judge until the queue is empty. Every submit is sent twice
    with the same submission id (a client retry) and must be acknowledged both times."""
    rng = random.Random(name)
    with httpx.Client(base_url=url, timeout=30.0) as c:
        csrf = login(c, token)
        done = 0
        while max_items is None or done < max_items:
            item = c.get("/api/next").json()["item"]
            if item is None:
                break
            body = {"item_id": item["item_id"], "submission_id": f"{name}-{item['item_id']:06d}",
                    "answers": answers_for(store, rng.choice("123"))}  # fmt: skip
            r1 = c.post("/api/submit", json=body, headers={"X-CSRF-Token": csrf})
            r2 = c.post("/api/submit", json=body, headers={"X-CSRF-Token": csrf})
            assert r1.status_code == 200 and r2.status_code == 200, (r1.text, r2.text)
            assert r2.json()["duplicate"] and r1.json()["judgement_id"] == r2.json()["judgement_id"]
            acked.append((name, item["item_id"], r1.json()["judgement_id"]))
            done += 1


def test_twenty_annotators_at_once_lose_and_duplicate_nothing(tmp_path, live_server):
    names = [f"ann{i:02d}" for i in range(N_ANNOTATORS)]
    store, tokens = make_project(tmp_path / "p", annotators=names, n_prompts=12, k=4, overlap=0.25)
    srv = live_server(store.dir)
    acked: list = []
    lock = threading.Lock()

    def run(name):
        local: list = []
        _annotate(srv.url, tokens[name], store, name, local)
        with lock:
            acked.extend(local)

    with ThreadPoolExecutor(N_ANNOTATORS) as pool:
        list(pool.map(run, names))
    with store.connect() as conn:
        rows = conn.execute("SELECT u.name, j.item_id, j.id FROM judgements j JOIN users u "
                            "ON u.id = j.user_id").fetchall()  # fmt: skip
        shared = {r[0] for r in conn.execute("SELECT id FROM items WHERE shared=1")}
        n_items = conn.execute("SELECT COUNT(*) FROM items").fetchone()[0]
    stored = sorted(tuple(r) for r in rows)
    assert sorted(acked) == stored  # every ack is in the DB, nothing extra
    assert len(set((u, i) for u, i, _ in stored)) == len(stored)
    per_item: dict[int, int] = {}
    for _, i, _ in stored:
        per_item[i] = per_item.get(i, 0) + 1
    assert n_items == 12 * 6 and len(per_item) == n_items  # every item judged
    for i, n in per_item.items():
        assert n == (N_ANNOTATORS if i in shared else 1), (i, n)


def test_sigkill_mid_session_loses_nothing_acknowledged(tmp_path, live_server):
    store, tokens = make_project(tmp_path / "p", annotators=["alice", "bob"], n_prompts=6, k=3)
    srv = live_server(store.dir)
    # an annotator has an item open (served, with a draft) when the server dies
    with httpx.Client(base_url=srv.url, timeout=10) as c:
        csrf = login(c, tokens["alice"])
        open_item = c.get("/api/next").json()["item"]["item_id"]
        r = c.post("/api/draft", json={"item_id": open_item, "answers": {"entities": "3"}},
                   headers={"X-CSRF-Token": csrf})  # fmt: skip
        assert r.status_code == 200
    # bob submits as fast as he can; the server is SIGKILLed while his requests are in flight
    acked: list = []
    four = threading.Event()

    def bob():
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            csrf = login(c, tokens["bob"])
            try:
                while (item := c.get("/api/next").json()["item"]) is not None:
                    body = {"item_id": item["item_id"], "submission_id": f"bob-{item['item_id']:06d}",
                            "answers": answers_for(store, "3")}  # fmt: skip
                    r = c.post("/api/submit", json=body, headers={"X-CSRF-Token": csrf})
                    if r.status_code == 200 and r.json()["saved"]:
                        acked.append(("bob", item["item_id"], r.json()["judgement_id"]))
                    if len(acked) >= 4:
                        four.set()
            except httpx.HTTPError:
                pass  # the server died under us
            four.set()

    t = threading.Thread(target=bob)
    t.start()
    assert four.wait(30)
    srv.kill()
    t.join(30)
    assert srv.proc.returncode == -9
    assert len(acked) >= 4
    srv2 = live_server(store.dir)
    with store.connect() as conn:
        stored = {(j.user, j.item_id, j.id) for j in store.judgements(conn)}
    # every acknowledged judgement survived; at most one more was committed but not acknowledged
    assert set(acked) <= stored and len(stored - set(acked)) <= 1
    with httpx.Client(base_url=srv2.url, timeout=10) as c:
        csrf = login(c, tokens["alice"])
        item = c.get("/api/next").json()["item"]
        assert item["item_id"] == open_item and item["draft"] == {"entities": "3"}
        # a retry of an acknowledged submission after the restart is still a duplicate
    with httpx.Client(base_url=srv2.url, timeout=10) as c:
        csrf = login(c, tokens["bob"])
        _, item_id, jid = acked[-1]
        body = {"item_id": item_id, "submission_id": f"bob-{item_id:06d}",
                "answers": answers_for(store, "3")}  # fmt: skip
        r = c.post("/api/submit", json=body, headers={"X-CSRF-Token": csrf})
        assert r.status_code == 200 and r.json()["duplicate"] and r.json()["judgement_id"] == jid
    more: list = []
    _annotate(srv2.url, tokens["alice"], store, "alice", more)
    with store.connect() as conn:
        assert len(store.judgements(conn)) == len(stored) + len(more)
