"""End to end on the embedded default model: the README quick start, shrunk to a few steps.

`alignforge train examples/sft_default.yaml ...` (LoRA SFT on the shipped Alpaca demo, packed,
with an eval split and checkpoints) in a subprocess, then `alignforge generate` on its adapter.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # one intra-op thread: on a busy CPU, two threads waiting on each other run far slower
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }
    proc = subprocess.run(
        [sys.executable, "-m", "alignforge.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"alignforge {args[0]} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}"
    )
    return proc


def test_quick_start_config_trains_and_the_adapter_answers(default_model_dir, tmp_path):
    out = tmp_path / "sft-default"
    cli(
        "train",
        "examples/sft_default.yaml",
        f"model_name_or_path={default_model_dir}",
        f"output_dir={out}",
        "max_length=256",
        "max_samples=60",
        "val_size=0.1",
        "max_steps=4",
        "per_device_train_batch_size=1",
        "gradient_accumulation_steps=2",
        "eval_steps=2",
        "save_steps=2",
        "progress=false",
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["padding_free"] is True
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in rows if r["split"] == "train"]
    evals = [r["loss"] for r in rows if r["split"] == "eval"]
    assert len(train) == 4 and all(math.isfinite(x) and 0 < x < 20 for x in train)
    assert len(evals) == 2 and all(math.isfinite(x) for x in evals)  # step 2 and the end
    assert summary["tokens_trained"] > 0 and summary["data"]["truncated"] >= 0
    assert (out / "final" / "adapter_config.json").exists()
    assert (out / "final" / "adapter_model.safetensors").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    prompt = "Name three primary colors."
    proc = cli("generate", str(out / "final"), "-p", prompt, "--max-new-tokens", "24")
    assert f">>> {prompt}" in proc.stdout
    answer = proc.stdout.split(f">>> {prompt}", 1)[1].strip()
    assert len(answer.split()) >= 3, proc.stdout
