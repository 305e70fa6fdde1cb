"""An append-only JSONL store of finished work items, safe against ``kill -9``.

    cache = JsonlCache("runs/gen/cache.jsonl")
    if key not in cache:
        cache.append(key, {"status": "ok", ...})     # one write + fsync per item

Each record is one line written with a single ``write`` and ``fsync``. A line torn by a crash
(the only possible damage) is dropped and truncated away when the cache is reopened, so a re-run
neither loses finished items nor repeats them. A record appended with ``replace=True`` supersedes
the key's earlier one (both lines stay in the file; the last one counts when it is reopened).
"""

from __future__ import annotations

import json
import os
from pathlib import Path


class JsonlCache:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.records: dict[str, dict] = {}
        self.torn_lines = 0
        self._load()

    def _load(self) -> None:
        if not self.path.exists():
            return
        good_bytes = 0
        with open(self.path, "rb") as fh:
            for raw in fh:
                try:
                    if not raw.endswith(b"\n"):
                        raise ValueError("torn line")
                    rec = json.loads(raw)
                    key = rec["key"]
                except (ValueError, KeyError, TypeError):
                    self.torn_lines += 1
                    break  # only the tail can be torn: drop it and anything after
                self.records[key] = rec  # a later record of a key supersedes the earlier
                good_bytes += len(raw)
        if self.torn_lines:
            with open(self.path, "r+b") as fh:
                fh.truncate(good_bytes)

    def __contains__(self, key: str) -> bool:
        return key in self.records

    def __len__(self) -> int:
        return len(self.records)

    def get(self, key: str) -> dict | None:
        return self.records.get(key)

    def append(self, key: str, record: dict, replace: bool = False) -> None:
        """Add ``key``'s record; a key that has one keeps it unless ``replace``."""
        if key in self.records and not replace:
            return
        rec = {"key": key, **record}
        line = (json.dumps(rec, ensure_ascii=False) + "\n").encode("utf-8")
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.records[key] = rec


def write_jsonl_atomic(rows, path: str | Path) -> int:
    """Write rows to ``path`` through a temporary file and a rename (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    return n


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a malformed line raises ``ValueError`` naming file and row."""
    out = []
    with open(path, encoding="utf-8") as fh:
        for row, line in enumerate(fh, start=1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path} row {row}: malformed JSON ({e.msg})") from None
    return out
