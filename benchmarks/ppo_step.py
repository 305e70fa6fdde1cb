"""Where the time of one PPO step goes: generation, scoring, preparation, training.

    python benchmarks/ppo_step.py                                   # embedded default model, LoRA
    python benchmarks/ppo_step.py --steps 4 --rollout-batch-size 8 --max-new-tokens 64 --threads 2
    python benchmarks/ppo_step.py --steps 3 --threads 2 --baseline 0fbcb81   # before/after, one run

Runs ``stage: ppo`` on ``model_name_or_path: default`` (SmolLM2-135M-Instruct) with a LoRA policy,
a critic on a second adapter (GAE) and a programmatic reward (answer length toward 32 tokens),
then reports the mean seconds per phase over the steps after the first (warm-up), and tokens/s
(generated answer tokens per second of the whole step). ``--baseline REF`` first runs this same
benchmark from a checkout of commit REF (a temporary git worktree) with the same arguments, then
the current code, and prints the ratio of the step times. Writes
``benchmarks/results/ppo_step.json``; the figures are recorded in ``docs/benchmarks/ppo.md``.
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
    ap.add_argument("--baseline", help="a git commit to measure too, in the same run")
    ap.add_argument("--baseline-last", action="store_true", help="measure the current code first")
    args = ap.parse_args()
    if args.baseline:
        return compare(args)

    import torch

    from alignforge.config import build_config
    from alignforge.config.rlhf import PPOConfig
    from alignforge.recipes import ppo

    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="ppo-step-"))
    rows = json.loads((ROOT / "examples/data/alpaca_en_demo.json").read_text())[:64]
    data = work / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": r["instruction"]}) + "\n" for r in rows))
    cfg = build_config(
        PPOConfig,
        dict(
            model_name_or_path=args.model,
            dataset=str(data),
            output_dir=str(work / "run"),
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
        ),
    )
    ppo.run(cfg)
    metrics = [json.loads(x) for x in open(work / "run/metrics.jsonl")]
    steps = [m for m in metrics if m["split"] == "train"][1:] or metrics
    mean = {k: sum(m[k] for m in steps) / len(steps) for k in PHASES}
    total = sum(mean.values())
    tokens = sum(m["response_tokens"] for m in steps) / len(steps)
    result = {
        "args": vars(args),
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads",
        "cuda": torch.cuda.is_available(),
        "seconds_per_step": total,
        "phases": {k[5:]: {"seconds": v, "share": v / total} for k, v in mean.items()},
        "answer_tokens_per_step": tokens,
        "tokens_per_s": tokens / total,
        "generated_tokens_per_s": tokens / mean["time/generate"],
    }
    out = ROOT / "benchmarks/results/ppo_step.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"\none PPO step on {args.model} ({result['machine']}): {total:.2f} s")
    for k, v in result["phases"].items():
        print(f"  {k:<9}{v['seconds']:>8.2f} s {100 * v['share']:>6.1f}%")
    print(
        f"  answer tokens/step {tokens:.0f}; {result['tokens_per_s']:.1f} tokens/s overall, "
        f"{result['generated_tokens_per_s']:.1f} tokens/s in generation"
    )


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
