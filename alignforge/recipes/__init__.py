"""Recipes: one readable file per training method, picked by a config's ``stage:``."""

from __future__ import annotations

import importlib

from alignforge.config import ConfigError, read_yaml
from alignforge.config.base import deep_merge, parse_overrides

# stage -> module with `CONFIG` (the pydantic class) and `run(cfg)`
STAGES = {
    "sft": "alignforge.recipes.sft",
    "rm": "alignforge.recipes.reward",
    "dpo": "alignforge.recipes.dpo",
    "spin": "alignforge.recipes.spin",
    "ppo": "alignforge.recipes.ppo",
}


def resolve_stage(config_path: str | None, overrides: list[str]):
    """Read a config, apply overrides, and return (recipe module, validated config)."""
    from alignforge.config import build_config

    data = read_yaml(config_path) if config_path else {}
    data = deep_merge(data, parse_overrides(overrides))
    stage = data.get("stage")
    if stage not in STAGES:
        raise ConfigError(
            f"stage: got {stage!r}; allowed values: {', '.join(STAGES)}"
            + (f" (in {config_path})" if config_path else "")
        )
    try:
        module = importlib.import_module(STAGES[stage])
    except ModuleNotFoundError as e:
        raise ConfigError(f"stage: {stage!r} is not available in this install ({e})") from e
    return module, build_config(module.CONFIG, data, str(config_path or ""))


def run_stage(config_path: str | None, overrides: list[str]):
    module, cfg = resolve_stage(config_path, overrides)
    return module.run(cfg)
