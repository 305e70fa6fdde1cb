"""Test helpers: sample files in the preference-sampling format, projects, a live server."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from alignforge.annotate.config import CONFIG_NAME, AnnotateConfig
from alignforge.annotate.store import Store
from alignforge.config import save_config

ROOT = Path(__file__).resolve().parents[2]

DOCS = [
    "Acme Corp hired Jane Doe as chief executive in Paris. Acme later bought Beta Ltd.",
    "Globex signed a supply deal with Initech. Bill Lumbergh runs Initech from Austin.",
    "The European Central Bank raised rates; Christine Lagarde spoke in Frankfurt.",
    "Umbrella Group sued Wayne Enterprises over a patent filed in Gotham.",
    "Stark Industries and Oscorp formed a joint venture led by Pepper Potts.",
    "Hooli moved its headquarters to Palo Alto, said Gavin Belson.",
]


def extraction(entities: list[tuple[str, str]], relations=(), summary: str = "") -> str:
    return json.dumps(
        {
            "entities": [{"name": n, "type": t, "description": f"{n} ({t})"} for n, t in entities],
            "relations": [
                {"source": s, "target": o, "type": r, "description": f"{s} {r} {o}"}
                for s, r, o in relations
            ],
            "summary": summary,
        }
    )


def _caps(doc: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r"\b[A-Z][a-z]+(?: [A-Z][a-z]+)*", doc)))


def sample_rows(n_prompts: int = 6, k: int = 3, seed: int = 0) -> list[dict]:
    """Rows exactly as the preference-sampling step writes them (k completions per prompt)."""
    rng = random.Random(seed)
    splits = ["train", "train", "train", "validation", "test", "train"]
    rows = []
    for p in range(n_prompts):
        doc = DOCS[p % len(DOCS)]
        names = _caps(doc)
        comps = []
        for c in range(k):
            ents = [(n, "ORG") for n in names[: max(1, len(names) - c)]]
            rels = [(ents[0][0], "related_to", ents[-1][0])] if len(ents) > 1 else []
            text = extraction(ents, rels, summary=doc[:40]) if c < k - 1 else f"Entities: {names}"
            comps.append(
                {
                    "completion_id": f"c{c}",
                    "text": text,
                    "greedy": c == 0,
                    "temperature": 0.0 if c == 0 else 1.0,
                    "logp": -rng.uniform(5, 30),
                    "token_logps": [-0.5, -0.25],
                    "n_tokens": 2,
                    "finish_reason": "stop",
                }
            )
        rows.append(
            {
                "prompt_id": f"p{p}",
                "doc_id": f"d{p}",
                "split": splits[p % len(splits)],
                "prompt": [
                    {"role": "system", "content": "Extract entities, relations and a summary."},
                    {"role": "user", "content": doc},
                ],
                "policy": {"model": "tiny-sft", "fingerprint": "abc123"},
                "completions": comps,
                "created_at": "2025-01-01T00:00:00Z",
            }
        )
    return rows


CHATTY = "Sure! Here is the extraction:\n```json\n{}\n```\nLet me know if you need more."


def flagged_rows() -> list[dict]:
    """One prompt, two completions that each carry format problems: a chatty answer holding two
    JSON objects, and one cut off at the length limit."""
    row = sample_rows(1, 2)[0]
    full = extraction([("Acme Corp", "ORG"), ("Jane Doe", "PER"), ("Paris", "LOC")])
    second = json.dumps({"entities": [{"name": "Beta Ltd", "type": "ORG"}]})
    row["completions"][0].update(text=CHATTY.format(full + "\n" + second))
    row["completions"][1].update(text=full[: full.index("Paris") + 2], finish_reason="length")
    return [row]


def long_rows(n_prompts: int = 2) -> list[dict]:
    """Prompts with a long document and long answers (40 entities each): the layout test."""
    rows = sample_rows(n_prompts, 2)
    names = [f"Company {chr(65 + k % 26)}{k}" for k in range(40)]
    doc = " ".join(f"{n} signed a contract with {names[(k + 1) % 40]} in Paris." for k, n in
                   enumerate(names)) * 3  # fmt: skip
    for row in rows:
        row["prompt"][1]["content"] = doc
        row["completions"][0]["text"] = extraction([(n, "ORG") for n in names], summary=doc[:200])
        row["completions"][1]["text"] = extraction([(n, "ORG") for n in names[::-1]])
    return rows


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def make_project(
    root: Path,
    annotators: list[str] = ("alice", "bob"),
    n_prompts: int = 6,
    k: int = 3,
    trial: int = 0,
    overlap: float = 0.5,
    cfg: AnnotateConfig | None = None,
    rows: list[dict] | None = None,
) -> tuple[Store, dict[str, str]]:
    """A released project: ``trial`` trial items, the rest in one batch; tokens by user name.

    ``rows`` replaces the generated sampling rows."""
    from alignforge.annotate.importer import read_items

    store = Store.create(root)
    save_config(cfg or AnnotateConfig(), root / CONFIG_NAME)
    tokens = {"admin": store.add_user("admin", role="admin")}
    for name in annotators:
        tokens[name] = store.add_user(name)
    rows = rows if rows is not None else sample_rows(n_prompts, k)
    items, _ = read_items(write_jsonl(root / "samples.jsonl", rows))
    store.insert_items(items)
    if trial:
        store.release("trial", trial, trial=True)
    store.release("b1", None, overlap=overlap)
    return store, tokens


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """``alignforge annotate serve`` in a subprocess on a free loopback port."""

    def __init__(self, project_dir: Path):
        self.project_dir = project_dir
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 30.0) -> LiveServer:
        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        cmd = [sys.executable, "-m", "alignforge.annotate.cli", "serve", str(self.project_dir),
               "--port", str(port)]  # fmt: skip
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stderr=subprocess.PIPE)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(self.url + "/login", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


CSRF_FIELD = re.compile(r'name="csrf" value="([^"]+)"')


def login(client, token: str) -> str:
    """Log in through the form (cookie session); returns the session's CSRF token."""
    r = client.get("/login")
    nonce = CSRF_FIELD.search(r.text).group(1)
    r = client.post("/login", data={"csrf": nonce, "token": token}, follow_redirects=False)
    assert r.status_code == 303, r.text
    assert r.headers["location"] == "/", r.headers["location"]
    r = client.get("/api/me")
    assert r.status_code == 200
    page = client.get("/task")
    m = re.search(r'data-csrf="([^"]+)"', page.text) or CSRF_FIELD.search(page.text)
    return m.group(1)


def answers_for(store: Store, choice: str = "1") -> dict[str, str]:
    from alignforge.annotate.config import load_project_config

    return {a.key: choice for a in load_project_config(store.dir).aspects}


def key_for(store: Store, shown: dict, want: str) -> str:
    """Keyboard key that says ``want`` ('a', 'b' or 'tie' in the item's own a/b terms) for an
    item as shown by ``GET /api/next`` (sides are random per annotator)."""
    if want == "tie":
        return "2"
    with store.connect() as conn:
        a_text = store.item(conn, shown["item_id"])["a_text"]
    a_on_left = shown["a"] == a_text
    return "1" if (want == "a") == a_on_left else "3"
