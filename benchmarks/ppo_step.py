"""Where the time of one PPO step goes: generation, scoring, preparation, training.

    python benchmarks/ppo_step.py                                   # embedded default model, LoRA
    python benchmarks/ppo_step.py --steps 4 --rollout-batch-size 8 --max-new-tokens 64 --threads 2
    python benchmarks/ppo_step.py --steps 3 --threads 2 --baseline 0fbcb81   # before/after, one run
    python benchmarks/ppo_step.py --engines transformers,server --staleness 0,1  # sync vs async

Runs ``stage: ppo`` on ``model_name_or_path: default`` (SmolLM2-135M-Instruct) with a LoRA policy,
a critic on a second adapter (GAE) and a programmatic reward (answer length toward 32 tokens),
then reports the mean seconds per phase over the steps after the first (warm-up), and tokens/s
(generated answer tokens per second of the whole step). ``--baseline REF`` first runs this same
benchmark from a checkout of commit REF (a temporary git worktree) with the same arguments, then
the current code, and prints the ratio of the step times.

``--engines transformers,server --staleness 0,1`` measures every pair in one run: the in-process
engine, or ``alignforge serve`` on the same model in a subprocess (``--threads`` threads of its
own) with the policy's adapter loaded after each update (``rollout_engine: server``); drawing
each batch at the step that trains on it (0), or one step ahead, in the background while the
trainer trains (1: ``max_staleness``). The step time is that of the whole step, generation
included (for the asynchronous runs: the wait for a batch still being drawn), averaged over the
steps after the first and before the last ``max_staleness`` (which draw nothing). Writes
``benchmarks/results/ppo_step.json`` (the first pair's figures at the top, every pair under
``runs``); the figures are recorded in ``docs/benchmarks/ppo.md``.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
PHASES = ("time/generate", "time/score", "time/prepare", "time/train")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="default")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rollout-batch-size", type=int, default=8)
    ap.add_argument("--mini-batch-size", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--ppo-epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rollout-precision", default="same", choices=["same", "bfloat16", "int8"])
    ap.add_argument(
        "--advantage-estimator", default="gae", choices=["gae", "grpo", "rloo", "reinforce_pp"]
    )
    ap.add_argument("--num-generations", type=int, default=1)
    ap.add_argument("--engines", default="transformers", help="transformers,server: each measured")
    ap.add_argument(
        "--staleness", default="0", help="max_staleness values, e.g. 0,1: each measured"
    )
    ap.add_argument("--baseline", help="a git commit to measure too, in the same run")
    ap.add_argument("--baseline-last", action="store_true", help="measure the current code first")
    args = ap.parse_args()
    if args.baseline:
        return compare(args)

    import torch

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="ppo-step-"))
    rows = json.loads((ROOT / "examples/data/alpaca_en_demo.json").read_text())[:64]
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["instruction"]}) + "\n" for r in rows))
    pairs = [(e, int(k)) for e in args.engines.split(",") for k in args.staleness.split(",")]
    server = (
        start_server(args.model, args.threads, work)
        if any(e == "server" for e, _ in pairs)
        else None
    )
    runs = {}
    try:
        for engine, staleness in pairs:
            name = f"{engine}/max_staleness={staleness}"
            extra = {"rollout_engine": engine, "max_staleness": staleness}
            if engine == "server":
                extra["rollout_base_url"] = server[1]
            runs[name] = measure(args, data, work / name.replace("/", "-"), extra)
    finally:
        if server is not None:
            server[0].kill()
    first = next(iter(runs.values()))
    result = {
        "args": vars(args),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads",
        "cuda": torch.cuda.is_available(),
        **first,
        "runs": runs,
    }
    out = ROOT / "benchmarks/results/ppo_step.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    for name, r in runs.items():
        print(
            f"\none PPO step on {args.model}, {name} ({result['machine']}): {r['seconds_per_step']:.2f} s"
        )
        for k, v in r["phases"].items():
            print(f"  {k:<9}{v['seconds']:>8.2f} s {100 * v['share']:>6.1f}%")
        print(
            f"  answer tokens/step {r['answer_tokens_per_step']:.0f}; {r['tokens_per_s']:.1f} tokens/s overall"
        )
    if len(runs) > 1:
        print(f"\nstep time against {next(iter(runs))}:")
        for name, r in runs.items():
            print(
                f"  {name:<36}{r['seconds_per_step']:>7.2f} s  x{first['seconds_per_step'] / r['seconds_per_step']:.2f}"
            )


def measure(args, data: Path, out: Path, extra: dict) -> dict:
    """One PPO run; the mean seconds per phase over its steady-state steps."""
    from alignforge.config import build_config
    from alignforge.config.rlhf import PPOConfig
    from alignforge.recipes import ppo

    cfg = build_config(
        PPOConfig,
        dict(
            model_name_or_path=args.model,
            dataset=str(data),
            output_dir=str(out),
            reward_fn="alignforge.rl.scoring:length_reward",
            reward_fn_kwargs={"target_length": 32},
            rollout_batch_size=args.rollout_batch_size,
            mini_batch_size=args.mini_batch_size,
            max_new_tokens=args.max_new_tokens,
            ppo_epochs=args.ppo_epochs,
            rollout_precision=args.rollout_precision,
            advantage_estimator=args.advantage_estimator,
            num_generations=args.num_generations,
            max_steps=args.steps,
            max_length=256,
            learning_rate=1e-5,
            progress=False,
            **extra,
        ),
    )
    ppo.run(cfg)
    metrics = [json.loads(x) for x in open(out / "metrics.jsonl")]
    # steady state: not the first step (warm-up, and it draws the batches ahead), nor the last
    # max_staleness ones (nothing left to draw while they train)
    train = [m for m in metrics if m["split"] == "train"]
    steps = train[1 : len(train) - cfg.max_staleness] or train[1:] or train
    mean = {k: sum(m[k] for m in steps) / len(steps) for k in PHASES}
    total = sum(mean.values())
    tokens = sum(m["response_tokens"] for m in steps) / len(steps)
    return {
        "seconds_per_step": total,
        "phases": {k[5:]: {"seconds": v, "share": v / total} for k, v in mean.items()},
        "answer_tokens_per_step": tokens,
        "tokens_per_s": tokens / total,
        "generated_tokens_per_s": tokens / mean["time/generate"],
        "staleness": [m["staleness"] for m in steps],
    }


def start_server(model: str, threads: int, work: Path):
    """``alignforge serve MODEL`` in a subprocess with ``threads`` threads; (process, base URL)."""
    import os
    import subprocess
    import time
    import urllib.request

    from alignforge.rollout.server import free_port

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    log = open(work / "serve.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "alignforge.cli", "serve", model, "--port", str(port), "--model-name", "bench"],
        stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    for _ in range(600):
        if proc.poll() is not None:
            raise RuntimeError(
                f"alignforge serve exited: {(work / 'serve.log').read_text()[-2000:]}"
            )
        try:
            urllib.request.urlopen(f"{url}/models", timeout=2)
            return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("alignforge serve did not start in 300 s")


def compare(args) -> None:
    """Run the benchmark at ``args.baseline`` (its own copy of this script), then here."""
    import subprocess

    argv = [a for a in sys.argv[1:] if a != "--baseline-last"]
    i = argv.index("--baseline")
    del argv[i : i + 2]
    tree = Path(tempfile.mkdtemp(prefix="ppo-baseline-")) / "tree"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tree), args.baseline],
                   check=True, capture_output=True)  # fmt: skip
    env = dict(__import__("os").environ)

    def measure(root: Path) -> dict:
        env["PYTHONPATH"] = str(root)
        subprocess.run(
            [sys.executable, str(root / "benchmarks/ppo_step.py"), *argv], check=True, env=env
        )
        return json.loads((root / "benchmarks/results/ppo_step.json").read_text())

    try:
        if args.baseline_last:
            after, before = measure(ROOT), measure(tree)
        else:
            before, after = measure(tree), measure(ROOT)
    finally:
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], check=False
        )
    print(
        f"\nbefore ({args.baseline}) {before['seconds_per_step']:.2f} s/step, now "
        f"{after['seconds_per_step']:.2f} s/step: x{before['seconds_per_step'] / after['seconds_per_step']:.2f}"
    )
    for k in after["phases"]:
        b, a = before["phases"][k]["seconds"], after["phases"][k]["seconds"]
        print(f"  {k:<9}{b:>8.2f} s -> {a:>6.2f} s")


if __name__ == "__main__":
    main()
