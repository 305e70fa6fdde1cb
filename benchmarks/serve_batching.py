"""Throughput of ``alignforge serve`` under concurrent requests: batched against one at a time.

    python benchmarks/serve_batching.py                       # the default model, 16 requests
    python benchmarks/serve_batching.py --model runs/sft-merged --requests 32 --max-tokens 64

Each setting is ``alignforge serve MODEL --batch-size B`` in its own process on a loopback port,
started, measured and stopped in turn. ``--batch-size 1`` serves one row at a time, which is what
the server did before it batched concurrent requests; ``--batch-size 16`` lets every request that
arrives while a batch runs join the next one. The client sends ``--requests`` chat requests at
once (``openai.AsyncOpenAI``, not streamed), greedy, ``--max-tokens`` each, after one warm-up
request. Reported: wall time, completion tokens (the server's ``usage``) per second, request
latency p50 and max, and how many answers are identical across settings (greedy, fp32: batching
changes only the padding). Writes ``--out`` (JSON) and prints a table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from serving import start  # noqa: E402  (benchmarks/serving.py: start a server, wait for /models)

from alignforge.rollout.server import free_port  # noqa: E402


def prompts(n: int) -> list[list[dict]]:
    rows = json.loads((ROOT / "examples/data/alpaca_en_demo.json").read_text())[:n]
    return [[{"role": "user", "content": (r["instruction"] + " " + r["input"]).strip()}]
            for r in rows]  # fmt: skip


def start_serve(model: str, batch_size: int, threads: int, log: Path):
    port = free_port()
    cmd = [sys.executable, "-m", "alignforge.cli", "serve", model, "--port", str(port),
           "--model-name", "m", "--batch-size", str(batch_size)]  # fmt: skip
    return start(cmd, port, threads, log)


async def measure(url: str, messages: list[list[dict]], max_tokens: int) -> dict:
    import openai

    client = openai.AsyncOpenAI(base_url=url, api_key="-", timeout=1800, max_retries=0)

    async def one(m):
        t0 = time.perf_counter()
        r = await client.chat.completions.create(model="m", messages=m, max_tokens=max_tokens,
                                                 temperature=0)  # fmt: skip
        return r, time.perf_counter() - t0

    await one(messages[0])  # warm-up
    began = time.perf_counter()
    results = await asyncio.gather(*(one(m) for m in messages))
    wall = time.perf_counter() - began
    tokens = sum(r.usage.completion_tokens for r, _ in results)
    latency = np.array([s for _, s in results])
    return {"requests": len(messages), "wall_s": wall, "completion_tokens": tokens,
            "tokens_per_s": tokens / wall, "latency_p50_s": float(np.median(latency)),
            "latency_max_s": float(latency.max()),
            "answers": [r.choices[0].message.content for r, _ in results]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=2, help="torch threads (OMP_NUM_THREADS)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/serve_batching.json")
    args = ap.parse_args()
    messages = prompts(args.requests)
    runs = []
    for b in args.batch_sizes:
        log = args.out.with_suffix(f".b{b}.log")
        proc, url = start_serve(args.model, b, args.threads, log)
        try:
            runs.append({"batch_size": b, **asyncio.run(measure(url, messages, args.max_tokens))})
        finally:
            proc.terminate()
            proc.wait(timeout=30)
        log.unlink(missing_ok=True)
    first = runs[0]
    print(f"{'batch size':>10} {'wall s':>8} {'tokens':>7} {'tok/s':>7} {'p50 s':>7} "
          f"{'max s':>7} {'vs first':>8} {'same answers':>12}")  # fmt: skip
    for r in runs:
        same = sum(a == b for a, b in zip(r["answers"], first["answers"], strict=True))
        r["same_answers_as_first"] = same
        print(f"{r['batch_size']:>10} {r['wall_s']:>8.1f} {r['completion_tokens']:>7} "
              f"{r['tokens_per_s']:>7.1f} {r['latency_p50_s']:>7.1f} {r['latency_max_s']:>7.1f} "
              f"{r['tokens_per_s'] / first['tokens_per_s']:>7.2f}x {same:>9}/{r['requests']}")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "max_tokens": args.max_tokens,
                                    "threads": args.threads, "machine": platform.platform(),
                                    "load_avg": os.getloadavg(), "runs": runs}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
