"""Recipes: one readable file per training method, picked by a config's ``stage:``."""

from __future__ import annotations

import importlib
from pathlib import Path

from alignforge.config import ConfigError, load_config, read_yaml
from alignforge.config.base import deep_merge, parse_overrides

# stage -> module with `CONFIG` (the pydantic class) and `run(cfg)`
STAGES = {
    "sft": "alignforge.recipes.sft",
    "rm": "alignforge.recipes.reward",
    "dpo": "alignforge.recipes.dpo",
    "spin": "alignforge.recipes.spin",
    "ppo": "alignforge.recipes.ppo",
}
# stage -> its config class, read by `alignforge train --help` without importing the recipe (and
# torch); a stage missing here is read from its recipe's CONFIG
CONFIGS = {
    "sft": "alignforge.config.stages:SFTConfig",
    "rm": "alignforge.config.rlhf:RMConfig",
    "dpo": "alignforge.config.preference:DPOConfig",
    "spin": "alignforge.config.preference:SPINConfig",
    "ppo": "alignforge.config.rlhf:PPOConfig",
}


def stage_config(stage: str):
    """The config class of ``stage``."""
    if stage in CONFIGS:
        module, name = CONFIGS[stage].split(":")
        return getattr(importlib.import_module(module), name)
    return importlib.import_module(STAGES[stage]).CONFIG


def _stage(config_path: str | None, overrides: list[str]):
    data = read_yaml(config_path) if config_path else {}
    return deep_merge(data, parse_overrides(overrides)).get("stage")


def resolve_stage(config_path: str | None, overrides: list[str]):
    """Read a config, apply overrides, and return (recipe module, validated config)."""
    stage = _stage(config_path, overrides)
    if stage not in STAGES:
        raise ConfigError(
            f"stage: got {stage!r}; allowed values: {', '.join(STAGES)}"
            + (f" (in {config_path})" if config_path else "")
        )
    try:
        module = importlib.import_module(STAGES[stage])
    except ModuleNotFoundError as e:
        raise ConfigError(f"stage: {stage!r} is not available in this install ({e})") from e
    return module, load_config(module.CONFIG, config_path, overrides)


def train_help(config: str | None, overrides: list[str]) -> str:
    """``alignforge train --help``: the stages, or the keys of the stage that ``config`` (a YAML
    file, a stage name or a ``stage=NAME`` override) and ``overrides`` pick."""
    from alignforge.config.help import keys_help, stages_help

    if config in STAGES:
        config, overrides = None, [f"stage={config}", *overrides]
    elif config and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]
    stage = _stage(config, overrides)
    if stage is None:
        return stages_help({s: stage_config(s) for s in STAGES})
    if stage not in STAGES:
        raise ConfigError(f"stage: got {stage!r}; allowed values: {', '.join(STAGES)}")
    return keys_help(stage_config(stage), stage)


def run_stage(config_path: str | None, overrides: list[str]):
    module, cfg = resolve_stage(config_path, overrides)
    result = module.run(cfg)
    close_process_group()
    return result


def close_process_group() -> None:
    """After a multi-process run, wait for every process, then tear the process group down:
    left to interpreter exit, its communication threads can be destroyed while still running
    and abort the process ("terminate called without an active exception") after a run that
    finished and saved everything."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
