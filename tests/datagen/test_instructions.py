import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from alignforge.datagen.cache import JsonlCache, read_jsonl
from alignforge.datagen.chunking import Chunk, chunk_documents, read_documents, write_chunks
from alignforge.datagen.instructions import (
    ParseError,
    generate_instructions,
    instruction_set_schema,
    parse_pairs,
    prompt_version,
)
from alignforge.rollout import OpenAIChatClient, TransformersEngine
from alignforge.rollout.server import create_app, start_server


def test_parse_pairs_accepts_and_repairs():
    clean = '{"pairs": [{"instruction": "What is X?", "answer": "X is Y."}]}'
    assert parse_pairs(clean, 3) == ([parse_pairs(clean, 3)[0][0]], False)
    fenced = 'Sure! Here you go:\n```json\n{"pairs": [{"question": "Q1", "response": "A1"},]}\n```'
    pairs, repaired = parse_pairs(fenced, 3)
    assert repaired and [(p.instruction, p.answer) for p in pairs] == [("Q1", "A1")]
    truncated = (
        '{"pairs": [{"instruction": "Q1", "answer": "A1"}, {"instruction": "Q2", "answer": "A'
    )
    pairs, repaired = parse_pairs(truncated, 3)
    assert repaired and [p.instruction for p in pairs] == ["Q1", "Q2"]
    bare_list = '[{"instruction": "Q", "answer": "A"}, {"instruction": "", "answer": "A"}]'
    assert len(parse_pairs(bare_list, 3)[0]) == 1
    with pytest.raises(ParseError, match="no JSON object"):
        parse_pairs("I cannot help with that.", 3)
    with pytest.raises(ParseError, match="0 usable pairs, need 1"):
        parse_pairs('{"pairs": [{"instruction": "", "answer": ""}]}', 3)
    with pytest.raises(ParseError, match="need 2"):
        parse_pairs(clean, 3, min_pairs=2)


def _chunks(n: int) -> list[Chunk]:
    docs, _ = read_documents("examples/data/wikipedia_paragraphs.jsonl")
    return chunk_documents(docs[:n], target_size=600)


def test_end_to_end_through_a_real_model_server(tiny_model, tokenizer, tmp_path):
    engine = TransformersEngine(tiny_model, tokenizer, batch_size=4)
    server = start_server(create_app(engine, model_name="tiny-teacher"))
    try:
        client = OpenAIChatClient(server.base_url, model="tiny-teacher", max_concurrency=2)
        chunks = _chunks(3)[:4]
        kw = dict(n_pairs=2, temperature=1.0, max_tokens=160, max_instruction_chars=30,
                  max_answer_chars=40, progress=False)  # fmt: skip
        report = generate_instructions(chunks, client, tmp_path, **kw)
        assert (
            report.n_chunks == len(chunks)
            and report.n_rejected == 0
            and report.n_generated == len(chunks)
        )
        rows = read_jsonl(tmp_path / "sft.jsonl")
        assert len(rows) == report.n_pairs == 2 * len(chunks) - report.n_duplicates
        for row in rows:
            assert [m["role"] for m in row["messages"]] == ["user", "assistant"]
            assert 0 < len(row["messages"][0]["content"]) <= 30
            chunk = next(c for c in chunks if c.chunk_id == row["chunk_id"])
            assert (row["doc_id"], row["start"], row["end"]) == (
                chunk.doc_id,
                chunk.start,
                chunk.end,
            )
            assert (
                row["teacher_model"] == "tiny-teacher" and row["prompt_version"] == prompt_version()
            )
            assert row["created_at"].startswith("20")
        again = generate_instructions(chunks, client, tmp_path, **kw)
        assert again.n_cached == len(chunks) and again.n_generated == 0
        assert read_jsonl(tmp_path / "sft.jsonl") == rows
    finally:
        server.stop()


def scripted_teacher(delay: float = 0.0):
    """A real HTTP teacher whose reply depends on a tag in the passage."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse

    app = FastAPI()
    calls: Counter = Counter()
    lock = threading.Lock()

    def reply(content: str, finish: str = "stop"):
        return {
            "choices": [
                {"message": {"role": "assistant", "content": content}, "finish_reason": finish}
            ]
        }

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        import asyncio

        body = await request.json()
        passage = body["messages"][-1]["content"].split('"""')[1].strip()
        with lock:
            calls[passage] += 1
            n = calls[passage]
        await asyncio.sleep(delay)
        good = json.dumps({"pairs": [{"instruction": f"Explain: {passage[:40]}", "answer": passage},
                                     {"instruction": "Summarise the text.", "answer": passage[:20]}]})  # fmt: skip
        if "JUNK" in passage:
            return reply("lorem ipsum, no json here")
        if "FENCED" in passage:
            return reply("Here it is:\n```json\n" + good[:-2] + ",]}\n```")
        if "FLAKY" in passage and n == 1:
            return JSONResponse({"error": "overloaded"}, status_code=500)
        if "BADFIRST" in passage and n == 1:
            return reply('{"pairs": [{"instruction": 3}]}')
        if "CUT" in passage:
            return reply(good[:30], "length")
        if "SLOW" in passage:
            await asyncio.sleep(3)
        if "DOWN" in passage:
            return JSONResponse({"error": "upstream gone"}, status_code=503)
        if "KEY" in passage:
            return JSONResponse({"error": "invalid api key"}, status_code=401)
        return reply(good)

    return app, calls


def test_bad_teacher_items_are_repaired_retried_or_rejected_alone(tmp_path):
    tags = ["plain one", "JUNK two", "FENCED three", "FLAKY four", "BADFIRST five", "CUT six",
            "plain seven"]  # fmt: skip
    chunks = [Chunk(f"doc{i}", f"doc{i}:0", 0, len(t), t) for i, t in enumerate(tags)]
    app, calls = scripted_teacher()
    server = start_server(app)
    try:
        client = OpenAIChatClient(
            server.base_url, model="scripted", timeout=0.5, max_retries=1, backoff=0.01
        )
        report = generate_instructions(
            chunks, client, tmp_path, max_attempts=2, batch_size=8, progress=False
        )
    finally:
        server.stop()
    rejects = {r["chunk_id"]: r for r in read_jsonl(tmp_path / "rejects.jsonl")}
    assert set(rejects) == {"doc1:0", "doc5:0"}
    assert "no JSON object" in rejects["doc1:0"]["reason"]
    assert "cut at max_tokens" in rejects["doc5:0"]["reason"]
    assert [e["attempt"] for e in rejects["doc1:0"]["errors"]] == [1, 2]
    rows = read_jsonl(tmp_path / "sft.jsonl")
    assert {r["chunk_id"] for r in rows} == {"doc0:0", "doc2:0", "doc3:0", "doc4:0", "doc6:0"}
    # good items were asked once; the bad ones were retried on their own
    assert calls["plain one"] == 1 and calls["plain seven"] == 1
    assert calls["BADFIRST five"] == 2 and calls["FLAKY four"] == 2 and calls["JUNK two"] == 2
    assert all(r["repaired"] for r in rows if r["chunk_id"] == "doc2:0")
    cache = JsonlCache(tmp_path / "cache.jsonl")
    attempts = {r["chunk_id"]: r.get("attempts") for r in cache.records.values()}
    assert attempts["doc4:0"] == 2 and attempts["doc0:0"] == 1
    # "Summarise the text." repeats for every chunk: kept once
    assert sum(r["messages"][0]["content"] == "Summarise the text." for r in rows) == 1
    assert report.n_duplicates == 4 and report.n_rejected == 2 and report.n_repaired == 1


def test_schema_is_sent_and_bounds_lengths():
    schema = instruction_set_schema(3, 100, 500)
    pairs = schema["properties"]["pairs"]
    assert pairs["minItems"] == pairs["maxItems"] == 3
    assert pairs["items"]["properties"]["answer"]["maxLength"] == 500


def test_torn_cache_line_is_dropped_and_truncated(tmp_path):
    path = tmp_path / "cache.jsonl"
    cache = JsonlCache(path)
    cache.append("a", {"v": 1})
    cache.append("b", {"v": 2})
    with open(path, "ab") as fh:
        fh.write(b'{"key": "c", "v"')  # a write cut by a crash
    reopened = JsonlCache(path)
    assert set(reopened.records) == {"a", "b"} and reopened.torn_lines == 1
    reopened.append("c", {"v": 3})
    assert [json.loads(x)["key"] for x in path.read_text().splitlines()] == ["a", "b", "c"]


def test_kill_and_resume_keeps_every_item_exactly_once(tmp_path):
    app, calls = scripted_teacher(delay=0.05)
    server = start_server(app)
    try:
        chunks = _chunks(40)
        write_chunks(chunks, tmp_path / "chunks.jsonl")
        out = tmp_path / "run"
        cfg = {"input": str(tmp_path / "chunks.jsonl"), "input_is_chunks": True, "output_dir": str(out),
               "base_url": server.base_url, "model": "scripted", "max_concurrency": 1, "batch_size": 2}  # fmt: skip
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
        cmd = [
            sys.executable,
            "-m",
            "alignforge.cli",
            "data",
            "instructions",
            str(tmp_path / "cfg.yaml"),
        ]
        env = {**os.environ, "PYTHONPATH": str(Path.cwd())}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            cache_file = out / "cache.jsonl"
            if cache_file.exists() and len(cache_file.read_bytes().splitlines()) >= 6:
                break
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        done_before = len(JsonlCache(out / "cache.jsonl"))
        assert 6 <= done_before < len(chunks), "the run must be interrupted mid-way"
        assert not (out / "sft.jsonl").exists()
        rerun = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    finally:
        server.stop()
    report = json.loads((out / "report.json").read_text())
    assert report["n_cached"] >= done_before and report["n_chunks"] == len(chunks)
    rows = read_jsonl(out / "sft.jsonl")
    explain = [r["chunk_id"] for r in rows if r["messages"][0]["content"].startswith("Explain")]
    assert sorted(explain) == sorted(c.chunk_id for c in chunks)  # every chunk exactly once
    keys = [json.loads(x)["key"] for x in (out / "cache.jsonl").read_text().splitlines()]
    assert len(keys) == len(set(keys)) == len(chunks)
    # at most the request in flight at the kill was asked twice
    assert sum(v - 1 for v in calls.values()) <= 2


def tagged_chunks(tags):
    return [Chunk(f"doc{i}", f"doc{i}:0", 0, len(t), t) for i, t in enumerate(tags)]


def test_an_unreachable_teacher_stops_the_command_and_caches_nothing(tmp_path, monkeypatch, capsys):
    """A closed port: ``alignforge data instructions`` stops after the client's retries with one
    line naming base_url; nothing is cached as rejected, so a re-run against a live teacher does
    every chunk."""
    from multiproc import free_port

    from alignforge.cli import main

    def alignforge(*args):
        monkeypatch.setattr(sys, "argv", ["alignforge", *args])
        with pytest.raises(SystemExit) as e:
            main()
        return e.value.code, capsys.readouterr().err.strip().splitlines()[-1]  # after the bar

    write_chunks(tagged_chunks(["plain one", "plain two"]), tmp_path / "chunks.jsonl")
    out, base_url = tmp_path / "run", f"http://127.0.0.1:{free_port()}/v1"  # nothing listens
    cfg = {"input": str(tmp_path / "chunks.jsonl"), "input_is_chunks": True, "output_dir": str(out),
           "base_url": base_url, "model": "scripted", "max_retries": 1}  # fmt: skip
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    code, message = alignforge("data", "instructions", str(tmp_path / "cfg.yaml"))
    assert code == 1  # the last line of stderr holds the whole message
    assert message.startswith(f"error: teacher at {base_url} failed")
    assert "no response after 2 attempt(s)" in message
    assert "check that the server is running" in message
    assert len(JsonlCache(out / "cache.jsonl")) == 0 and not (out / "rejects.jsonl").exists()
    app, calls = scripted_teacher()
    server = start_server(app)
    try:
        (tmp_path / "cfg.yaml").write_text(yaml.safe_dump({**cfg, "base_url": server.base_url}))
        code, err = alignforge("data", "instructions", str(tmp_path / "cfg.yaml"))
    finally:
        server.stop()
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["n_generated"] == 2 and report["n_rejected"] == 0


@pytest.mark.parametrize(
    "tag, what, hint, calls_made",
    [
        ("DOWN", "HTTP 503 after 2 attempt(s)", "check that the server is running", 2),
        ("KEY", "HTTP 401 after 1 attempt(s)", "check the API key", 1),
        (
            "SLOW",
            "no response after 2 attempt(s): timed out",
            "check that the server is running",
            2,
        ),
    ],
)
def test_an_endpoint_failure_is_not_a_rejection(tmp_path, tag, what, hint, calls_made):
    """5xx and timeouts after the client's retries, and 401, stop the run; the chunks that came
    back are cached, the one the endpoint failed on is not (and is not retried as an item)."""
    from alignforge.datagen.instructions import TeacherUnavailable

    chunks = tagged_chunks(["plain one", f"{tag} two", "plain three"])
    app, calls = scripted_teacher()
    server = start_server(app)
    try:
        client = OpenAIChatClient(server.base_url, model="scripted", timeout=0.5, max_retries=1,
                                  backoff=0.01)  # fmt: skip
        expected = f"teacher at {re.escape(server.base_url)} failed: .*{re.escape(what)}.*{hint}"
        with pytest.raises(TeacherUnavailable, match=expected):
            generate_instructions(chunks, client, tmp_path, max_attempts=3, progress=False)
    finally:
        server.stop()
    cached = {
        r["chunk_id"]: r["status"] for r in JsonlCache(tmp_path / "cache.jsonl").records.values()
    }
    assert cached == {"doc0:0": "ok", "doc2:0": "ok"}
    assert calls[f"{tag} two"] == calls_made


def test_chunks_cached_as_rejected_for_a_dead_teacher_are_retried(tmp_path):
    """Older versions cached a connection failure as the chunk's rejection; a re-run redoes such
    chunks (the new record supersedes the old line) and keeps real rejections."""
    chunks = tagged_chunks(["plain one", "plain two", "JUNK three"])
    app, calls = scripted_teacher()
    server = start_server(app)
    try:
        client = OpenAIChatClient(server.base_url, model="scripted", max_retries=0)
        first = generate_instructions(chunks, client, tmp_path, max_attempts=1, progress=False)
        assert first.n_rejected == 1  # JUNK: its reply is no JSON
        # rewrite plain two's record as an older version wrote a dead teacher's rejection
        cache_file = tmp_path / "cache.jsonl"
        records = [json.loads(x) for x in cache_file.read_text().splitlines()]
        dead = "request failed: http://127.0.0.1:9/v1/chat/completions: no response after 5 attempt(s): connection failed: ConnectError: [Errno 111] Connection refused"  # noqa: E501
        for r in records:
            if r["chunk_id"] == "doc1:0":
                r.update(status="rejected", reason=dead, errors=[])
                r.pop("pairs")
        cache_file.write_text("".join(json.dumps(r) + "\n" for r in records))
        again = generate_instructions(chunks, client, tmp_path, max_attempts=1, progress=False)
    finally:
        server.stop()
    assert again.n_generated == 1 and again.n_rejected == 1 and again.n_cached == 2
    assert calls["plain two"] == 2 and calls["plain one"] == 1 and calls["JUNK three"] == 1
    reopened = JsonlCache(tmp_path / "cache.jsonl")
    assert {r["chunk_id"]: r["status"] for r in reopened.records.values()} == {
        "doc0:0": "ok",
        "doc1:0": "ok",
        "doc2:0": "rejected",
    }
    assert len((tmp_path / "cache.jsonl").read_text().splitlines()) == 4  # nothing deleted
