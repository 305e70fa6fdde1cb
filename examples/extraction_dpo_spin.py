"""DPO and SPIN on the demo's extraction task, evaluated on the demo's held-out items.

    alignforge demo --output-dir runs/demo                  # first: base, SFT, SFT + PPO rounds
    python examples/extraction_dpo_spin.py --demo-dir runs/demo

Both start from the demo's merged SFT model (``runs/demo/sft_merged``) and are scored on the
same test items as the demo's systems (the first ``--n-eval`` of ``data/test.jsonl``):

* **DPO**: the SFT model samples ``--k`` answers (one greedy, the rest at temperature 1) for
  ``--prompts`` training sentences that SFT did not see; the task metric (entity F1 against the
  gold list) judges every pair, ties are dropped, and the prompts are split before pairing.
  DPO (sigmoid, LoRA, reference = the adapter off) trains on the decisive pairs.
* **SPIN**: one self-play iteration on the SFT data itself: the SFT model's own greedy answers
  are the rejected side, the gold extractions the chosen side.

Everything is written under ``<demo-dir>/extras``; finished steps are skipped on a re-run.
The figures go to ``<demo-dir>/extras/results.json`` and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from alignforge.config import build_config
from alignforge.evaluate.tasks import get_task
from alignforge.workflow import steps
from alignforge.workflow.demo import eval_system
from alignforge.workflow.iterate import Round, _step


def preference_pairs(run: Path, out: Path, task, n_prompts: int, k: int, seed: int) -> dict:
    """Samples of the SFT model on unseen training sentences, judged by the task metric."""
    sft_texts = {
        r["input"][-1]["content"] for r in steps.read_jsonl(run / "diverse" / "sft_rows.jsonl")
    }
    rows = [
        r
        for r in steps.read_jsonl(run / "data" / "train.jsonl")
        if r["input"][-1]["content"] not in sft_texts
    ]
    chosen = random.Random(seed).sample(range(len(rows)), min(n_prompts, len(rows)))
    prompts, refs = steps.task_prompt_rows(task, rows, chosen)
    steps.sample(
        str(run / "sft_merged"),
        prompts,
        out / "sample",
        k,
        1.0,
        128,
        {"train": 0.85, "validation": 0.15},
        seed,
    )
    rep = steps.judge(
        out / "sample" / "samples.jsonl", out / "judge", "metric", "task-metric", None, task, refs
    )
    return {"prompts": len(prompts), **rep}


def train_dpo(run: Path, out: Path, max_steps: int) -> dict:
    from alignforge.recipes import dpo

    train, val = steps.pref_files(out / "judge" / "prefs")
    data = {"stage": "dpo", "model_name_or_path": str(run / "sft_merged"), "dataset": str(train),
            "output_dir": str(out / "dpo"), "finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32,
            "lora_dropout": 0.0, "beta": 0.1, "learning_rate": 5e-5, "max_length": 384, "max_steps": max_steps,
            "per_device_train_batch_size": 4, "share_prompt": True, "progress": True, "report_to": "none"}  # fmt: skip
    if val:
        data["eval_dataset"] = str(val)
    s = dpo.run(build_config(dpo.CONFIG, data, "extras.dpo"))
    return {"model": s["final_model"], "final_eval": s.get("final_eval"), "steps": s.get("steps")}


def train_spin(run: Path, out: Path, max_steps: int) -> dict:
    from alignforge.recipes import spin

    data = {"stage": "spin", "model_name_or_path": str(run / "sft_merged"),
            "dataset": str(run / "sft_data" / "train.jsonl"), "output_dir": str(out / "spin"),
            "num_iterations": 1, "beta": 0.1, "learning_rate": 5e-5, "max_new_tokens": 128,
            "max_length": 384, "max_steps": max_steps, "per_device_train_batch_size": 4,
            "finetuning_type": "lora", "lora_rank": 16, "lora_alpha": 32, "lora_dropout": 0.0,
            "share_prompt": True, "progress": True, "report_to": "none"}  # fmt: skip
    s = spin.run(build_config(spin.CONFIG, data, "extras.spin"))
    it = s["iterations"][-1]
    return {"model": s["final_model"], "final": it.get("final"), "generation": it.get("generation")}


def evaluate(run: Path, out: Path, task, name: str, model: str, n_eval: int) -> dict:
    test = run / "data" / "test.jsonl"
    return eval_system(task, test, out / "eval" / name, name, model, n_eval, max_new_tokens=96)


def demo_rows(run: Path) -> list[tuple[str, dict]]:
    s = json.loads((run / "demo_summary.json").read_text())
    return [("base", s["base"]), ("SFT", s["sft"]), ("SFT + PPO rounds", s["final"])]


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--demo-dir", default="runs/demo")
    ap.add_argument(
        "--prompts", type=int, default=64, help="training sentences sampled for DPO pairs"
    )
    ap.add_argument("--k", type=int, default=4, help="answers sampled per sentence")
    ap.add_argument("--dpo-steps", type=int, default=30)
    ap.add_argument("--spin-steps", type=int, default=30)
    ap.add_argument(
        "--n-eval", type=int, default=48, help="test items (the demo's full profile uses 48)"
    )
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    run = Path(a.demo_dir)
    out = run / "extras"
    task, rnd = get_task("extraction"), Round(out)
    _step(rnd, "pairs", lambda: preference_pairs(run, out, task, a.prompts, a.k, a.seed), print)
    dpo = _step(rnd, "dpo", lambda: train_dpo(run, out, a.dpo_steps), print)
    spin = _step(rnd, "spin", lambda: train_spin(run, out, a.spin_steps), print)
    rows = demo_rows(run)
    for name, model in (("SFT + DPO", dpo["model"]), ("SFT + SPIN", spin["model"])):
        rows.append((name, _step(rnd, f"eval_{name.split()[-1].lower()}",
                                 lambda m=model, n=name: evaluate(run, out, task, n.split()[-1].lower(), m, a.n_eval), print)))  # fmt: skip
    results = {name: r for name, r in rows}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print("\n| system | n | entity F1 [95% CI] | unparseable |\n|---|---|---|---|")
    for name, r in rows:
        f = r["metrics"]["f1"]
        print(
            f"| {name} | {r['n']} | {f['value']:.3f} [{f['low']:.3f}, {f['high']:.3f}] | {r['parse_failure_rate'] or 0:.1%} |"
        )


if __name__ == "__main__":
    main()
