"""The README's multi-process command, taken from its code block and run as written (2 CPU
processes, gloo) with a tiny random model swapped in, so the documented command cannot drift."""

import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import yaml
from doc_blocks import bash_commands

ROOT = Path(__file__).resolve().parents[2]


def readme_command() -> list[str]:
    lines = [
        line
        for line in bash_commands("README.md")
        if line.startswith("python -m torch.distributed.run ")
    ]
    assert len(lines) == 1, f"expected one torch.distributed.run command in README.md, got {lines}"
    return shlex.split(lines[0], comments=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_multiprocess_command_trains_on_two_ranks(tiny_model_dir, tmp_path):
    cmd = readme_command()
    assert cmd[:5] == ["python", "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    assert cmd[5:8] == ["-m", "alignforge.cli", "train"]
    config = cmd[8]
    out = tmp_path / "run"
    # later overrides win: the tiny model, a short max_length and a private output_dir
    extra = [f"model_name_or_path={tiny_model_dir}", "max_length=128", "progress=false",
             f"output_dir={out}"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PET_MASTER_PORT": str(free_port())}
    proc = subprocess.run(
        [sys.executable, *cmd[1:], *extra],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-1500:] + proc.stderr[-3000:]

    max_steps = int(next(a.split("=", 1)[1] for a in cmd if a.startswith("max_steps=")))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in rows if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, max_steps + 1))  # once each: rank 0 logs

    # Two ranks: an epoch is floor(units / global batch) steps, the global batch being
    # per-device batch x accumulation x 2 processes (one process would make it half as large).
    cfg = yaml.safe_load((ROOT / config).read_text())
    per_rank = cfg["per_device_train_batch_size"] * cfg["gradient_accumulation_steps"]
    units = json.loads((out / "summary.json").read_text())["train_units"]
    steps_per_epoch = round(train[0]["step"] / train[0]["epoch"])
    assert steps_per_epoch == units // (per_rank * 2)
    assert (out / "final").is_dir()
