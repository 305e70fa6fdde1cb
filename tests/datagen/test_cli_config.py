"""`alignforge data instructions` and `data preferences` take a YAML file with key=value
overrides, or key=value settings alone."""

import pytest

from alignforge.config import ConfigError
from alignforge.datagen.cli import _load_config
from alignforge.datagen.configs import InstructionsConfig, PreferencesConfig


def test_key_value_settings_alone_need_no_yaml_file():
    cfg = _load_config(
        InstructionsConfig,
        "input=runs/chunks.jsonl",
        ["output_dir=runs/instr", "base_url=http://h/v1"],
    )
    assert (cfg.input, cfg.output_dir, cfg.base_url) == (
        "runs/chunks.jsonl",
        "runs/instr",
        "http://h/v1",
    )
    cfg = _load_config(
        PreferencesConfig, "prompts=p.jsonl", ["model=m", "output_dir=o", "max_samples=3"]
    )
    assert (cfg.prompts, cfg.max_samples, cfg.k) == ("p.jsonl", 3, 4)


def test_a_yaml_file_with_overrides_and_a_missing_one(tmp_path):
    path = tmp_path / "prefs.yaml"
    path.write_text("prompts: p.jsonl\nmodel: m\noutput_dir: o\nk: 4\n")
    cfg = _load_config(PreferencesConfig, str(path), ["k=2"])
    assert (cfg.prompts, cfg.k) == ("p.jsonl", 2)
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        _load_config(PreferencesConfig, str(tmp_path / "missing.yaml"), ["k=2"])
    with pytest.raises(ConfigError, match="teacher: unknown key"):  # the keys are flat: base_url
        _load_config(
            InstructionsConfig, "input=c.jsonl", ["output_dir=o", "teacher.base_url=http://h/v1"]
        )
