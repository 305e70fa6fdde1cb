"""The shipped example configs validate and map to the right recipes."""

import os

from alignforge.recipes import resolve_stage

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def test_example_configs_resolve_to_their_recipes():
    for name, stage in (("dpo", "dpo"), ("spin", "spin")):
        module, cfg = resolve_stage(os.path.join(ROOT, "examples", f"{name}.yaml"), ["max_steps=2"])
        assert module.__name__ == f"alignforge.recipes.{stage}" and cfg.stage == stage
        assert os.path.exists(os.path.join(ROOT, cfg.dataset))
