"""Load test of the annotation server: N concurrent annotators on loopback.

    python benchmarks/annotate_load.py --annotators 50 --items-per-annotator 20 --max-seconds 120

Builds a throw-away project (sampling rows with 4 completions per prompt, overlap 0.2), starts
``alignforge annotate serve`` in a subprocess on a free port, and lets every annotator loop
"GET /api/next -> POST /api/submit" until it has judged ``--items-per-annotator`` items, its
queue is empty, or ``--max-seconds`` have passed; ``--think-ms`` pauses after each submit
(0 = closed loop, a stress test: real annotators spend tens of seconds per item). Prints p50 / p99 latency per endpoint, the
throughput and a check that every acknowledged judgement is in the database exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignforge.annotate.config import CONFIG_NAME, AnnotateConfig  # noqa: E402
from alignforge.annotate.importer import read_items  # noqa: E402
from alignforge.annotate.store import Store  # noqa: E402
from alignforge.config import save_config  # noqa: E402

DOC = ("Acme Corp hired Jane Doe as chief executive in Paris. Acme later bought Beta Ltd, "
       "a supplier based in Lyon, from Globex for an undisclosed sum. ") * 3  # fmt: skip


def completion(n: int) -> str:
    names = ["Acme Corp", "Jane Doe", "Paris", "Beta Ltd", "Lyon", "Globex"][: 2 + n]
    return json.dumps({
        "entities": [{"name": x, "type": "ORG", "description": f"{x} in the document"} for x in names],
        "relations": [{"source": names[0], "target": x, "type": "related_to"} for x in names[1:]],
        "summary": DOC[:120],
    })  # fmt: skip


def build_project(root: Path, n_annotators: int, n_prompts: int) -> tuple[Store, list[str]]:
    store = Store.create(root)
    save_config(AnnotateConfig(), root / CONFIG_NAME)
    tokens = [store.add_user(f"ann{i:03d}") for i in range(n_annotators)]
    rows = [
        {"prompt_id": f"p{p}", "doc_id": f"d{p}", "split": "train",
         "prompt": [{"role": "user", "content": DOC}], "policy": {"model": "m", "fingerprint": "f"},
         "completions": [{"completion_id": f"c{c}", "text": completion(c)} for c in range(4)],
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


def annotator(url, token, n_items, deadline, lat, acks, think_s=0.0):
    hdr = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=url, headers=hdr, timeout=60) as c:
        for k in range(n_items):
            if time.time() > deadline:
                return
            t0 = time.perf_counter()
            item = c.get("/api/next").json()["item"]
            lat["next"].append(time.perf_counter() - t0)
            if item is None:
                return
            body = {"item_id": item["item_id"], "submission_id": f"{token[:8]}-{k:06d}",
                    "answers": {"entities": "1", "relations": "3", "summary": "2"},
                    "client_active_ms": 1000}  # fmt: skip
            t0 = time.perf_counter()
            r = c.post("/api/submit", json=body)
            lat["submit"].append(time.perf_counter() - t0)
            r.raise_for_status()
            acks.append(r.json()["judgement_id"])
            time.sleep(think_s)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--annotators", type=int, default=50)
    ap.add_argument("--items-per-annotator", type=int, default=20)
    ap.add_argument("--max-seconds", type=float, default=120.0)
    ap.add_argument("--think-ms", type=float, default=0.0, help="pause after each submit")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        n_prompts = max(4, a.annotators * a.items_per_annotator // 6 + 1)
        store, tokens = build_project(Path(tmp) / "proj", a.annotators, n_prompts)
        proc, url = start_server(store.dir)
        lat: dict[str, list[float]] = {"next": [], "submit": []}
        acks: list[int] = []
        lock = threading.Lock()
        t0 = time.time()
        try:
            with ThreadPoolExecutor(a.annotators) as pool:
                futs = [pool.submit(annotator, url, t, a.items_per_annotator, t0 + a.max_seconds,
                                    lat, acks, a.think_ms / 1000) for t in tokens]  # fmt: skip
                for f in futs:
                    f.result()
        finally:
            wall = time.time() - t0
            proc.terminate()
            proc.wait(10)
        with lock, store.connect() as conn:
            stored = [r[0] for r in conn.execute("SELECT id FROM judgements")]
    ok = sorted(acks) == sorted(stored) and len(set(stored)) == len(stored)
    out = {
        "annotators": a.annotators,
        "think_ms": a.think_ms,
        "submits": len(lat["submit"]),
        "wall_s": round(wall, 2),
        "submits_per_s": round(len(lat["submit"]) / wall, 1),
        **{f"{k}_p50_ms": round(1000 * float(np.percentile(v, 50)), 1) for k, v in lat.items()},
        **{f"{k}_p99_ms": round(1000 * float(np.percentile(v, 99)), 1) for k, v in lat.items()},
        "acknowledged_equals_stored": ok,
        "cpus": os.cpu_count(),
    }
    print(json.dumps(out, indent=2))
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    if not ok:
        sys.exit("acknowledged judgements and stored judgements differ")


if __name__ == "__main__":
    main()
