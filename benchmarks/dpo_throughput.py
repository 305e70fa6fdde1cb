"""DPO training throughput and peak memory: alignforge vs TRL's ``DPOTrainer``, same everything.

    python benchmarks/dpo_throughput.py --pairs 12 --batch-size 4 --max-length 384 --repeats 1

Both sides train the embedded default model (SmolLM2-135M-Instruct) with the same LoRA
(r=16, alpha=32, no dropout, all linear layers), the reference being the adapter-off model, on
the same pairs of ``examples/data/dpo_en_demo.json`` (variable length; each prompt+response
cut to ``--max-length`` keeping the start, pairs whose prompt alone fills it dropped — TRL's
``keep_start``), with the same optimizer settings, batch size and number of steps (one epoch).
Each side runs in its own subprocess, one after the other and alternating with ``--repeats``,
so both see the same machine; peak memory is that subprocess's max RSS
(``resource.getrusage``). Time is the wall time of training steps 2..S (model loading,
tokenization and the first, warm-up step excluded on both sides).

Settings changed from TRL's defaults so both sides train alike: ``bf16=False`` (TRL's DPOConfig
turns bf16 autocast on, also on CPU; alignforge trains in float32) and
``gradient_checkpointing=False`` (TRL defaults to True, which trades speed for memory;
alignforge's default is off).

alignforge runs its padding-free layout with the shared prompt (``share_prompt: true``):
a pair's prompt is encoded once and no padding is computed. TRL 1.16 pads 2B rows
(its ``padding_free`` is disabled since its DPO refactor) and encodes each prompt twice.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_rows(n: int, tokenizer, max_length: int):
    """The first rows of the demo file whose prompt leaves room for a response."""
    from alignforge.data import read_rows
    from alignforge.data.preference import prepare_pairs

    rows = read_rows(ROOT / "examples/data/dpo_en_demo.json")
    pairs, stats = prepare_pairs(rows, tokenizer, max_length=max_length)
    keep = sorted(p.index for p in pairs)[:n]
    return [rows[i] for i in keep]


def run_alignforge(args, out: str) -> dict:
    from alignforge.config import build_config
    from alignforge.config.preference import DPOConfig
    from alignforge.data.preference import prepare_pairs
    from alignforge.models import load_tokenizer
    from alignforge.recipes import dpo
    from alignforge.training import TrainLoop

    tok = load_tokenizer("default")
    pairs, _ = prepare_pairs(load_rows(args.pairs, tok, args.max_length), tok, args.max_length)
    cfg = build_config(DPOConfig, dict(
        dataset="-", output_dir=out, max_length=args.max_length, learning_rate=5e-5, beta=0.1,
        per_device_train_batch_size=args.batch_size, num_train_epochs=1, lora_rank=16, lora_alpha=32,
        lora_dropout=0.0, share_prompt=args.layout == "shared", padding_free=args.layout != "padded",
        report_to="none", progress=False, seed=42,
    ))  # fmt: skip
    model, ref = dpo.build_policy("default", "lora", lora_rank=16, lora_alpha=32, lora_dropout=0.0)
    collate = dpo.make_collate(tok.pad_token_id, cfg)
    stamps = []
    loop = TrainLoop(
        model, dpo.PreferenceObjective(0.1, ref_model=ref), pairs, collate, cfg,
        callbacks=[lambda loop, row: stamps.append(time.time())],
    )  # fmt: skip
    loop.fit()
    return timed(stamps, len(pairs), args.batch_size)


def timed(stamps: list[float], n_pairs: int, batch_size: int) -> dict:
    """Throughput over steps 2..S: the first step (one-off warm-up) is left out on both sides."""
    if len(stamps) < 2:
        raise SystemExit("need at least 2 steps: raise --pairs or lower --batch-size")
    timed_pairs = n_pairs - min(batch_size, n_pairs)
    return {"seconds": stamps[-1] - stamps[0], "steps": len(stamps), "pairs": timed_pairs}


def run_trl(args, out: str) -> dict:
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from alignforge.data.preference import split_pair
    from alignforge.models import load_tokenizer, resolve_model_path

    tok = load_tokenizer("default")
    data = []
    for row in load_rows(args.pairs, tok, args.max_length):
        prompt, chosen, rejected, _ = split_pair(row)
        data.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path("default"), dtype=torch.float32, attn_implementation="sdpa"
    )
    stamps = []

    class Clock(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.time())

    cfg = DPOConfig(
        output_dir=out, per_device_train_batch_size=args.batch_size, num_train_epochs=1,
        learning_rate=5e-5, beta=0.1, loss_type=["sigmoid"], max_length=args.max_length,
        truncation_mode="keep_start", report_to=[], save_strategy="no", logging_steps=1,
        use_cpu=True, disable_dropout=True, seed=42, lr_scheduler_type="cosine", max_grad_norm=1.0,
        dataloader_num_workers=0, bf16=False, gradient_checkpointing=False,
    )  # fmt: skip
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    trainer = DPOTrainer(
        model=model, args=cfg, train_dataset=Dataset.from_list(data), processing_class=tok,
        peft_config=lora, callbacks=[Clock()],
    )  # fmt: skip
    trainer.train()
    return timed(stamps, len(data), args.batch_size)


def child(args) -> None:
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out:
        res = (run_alignforge if args.side == "alignforge" else run_trl)(args, out)
    res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["pairs_per_s"] = res["pairs"] / res["seconds"]
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--pairs", type=int, default=12, help="pairs trained (one epoch)")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-length", type=int, default=384)
    ap.add_argument("--layout", choices=["shared", "packed", "padded"], default="shared",
                    help="alignforge's batch layout")  # fmt: skip
    ap.add_argument("--repeats", type=int, default=1, help="alternating runs per side")
    ap.add_argument("--side", choices=["alignforge", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    if args.side:
        return child(args)
    results: dict[str, list[dict]] = {"alignforge": [], "trl": []}
    for r in range(args.repeats):
        for side in ("alignforge", "trl") if r % 2 == 0 else ("trl", "alignforge"):
            cmd = [sys.executable, __file__, "--side", side, "--pairs", str(args.pairs),
                   "--batch-size", str(args.batch_size), "--max-length", str(args.max_length),
                   "--layout", args.layout]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if line is None:
                sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
            results[side].append(json.loads(line[7:]))
            print(side, results[side][-1], flush=True)
    best = {s: max(results[s], key=lambda x: x["pairs_per_s"]) for s in results}
    summary = {
        "settings": vars(args),
        "runs": results,
        "speedup": best["alignforge"]["pairs_per_s"] / best["trl"]["pairs_per_s"],
        "memory_ratio": best["alignforge"]["peak_rss_mb"] / best["trl"]["peak_rss_mb"],
    }
    print(f"alignforge {best['alignforge']['pairs_per_s']:.3f} pairs/s, {best['alignforge']['peak_rss_mb']:.0f} MB | "
          f"TRL {best['trl']['pairs_per_s']:.3f} pairs/s, {best['trl']['peak_rss_mb']:.0f} MB | "
          f"speed-up {summary['speedup']:.2f}x, memory ratio {summary['memory_ratio']:.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
