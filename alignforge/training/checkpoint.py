"""Checkpoints that survive interruption: written to a temporary dir, then renamed into place.

A checkpoint holds the trainable weights (LoRA, heads, or the full model), the optimizer and
scheduler state, every RNG state and the loop's counters, so a resumed run takes exactly the
steps the uninterrupted run would have taken.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        n: p.detach().to("cpu").clone().contiguous()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n in state if n not in params]
    if missing:
        raise RuntimeError(f"checkpoint has weights the model lacks, e.g. {missing[:3]}")
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))


def rng_state() -> dict:
    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointManager:
    """``save(step, ...)`` writes ``output_dir/checkpoint-{step}``; keeps the last ``keep`` ones."""

    def __init__(self, output_dir: str | Path, keep: int = 2):
        self.root = Path(output_dir)
        self.keep = keep

    def list(self) -> list[Path]:
        found = [
            (int(m.group(1)), p)
            for p in self.root.glob("checkpoint-*")
            if (m := CKPT_RE.match(p.name))
        ]
        return [p for _, p in sorted(found) if (p / "state.json").exists()]

    def latest(self) -> Path | None:
        ckpts = self.list()
        return ckpts[-1] if ckpts else None

    def save(
        self, step: int, model, optimizer, scheduler, loop_state: dict, extra: dict | None = None
    ) -> Path:
        final = self.root / f"checkpoint-{step}"
        tmp = self.root / f".tmp-checkpoint-{step}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_file(trainable_state(model), tmp / "trainable.safetensors")
        torch.save(
            {
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
                "extra": extra or {},
            },
            tmp / "training_state.pt",
        )
        (tmp / "state.json").write_text(json.dumps({"step": step, **loop_state}, indent=1))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in self.list()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load(path: str | Path, model, optimizer, scheduler) -> tuple[dict, dict]:
        """Restore weights, optimizer, scheduler and RNG; returns (loop_state, extra)."""
        path = Path(path)
        if not (path / "state.json").exists():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no state.json)")
        load_trainable_state(model, load_file(path / "trainable.safetensors"))
        blob = torch.load(path / "training_state.pt", weights_only=False)
        optimizer.load_state_dict(blob["optimizer"])
        scheduler.load_state_dict(blob["scheduler"])
        set_rng_state(blob["rng"])
        return json.loads((path / "state.json").read_text()), blob.get("extra", {})
