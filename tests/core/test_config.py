import pytest
import yaml

from alignforge.config import ConfigError, load_config, parse_overrides
from alignforge.config.stages import SFTConfig
from alignforge.recipes import resolve_stage


def write(tmp_path, data):
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_overrides_parse_yaml_scalars_and_dotted_keys():
    assert parse_overrides(["a=1", "b=1e-4", "c=true", "d=[x, y]", "e.f=hi", "g="]) == {
        "a": 1,
        "b": 1e-4,
        "c": True,
        "d": ["x", "y"],
        "e": {"f": "hi"},
        "g": "",
    }
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["novalue"])


def test_override_beats_file(tmp_path):
    p = write(
        tmp_path, {"stage": "sft", "dataset": "d.jsonl", "output_dir": "o", "learning_rate": 1e-3}
    )
    cfg = load_config(SFTConfig, p, ["learning_rate=5e-5", "lora_rank=4"])
    assert cfg.learning_rate == 5e-5 and cfg.lora_rank == 4


def test_unknown_key_names_field_and_suggests(tmp_path):
    p = write(tmp_path, {"stage": "sft", "dataset": "d", "output_dir": "o", "learning_rat": 1e-3})
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, p)
    msg = str(e.value)
    assert "learning_rat: unknown key" in msg and "did you mean learning_rate" in msg


def test_bad_literal_lists_allowed_values(tmp_path):
    p = write(
        tmp_path, {"stage": "sft", "dataset": "d", "output_dir": "o", "finetuning_type": "lora8"}
    )
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, p)
    assert "finetuning_type" in str(e.value) and "'full', 'lora' or 'qlora'" in str(e.value)


def test_bad_range_and_missing_field(tmp_path):
    p = write(tmp_path, {"stage": "sft", "output_dir": "o", "lora_rank": 0})
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, p)
    assert "lora_rank" in str(e.value) and "dataset: Field required" in str(e.value)


def test_stage_selects_recipe_and_unknown_stage_fails(tmp_path):
    p = write(tmp_path, {"stage": "sft", "dataset": "d", "output_dir": "o"})
    module, cfg = resolve_stage(str(p), ["packing=false"])
    assert module.__name__ == "alignforge.recipes.sft" and cfg.packing is False
    with pytest.raises(ConfigError, match="stage: got 'sftt'; allowed values: sft"):
        resolve_stage(str(p), ["stage=sftt"])


def test_missing_and_invalid_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(SFTConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(SFTConfig, bad)


@pytest.mark.parametrize(
    "stage, key, value",
    [
        ("sft", "beta", 0.1),  # a preference-loss setting
        ("sft", "share_prompt", True),
        ("rm", "padding_free", True),  # the RM scores left-padded pairs, always
        ("rm", "packing", True),
        ("dpo", "num_iterations", 2),
        ("spin", "precompute_ref_logps", True),  # SPIN scores its opponent every iteration anyway
        ("spin", "use_margin", True),
    ],
)
def test_each_stage_rejects_a_key_its_recipe_does_not_read(tmp_path, stage, key, value):
    """A config holds only what its recipe reads, so a key that would do nothing is an error."""
    p = write(tmp_path, {"stage": stage, "dataset": "d", "output_dir": "o", key: value})
    with pytest.raises(ConfigError, match=f"{key}: unknown key"):
        load_config(stage_configs()[stage], p)


def test_each_stage_takes_the_attention_backend(tmp_path):
    for stage, cls in stage_configs().items():
        p = write(tmp_path, {"stage": stage, "dataset": "d", "output_dir": "o"})
        assert load_config(cls, p, ["attn_implementation=eager"]).attn_implementation == "eager"


def stage_configs():
    """The config class of each training stage (what ``recipes.<stage>.CONFIG`` is)."""
    from alignforge.config.preference import DPOConfig, SPINConfig
    from alignforge.config.rlhf import RMConfig

    return {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig, "spin": SPINConfig}


def test_a_whole_config_check_names_its_field_without_echoing_the_config(tmp_path):
    p = write(tmp_path, {"stage": "sft", "dataset": "d", "output_dir": "o", "bf16": True})
    with pytest.raises(ConfigError) as e:
        load_config(SFTConfig, p, ["fp16=true"])
    assert str(e.value).splitlines()[1:] == [
        "  bf16 and fp16: choose one mixed precision, not both"
    ]
