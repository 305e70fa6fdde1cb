"""Run a training stage on 2 CPU processes (gloo, ``torch.distributed.run``) and compare it with
1 process: per-step training losses and final weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_processes(conf: dict, tmp_path: Path, timeout: int = 300) -> None:
    """``alignforge train`` of ``conf`` (a config dict) on 2 processes; fails with their stderr."""
    path = tmp_path / f"two_{free_port()}.yaml"
    path.write_text(yaml.safe_dump(conf))
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", str(free_port()), "-m", "alignforge.cli", "train", str(path),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-4000:]


def train_losses(metrics: Path) -> list[float]:
    rows = [json.loads(x) for x in metrics.read_text().splitlines()]
    return [r["loss"] for r in rows if r["split"] == "train"]


def assert_same_losses(two: Path, one: Path, steps: int) -> None:
    a, b = train_losses(two), train_losses(one)
    assert len(a) == len(b) == steps
    assert a == pytest.approx(b, abs=1e-5)


def assert_same_weights(two: Path, one: Path, atol: float = 1e-5) -> None:
    from safetensors.torch import load_file

    a, b = load_file(two), load_file(one)
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=1e-4, msg=k)
