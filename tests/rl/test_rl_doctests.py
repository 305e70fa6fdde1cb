import doctest
import importlib

import pytest

MODULES = [
    "alignforge.losses.reduce",
    "alignforge.losses.logprobs",
    "alignforge.losses.sft",
    "alignforge.losses.pairwise",
    "alignforge.losses.preference",
    "alignforge.losses.ppo",
    "alignforge.losses.importance",
    "alignforge.rl.kl",
    "alignforge.rl.advantages",
    "alignforge.rl.rewards",
    "alignforge.rl.drift",
]


@pytest.mark.parametrize("name", MODULES)
def test_module_docstring_examples_run(name):
    result = doctest.testmod(importlib.import_module(name))
    assert result.attempted > 0 and result.failed == 0


def test_losses_and_rl_import_torch_only():
    import subprocess
    import sys

    code = (
        "import sys, importlib\n"
        f"for m in {MODULES!r}: importlib.import_module(m)\n"
        "heavy = [m for m in ('transformers', 'accelerate', 'peft', 'scipy') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
