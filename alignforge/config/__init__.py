from alignforge.config.base import (
    ConfigError,
    StrictModel,
    build_config,
    load_config,
    parse_overrides,
    read_yaml,
    save_config,
)

__all__ = [
    "ConfigError",
    "StrictModel",
    "build_config",
    "load_config",
    "parse_overrides",
    "read_yaml",
    "save_config",
]
