"""SFT training throughput and peak memory: alignforge against TRL's ``SFTTrainer``.

    python benchmarks/sft_throughput.py                      # defaults below, about 5-8 minutes
    python benchmarks/sft_throughput.py --steps 12 --repeats 2 --json sft_bench.json

Both sides train the embedded default model (SmolLM2-135M-Instruct) with the same LoRA adapter
(rank, alpha, dropout, every linear layer but the head), fp32 on CPU, AdamW, the same learning
rate and linear schedule, batch size, gradient accumulation, max_length, clipping and number of
optimizer steps, on the same examples: ``examples/data/alpaca_en_demo.json`` tokenized once
with alignforge's chat templating (system/user/assistant turns, loss on the assistant turn only),
truncated to ``--max-length``. TRL gets those exact token ids and labels as a pre-tokenized
dataset, so both sides see identical tokens and only the training machinery differs.

Variants (each in its own subprocess, so ``ru_maxrss`` is the peak of that side alone):

* ``alignforge``: ``alignforge.recipes.sft.run`` as a user runs it: its defaults lay each batch
  of examples end to end without padding (``padding_free``), no dataset-level packing, so a batch
  holds the same examples as TRL's.
* ``trl``: ``SFTTrainer`` with its defaults for padding and packing (no packing, each batch
  padded to its longest example).
* ``trl-packing``: ``SFTTrainer`` with ``packing=True`` (its default "bfd" strategy, which
  turns on padding-free batches), the option a TRL user would switch on for speed.

Settings changed from TRL's defaults, and why: ``bf16=False`` (fp32, as alignforge trains by
default; TRL defaults to bf16), ``gradient_checkpointing=False`` (alignforge's default; TRL
defaults to True, which would trade speed for memory), the learning rate, batch size,
accumulation, max_length and max_steps (set equal on both sides), ``save_strategy="no"`` and
``report_to="none"`` (no I/O in the timed window, alignforge gets ``save_steps=None`` too).

Throughput counts real tokens only (no padding): the sum of the lengths of the examples in the
timed steps. alignforge reports it per step (``tokens``); TRL counts ``attention_mask.sum()``
(or the padding-free row length) in ``_total_train_tokens``. Both are the same quantity; each
worker also recounts it from the data it was given. The first ``--warmup`` optimizer steps are
not timed. Sides run alternately (A B, then B A, ...) so drift in a shared CPU's load hits both.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data" / "alpaca_en_demo.json"
VARIANTS = ("alignforge", "trl", "trl-packing")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS), help="Comma-separated sides to run.")
    p.add_argument("--steps", type=int, default=12, help="Timed optimizer steps per side.")
    p.add_argument("--warmup", type=int, default=2, help="Untimed optimizer steps first.")
    p.add_argument("--repeats", type=int, default=2, help="Runs per side, order alternated.")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="torch threads.")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--json", default=None, help="Also write all runs and the summary here.")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- shared data
def tokenized_examples(max_length: int):
    """The benchmark's examples, tokenized by alignforge (the same ids and labels for every side)."""
    from alignforge.data import prepare_sft, read_rows
    from alignforge.models import load_tokenizer

    tokenizer = load_tokenizer("default")
    examples, _ = prepare_sft(read_rows(str(DATA)), tokenizer, max_length=max_length)
    return tokenizer, examples


class StepClock:
    """Wall-clock and token count between the end of warm-up and the end of the last step."""

    def __init__(self, warmup: int, total: int):
        self.warmup, self.total = warmup, total
        self.t0 = self.t1 = None
        self.cpu0 = self.cpu1 = 0.0
        self.tokens0 = self.tokens1 = 0

    def mark(self, step: int, tokens_so_far: int) -> None:
        if step == self.warmup:
            self.t0, self.cpu0, self.tokens0 = (
                time.perf_counter(),
                time.process_time(),
                tokens_so_far,
            )
        if step == self.total:
            self.t1, self.cpu1, self.tokens1 = (
                time.perf_counter(),
                time.process_time(),
                tokens_so_far,
            )

    def result(self) -> dict:
        if self.t0 is None or self.t1 is None:
            raise RuntimeError(
                f"timed window not reached (warmup {self.warmup}, total {self.total})"
            )
        seconds = self.t1 - self.t0
        tokens = self.tokens1 - self.tokens0
        cpu = self.cpu1 - self.cpu0
        return {
            "seconds": seconds,
            "cpu_seconds": cpu,
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "tokens_per_cpu_s": tokens / cpu,
        }


# ----------------------------------------------------------------------------- workers
def run_alignforge(a: argparse.Namespace, out_dir: str) -> dict:
    from alignforge.config import build_config
    from alignforge.config.stages import SFTConfig
    from alignforge.recipes import sft

    total = a.warmup + a.steps
    cfg = build_config(
        SFTConfig,
        dict(
            model_name_or_path="default",
            dataset=str(DATA),
            output_dir=out_dir,
            max_length=a.max_length,
            finetuning_type="lora",
            lora_rank=a.lora_rank,
            lora_alpha=a.lora_alpha,
            lora_dropout=a.lora_dropout,
            lora_target="all",
            learning_rate=a.lr,
            lr_scheduler_type="linear",
            per_device_train_batch_size=a.batch_size,
            gradient_accumulation_steps=a.grad_accum,
            max_steps=total,
            max_grad_norm=1.0,
            seed=a.seed,
            progress=False,
            report_to="none",
        ),
    )
    clock = StepClock(a.warmup, total)
    seen = {"tokens": 0}

    def on_step(loop, row):
        seen["tokens"] += int(row["tokens"])
        clock.mark(loop.step, seen["tokens"])

    summary = sft.run(cfg, callbacks=[on_step])
    return {**clock.result(), "packing": cfg.packing, "train_units": summary["train_units"]}


def run_trl(a: argparse.Namespace, out_dir: str, packing: bool) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from alignforge.models import resolve_model_path

    tokenizer, examples = tokenized_examples(a.max_length)
    data = Dataset.from_dict(
        {"input_ids": [e.input_ids for e in examples], "labels": [e.labels for e in examples]}
    )
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path("default"), dtype=torch.float32, attn_implementation="sdpa"
    )
    lora = LoraConfig(
        r=a.lora_rank,
        lora_alpha=a.lora_alpha,
        lora_dropout=a.lora_dropout,
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    total = a.warmup + a.steps
    args = SFTConfig(
        output_dir=out_dir,
        max_length=a.max_length,
        packing=packing,
        learning_rate=a.lr,
        lr_scheduler_type="linear",
        per_device_train_batch_size=a.batch_size,
        gradient_accumulation_steps=a.grad_accum,
        max_steps=total,
        max_grad_norm=1.0,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=a.seed,
    )
    clock = StepClock(a.warmup, total)
    holder = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kw):
            clock.mark(state.global_step, holder["trainer"]._total_train_tokens)

    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=data,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[Clock()],
    )
    holder["trainer"] = trainer
    trainer.train()
    return {**clock.result(), "packing": packing, "train_units": len(trainer.train_dataset)}


def worker(a: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(a.seed)
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "run")
        if a.worker == "alignforge":
            res = run_alignforge(a, out)
        else:
            res = run_trl(a, out, packing=a.worker == "trl-packing")
    res["variant"] = a.worker
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["threads"] = torch.get_num_threads()
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------- driver
def launch(variant: str, argv: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--worker", variant]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{variant} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def summarize(runs: list[dict]) -> dict[str, dict]:
    """Per variant: median tokens/s over repeats, the highest peak RSS and the per-run figures."""
    out = {}
    for name in dict.fromkeys(r["variant"] for r in runs):
        mine = [r for r in runs if r["variant"] == name]
        out[name] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in mine),
            "tokens_per_s_runs": [round(r["tokens_per_s"], 1) for r in mine],
            "tokens_per_cpu_s": statistics.median(r["tokens_per_cpu_s"] for r in mine),
            "peak_rss_mib": max(r["peak_rss_mib"] for r in mine),
            "peak_rss_mib_runs": [round(r["peak_rss_mib"]) for r in mine],
            "tokens_timed": mine[0]["tokens"],
        }
    return out


def report(summary: dict[str, dict]) -> str:
    lines = [
        f"{'variant':<13} {'tokens/s':>9} {'tok/CPU-s':>9} {'peak RSS MiB':>13}  runs (tokens/s; MiB)"
    ]
    for name, s in summary.items():
        lines.append(
            f"{name:<13} {s['tokens_per_s']:>9.1f} {s['tokens_per_cpu_s']:>9.1f} "
            f"{s['peak_rss_mib']:>13.0f}  "
            f"{s['tokens_per_s_runs']}; {s['peak_rss_mib_runs']}"
        )
    if "alignforge" in summary:
        af = summary["alignforge"]
        for name in (n for n in summary if n != "alignforge"):
            s = summary[name]
            lines.append(
                f"alignforge / {name}: throughput x{af['tokens_per_s'] / s['tokens_per_s']:.2f} "
                f"(per CPU-second x{af['tokens_per_cpu_s'] / s['tokens_per_cpu_s']:.2f}), "
                f"peak memory x{af['peak_rss_mib'] / s['peak_rss_mib']:.2f}"
            )
    return "\n".join(lines)


def main(argv=None) -> None:
    a = parse_args(argv)
    if a.worker:
        return worker(a)
    argv = [x for x in (argv if argv is not None else sys.argv[1:])]
    variants = [v.strip() for v in a.variants.split(",") if v.strip()]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--variants: unknown {sorted(unknown)}; choose from {VARIANTS}")
    print(
        f"SFT throughput: {a.steps} timed steps after {a.warmup} warm-up, batch {a.batch_size} x "
        f"accumulation {a.grad_accum}, max_length {a.max_length}, LoRA r={a.lora_rank} "
        f"alpha={a.lora_alpha}, {a.threads} threads, {a.repeats} repeat(s)",
        flush=True,
    )
    runs = []
    for rep in range(a.repeats):
        order = variants if rep % 2 == 0 else variants[::-1]
        for v in order:
            r = launch(v, argv)
            runs.append({**r, "repeat": rep})
            print(
                f"  [{rep}] {v:<12} {r['tokens_per_s']:8.1f} tokens/s "
                f"({r['tokens']} tokens in {r['seconds']:.1f}s, {r['cpu_seconds']:.1f} CPU-s), peak {r['peak_rss_mib']:.0f} MiB",
                flush=True,
            )
    summary = summarize(runs)
    print(report(summary))
    if a.json:
        Path(a.json).write_text(
            json.dumps({"args": vars(a), "runs": runs, "summary": summary}, indent=2)
        )


if __name__ == "__main__":
    main()
