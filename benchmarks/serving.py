"""Serving speed of one aligned model: ``alignforge serve`` (transformers) against llama.cpp (GGUF).

    alignforge demo --quick --output-dir runs/demo-quick        # an aligned model, ~4 min
    python benchmarks/serving.py --demo-dir runs/demo-quick     # q8_0 and q4_0 exported on the way
    python benchmarks/serving.py --demo-dir runs/demo-quick --gpu   # adds the bf16 export on the GPU

Every system is an OpenAI-compatible server in its own process on a loopback port, started,
measured and stopped in turn, so they never compete for the cores:

* ``serve-fp32``: ``alignforge serve MODEL`` (transformers, float32, CPU);
* ``gguf-<quant>``: ``python -m llama_cpp.server --model MODEL-<quant>.gguf`` with as many threads
  as torch uses and ``--interrupt_requests False`` (by default a new request cuts the one that
  is streaming short, which would make concurrent requests look fast);
* ``serve-bf16-gpu`` (``--gpu``): the ``--format hf --dtype bfloat16`` export served by
  ``alignforge serve --dtype bfloat16`` on the GPU. llama.cpp stays on the CPU: the registry's
  llama-cpp-python builds without CUDA.

Prompts are the demo's task prompts (the first ``--requests`` test items), greedy, at most
``--max-tokens`` tokens. Each concurrency level (``--concurrency``, default 1 and 8) sends all
prompts through that many client threads that stream (``stream: true``), after one warm-up
request. Per request: time to first token (the first content chunk), decode speed
``(tokens - 1) / (end - first token)``; per level: throughput = all tokens / wall time. Tokens are
counted by re-tokenizing each answer with the model's tokenizer, the same count for every
server. Writes ``--out`` (JSON) and prints a table with ratios to ``serve-fp32``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from alignforge.evaluate.generation import OpenAIGenerator  # noqa: E402
from alignforge.rollout.server import free_port  # noqa: E402


def demo_policy(demo_dir: Path) -> Path:
    """The demo's final policy: the merged model of its last RLHF round."""
    rounds = sorted(
        (demo_dir / "rlhf").glob("round_*/policy"), key=lambda p: int(p.parent.name[6:])
    )
    if not rounds:
        raise SystemExit(f"{demo_dir}/rlhf holds no round_*/policy: run `alignforge demo` first")
    return rounds[-1]


def task_prompts(test_file: Path, n: int) -> list[list[dict]]:
    from alignforge.evaluate.runner import load_examples
    from alignforge.evaluate.tasks import get_task

    return [e.messages for e in load_examples(get_task("extraction"), test_file, limit=n)]


def exports(model: Path, work: Path, quants: list[str], gpu: bool) -> dict[str, Path]:
    """``policy-<quant>.gguf`` (and ``policy-bf16/`` with --gpu) in ``work``: reused when their
    record holds ``model``'s fingerprint, exported otherwise."""
    from alignforge.export import export_gguf, export_hf
    from alignforge.models import fingerprint

    source = fingerprint(model)

    def made_from_model(record: Path) -> bool:
        return record.exists() and json.loads(record.read_text())["source_fingerprint"] == source

    out = {}
    for q in quants:
        path = work / f"policy-{q}.gguf"
        ok = made_from_model(Path(f"{path}.json"))
        out[q] = path if ok else export_gguf(str(model), path, quant=q)
    if gpu:
        path = work / "policy-bf16"
        ok = made_from_model(path / "alignforge_export.json")
        out["bf16"] = path if ok else export_hf(str(model), path)
    return out


def server_command(kind: str, path: Path, port: int, threads: int) -> list[str]:
    if kind == "gguf":
        return [sys.executable, "-m", "llama_cpp.server", "--model", str(path), "--host",
                "127.0.0.1", "--port", str(port), "--n_threads", str(threads), "--n_threads_batch",
                str(threads), "--n_ctx", "4096", "--interrupt_requests", "False",
                "--model_alias", "m"]  # fmt: skip
    cmd = [sys.executable, "-m", "alignforge.cli", "serve", str(path), "--port", str(port),
           "--model-name", "m"]  # fmt: skip
    return cmd + (["--dtype", "bfloat16"] if kind == "serve-bf16" else [])


def start(cmd: list[str], port: int, threads: int, log: Path, timeout: float = 300.0):
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}  # torch's threads = llama.cpp's
    proc = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{' '.join(cmd[:4])} exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(url + "/models", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit(f"{' '.join(cmd[:4])} did not answer within {timeout:.0f} s; see {log}")


def measure(url: str, prompts, concurrency: int, max_tokens: int, tokenizer) -> dict:
    client = OpenAIGenerator(
        url, "m", max_tokens=max_tokens, concurrency=concurrency, timeout_s=600
    )
    client.generate(prompts[:1])  # warm-up: first-request allocations, llama.cpp's graph
    start = time.perf_counter()
    gens = client.generate(prompts)
    wall = time.perf_counter() - start
    tokens = [len(tokenizer(g.text, add_special_tokens=False)["input_ids"]) for g in gens]
    ttft = np.array([g.ttft_s for g in gens if g.ttft_s is not None])
    decode = np.array([(n - 1) / (g.seconds - g.ttft_s) for g, n in zip(gens, tokens, strict=True)
                       if g.ttft_s is not None and n > 1 and g.seconds > g.ttft_s])  # fmt: skip
    return {
        "concurrency": concurrency, "requests": len(gens), "wall_s": wall, "tokens": sum(tokens),
        "ttft_p50_s": float(np.median(ttft)), "ttft_p95_s": float(np.quantile(ttft, 0.95)),
        "decode_tokens_per_s_p50": float(np.median(decode)) if decode.size else None,
        "throughput_tokens_per_s": sum(tokens) / wall,
        "answers": [g.text for g in gens],
    }  # fmt: skip


def table(results: list[dict]) -> str:
    base = {r["concurrency"]: r for r in results if r["system"] == "serve-fp32"}
    head = ["system", "conc.", "TTFT p50 (s)", "TTFT p95 (s)", "decode tok/s p50",
            "throughput tok/s", "TTFT p50 speed-up vs serve", "throughput vs serve"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        b = base.get(r["concurrency"])
        ratio_ttft = f"{b['ttft_p50_s'] / r['ttft_p50_s']:.2f}x" if b else "–"
        ratio_tp = (
            f"{r['throughput_tokens_per_s'] / b['throughput_tokens_per_s']:.2f}x" if b else "–"
        )
        dec = r["decode_tokens_per_s_p50"]
        lines.append(
            f"| {r['system']} | {r['concurrency']} | {r['ttft_p50_s']:.3f} | {r['ttft_p95_s']:.3f} "
            f"| {'–' if dec is None else f'{dec:.1f}'} | {r['throughput_tokens_per_s']:.1f} "
            f"| {ratio_ttft} | {ratio_tp} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--demo-dir", type=Path, default=ROOT / "runs" / "demo-quick")
    ap.add_argument("--model", type=Path, help="HF model dir (default: the demo's final policy)")
    ap.add_argument("--quants", nargs="+", default=["q8_0", "q4_0"])
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2),
                    help="threads of each server, torch's and llama.cpp's alike (default: half "
                    "the logical CPUs, llama.cpp's own default)")  # fmt: skip
    ap.add_argument("--gpu", action="store_true", help="add the bf16 export served on the GPU")
    ap.add_argument("--work-dir", type=Path, help="exports and server logs (default: DEMO/export)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "serving.json")
    args = ap.parse_args()

    import torch
    from transformers import AutoTokenizer

    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: torch sees no CUDA device on this machine")
    model = args.model or demo_policy(args.demo_dir)
    prompts = task_prompts(args.demo_dir / "data" / "test.jsonl", args.requests)
    args.work_dir = args.work_dir or args.demo_dir / "export"
    args.work_dir.mkdir(parents=True, exist_ok=True)
    files = exports(model, args.work_dir, args.quants, args.gpu)
    systems = [("serve-fp32", "serve", model)] + [
        (f"gguf-{q}", "gguf", files[q]) for q in args.quants
    ]
    if args.gpu:
        systems.append(("serve-bf16-gpu", "serve-bf16", files["bf16"]))
    tokenizer = AutoTokenizer.from_pretrained(model)
    results, load = [], [os.getloadavg()[0]]
    for name, kind, path in systems:
        port = free_port()
        proc, url = start(server_command(kind, path, port, args.threads), port, args.threads,
                          args.work_dir / f"{name}.log")  # fmt: skip
        try:
            for c in args.concurrency:
                r = measure(url, prompts, c, args.max_tokens, tokenizer)
                results.append({"system": name, "model": str(path), **r})
                print(f"{name} c={c}: TTFT p50 {r['ttft_p50_s']:.3f} s, "
                      f"{r['throughput_tokens_per_s']:.1f} tok/s", flush=True)  # fmt: skip
        finally:
            proc.terminate()
            proc.wait(30)
        load.append(os.getloadavg()[0])
    report = {
        "model": str(model), "threads": args.threads, "requests": args.requests,
        "max_tokens": args.max_tokens, "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "load_avg_1m": load, "gpu": args.gpu,
        "created": time.strftime("%Y-%m-%d %H:%M:%S"), "results": results,
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(table(results))
    print(f"1-minute load average before/after each server: {', '.join(f'{x:.1f}' for x in load)}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
