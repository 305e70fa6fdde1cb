"""scripts/gpu_check.py: its placement guard (in a subprocess: the hook is global to a process)
and its recipe overrides, which must stay valid configs as the stage configs change."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from alignforge.recipes import resolve_stage

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402

CODE = """
import sys
sys.path.insert(0, "scripts")
import torch, gpu_check
seen = gpu_check.install_placement_guard(sys.argv[1])
lin = torch.nn.Linear(2, 2)
lin(torch.zeros(1, 2))
print("ran", seen["calls"], seen["trainable"])
"""


def run(device: str):
    return subprocess.run(
        [sys.executable, "-c", CODE, device], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_guard_passes_modules_on_the_run_device():
    proc = run("cpu")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "ran 1 2" in proc.stdout  # one call; weight and bias counted as trainable


def test_guard_names_the_module_and_tensor_off_the_run_device():
    proc = run("cuda")
    assert proc.returncode != 0
    assert "PlacementError: Linear: parameter weight (2, 2) is on cpu, not cuda" in proc.stderr


@pytest.mark.parametrize("tiny", [False, True])
@pytest.mark.parametrize("name", list(gpu_check.RECIPES))
def test_recipe_overrides_are_valid_configs(name, tiny, tmp_path):
    args = argparse.Namespace(
        tiny=tiny, steps=2, model="default", out=str(tmp_path), run_name=name, precision="bf16"
    )
    example = str(ROOT / gpu_check.RECIPES[name][0])
    overrides = [
        gpu_check.as_override(k, v) for k, v in gpu_check.overrides_for(name, args).items()
    ]
    module, cfg = resolve_stage(example, overrides)
    assert cfg.bf16 and cfg.max_steps == 2 and cfg.output_dir == str(tmp_path / name)
