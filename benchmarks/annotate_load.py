"""Load test of the annotation server: N concurrent annotators on loopback.

    python benchmarks/annotate_load.py --annotators 50 --items-per-annotator 20 --think-ms 2000

Builds a throw-away project (sampling rows with 4 completions per prompt, overlap 0.2), starts
``alignforge annotate serve`` in a subprocess on a free port, and lets every annotator loop
the way the task page does: ``GET /api/next``, one ``POST /api/draft`` per answered question
(the page saves a draft after each key press), ``POST /api/submit``, then about ``--think-ms``
of thinking (uniform in 0.5-1.5 times it; each annotator also starts at a random point of one
such pause). 0 is a closed loop, a stress test: real annotators spend tens of seconds per item.
Answers vary: each item has a true side, and an annotator gives it on each aspect with
probability ``--p-right``, else a random answer. The sides are shown at random, so the client
maps its answer to the side it was shown.

Prints p50 / p95 / p99 latency per endpoint, the throughput, a check that every acknowledged
judgement is in the database exactly once, and the agreement (Krippendorff's alpha) computed
from the database after the run, which must match what the answer model implies: a judgement
stored with its sides mixed up would pull it towards 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignforge.annotate.config import CONFIG_NAME, AnnotateConfig  # noqa: E402
from alignforge.annotate.dashboard import AlertRules, project_stats  # noqa: E402
from alignforge.annotate.importer import read_items  # noqa: E402
from alignforge.annotate.store import Store  # noqa: E402
from alignforge.config import save_config  # noqa: E402

DOC = ("Acme Corp hired Jane Doe as chief executive in Paris. Acme later bought Beta Ltd, "
       "a supplier based in Lyon, from Globex for an undisclosed sum. ") * 3  # fmt: skip
ASPECTS = ["entities", "relations", "summary"]


def completion(n: int) -> str:
    names = ["Acme Corp", "Jane Doe", "Paris", "Beta Ltd", "Lyon", "Globex"][: 2 + n]
    return json.dumps({
        "entities": [{"name": x, "type": "ORG", "description": f"{x} in the document"} for x in names],
        "relations": [{"source": names[0], "target": x, "type": "related_to"} for x in names[1:]],
        "summary": DOC[:120],
    })  # fmt: skip


def build_project(root: Path, n_annotators: int, n_prompts: int) -> tuple[Store, list[str]]:
    """The project; the tokens of the annotators, then the admin's last."""
    store = Store.create(root)
    save_config(AnnotateConfig(), root / CONFIG_NAME)
    tokens = [store.add_user(f"ann{i:03d}") for i in range(n_annotators)]
    tokens.append(store.add_user("lead", role="admin"))
    rows = [
        {"prompt_id": f"p{p}", "doc_id": f"d{p}", "split": "train",
         "prompt": [{"role": "user", "content": DOC + f" (document {p})"}],
         "policy": {"model": "m", "fingerprint": "f"},
         "completions": [{"completion_id": f"c{c}", "text": completion(c),
                          "finish_reason": "stop"} for c in range(4)],
         "created_at": "2025-01-01T00:00:00Z"}
        for p in range(n_prompts)
    ]  # fmt: skip
    path = root / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    items, _ = read_items(path)
    store.insert_items(items)
    store.release("load", None, overlap=0.2)
    return store, tokens


def start_server(project: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "alignforge.annotate.cli", "serve", str(project),
                             "--port", str(port)], cwd=ROOT, env=env)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/login", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError("server did not start")


def truth(item_id: int) -> int:
    """The item's true side: +1 (its ``a``) or -1, the same for every annotator."""
    return 1 if random.Random(item_id).random() < 0.5 else -1


def answer_keys(item: dict, a_texts: dict[int, str], rng: random.Random, p_right: float):
    """Keys for the sides as shown: '1' = left better, '2' = tie, '3' = right better."""
    a_left = item["a"] == a_texts[item["item_id"]]
    side = truth(item["item_id"]) * (1 if a_left else -1)  # +1: the left one is better
    out = {}
    for k in ASPECTS:
        out[k] = ("1" if side > 0 else "3") if rng.random() < p_right else rng.choice("123")
    return out


def annotator(url, token, n_items, deadline, lat, acks, a_texts, think_s, p_right, seed):
    rng = random.Random(seed)
    hdr = {"Authorization": f"Bearer {token}"}
    time.sleep(think_s * rng.random())  # annotators do not all press a key in the same ms
    with httpx.Client(base_url=url, headers=hdr, timeout=60) as c:
        c.get("/api/me").raise_for_status()  # the connection a browser has from the page load
        for k in range(n_items):
            if time.time() > deadline:
                return
            t0 = time.perf_counter()
            item = c.get("/api/next").json()["item"]
            lat["next"].append(time.perf_counter() - t0)
            if item is None:
                return
            answers = answer_keys(item, a_texts, rng, p_right)
            for n in range(1, len(ASPECTS) + 1):  # a draft after each answered question
                part = {a: answers[a] for a in ASPECTS[:n]}
                t0 = time.perf_counter()
                r = c.post("/api/draft", json={"item_id": item["item_id"], "answers": part})
                lat["draft"].append(time.perf_counter() - t0)
                r.raise_for_status()
            body = {"item_id": item["item_id"], "submission_id": f"{token[:8]}-{k:06d}",
                    "answers": answers, "client_active_ms": 1000}  # fmt: skip
            t0 = time.perf_counter()
            r = c.post("/api/submit", json=body)
            lat["submit"].append(time.perf_counter() - t0)
            r.raise_for_status()
            acks.append(r.json()["judgement_id"])
            time.sleep(think_s * rng.uniform(0.5, 1.5))


def expected_alpha(p_right: float, n_boot_raters: int = 200, seed: int = 0) -> float:
    """Alpha the answer model implies on the A / tie / B scale, by simulation."""
    from alignforge.annotate.agreement import krippendorff_alpha

    rng = random.Random(seed)
    matrix = [[(t if rng.random() < p_right else rng.choice([-1, 0, 1])) for t in
               (truth(i) for i in range(n_boot_raters * 5))] for _ in range(4)]  # fmt: skip
    return krippendorff_alpha(matrix)


def dashboard_seconds(url: str, admin_token: str) -> tuple[float, float]:
    """Wall seconds to load the dashboard page and its three plots: once after the data
    changed (the statistics are computed), then again (they come from the cache)."""
    hdr = {"Authorization": f"Bearer {admin_token}"}
    paths = ["/admin", "/admin/plot/rate.png", "/admin/plot/time.png", "/admin/plot/agreement.png"]
    times = []
    with httpx.Client(base_url=url, headers=hdr, timeout=120) as c:
        for _ in range(2):
            t0 = time.perf_counter()
            for p in paths:
                c.get(p).raise_for_status()
            times.append(round(time.perf_counter() - t0, 2))
    return times[0], times[1]


def pct(v: list[float], q: float) -> float:
    return round(1000 * float(np.percentile(v, q)), 1) if v else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--annotators", type=int, default=50)
    ap.add_argument("--items-per-annotator", type=int, default=20)
    ap.add_argument("--max-seconds", type=float, default=180.0)
    ap.add_argument("--think-ms", type=float, default=0.0, help="mean pause after each submit")
    ap.add_argument("--p-right", type=float, default=0.8, help="chance of the true side")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        n_prompts = max(4, a.annotators * a.items_per_annotator // 6 + 1)
        store, tokens = build_project(Path(tmp) / "proj", a.annotators, n_prompts)
        with store.connect() as conn:
            a_texts = dict(conn.execute("SELECT id, a_text FROM items").fetchall())
        proc, url = start_server(store.dir)
        lat: dict[str, list[float]] = {"next": [], "draft": [], "submit": []}
        acks: list[int] = []
        t0 = time.time()
        try:
            with ThreadPoolExecutor(a.annotators) as pool:
                futs = [pool.submit(annotator, url, t, a.items_per_annotator, t0 + a.max_seconds,
                                    lat, acks, a_texts, a.think_ms / 1000, a.p_right, k)
                        for k, t in enumerate(tokens[:-1])]  # fmt: skip
                for f in futs:
                    f.result()
            wall = time.time() - t0
            dash_first, dash_cached = dashboard_seconds(url, tokens[-1])
        finally:
            proc.terminate()
            proc.wait(10)
        with store.connect() as conn:
            stored = [r[0] for r in conn.execute("SELECT id FROM judgements")]
            stats = project_stats(store, conn, ASPECTS, "nominal", AlertRules(0.4, 0.1, 20),
                                  n_boot=200)  # fmt: skip
    ok = sorted(acks) == sorted(stored) and len(set(stored)) == len(stored)
    main_w = next(w for w in stats.windows if w.kind == "main")
    rows = [r for r in main_w.rows if r.ties and r.aspect in ASPECTS]
    alphas = {r.aspect: [round(x, 3) for x in (r.alpha, r.alpha_lo, r.alpha_hi)] for r in rows}
    want = expected_alpha(a.p_right)
    # the implied alpha must lie in each aspect's 95% interval (a little slack for the
    # percentile bootstrap on few items); mixed-up sides would put it near 0
    agree_ok = all(lo - 0.05 <= want <= hi + 0.05 for _, lo, hi in alphas.values())
    out = {
        "annotators": a.annotators,
        "think_ms": a.think_ms,
        "submits": len(lat["submit"]),
        "drafts": len(lat["draft"]),
        "wall_s": round(wall, 2),
        "submits_per_s": round(len(lat["submit"]) / wall, 1),
        "requests_per_s": round(sum(len(v) for v in lat.values()) / wall, 1),
        **{f"{k}_p{q}_ms": pct(v, q) for k, v in lat.items() for q in (50, 95, 99)},
        "acknowledged_equals_stored": ok,
        "dashboard_first_load_s": dash_first,
        "dashboard_cached_load_s": dash_cached,
        "shared_items_judged_by_2plus": main_w.n_items,
        "alpha_per_aspect_with_95ci": alphas,
        "alpha_expected": round(want, 3),
        "agreement_as_expected": agree_ok,
        "cpus": os.cpu_count(),
        "load_avg_1min": round(os.getloadavg()[0], 1),
    }
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    if not ok:
        sys.exit("acknowledged judgements and stored judgements differ")
    if not agree_ok:
        sys.exit(f"agreement {alphas} does not cover the {want:.2f} the answers imply")


if __name__ == "__main__":
    main()
