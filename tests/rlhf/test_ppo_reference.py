"""The PPO reference is the merged SFT checkpoint; an unmerged adapter is refused."""

import pytest
import torch
from helpers import prompt_rows, write_jsonl

from alignforge.config import ConfigError, build_config
from alignforge.config.rlhf import PPOConfig
from alignforge.models import disabled_adapter, load_model, load_tokenizer, merge_adapter, wrap_lora
from alignforge.recipes import ppo
from alignforge.rl.policy import POLICY, VALUE, build_policy, use_adapter
from alignforge.rl.scoring import load_reward_fn


@pytest.fixture(scope="module")
def sft_dirs(tiny_model_dir, tmp_path_factory):
    """An SFT LoRA adapter with non-zero weights, and its merge."""
    d = tmp_path_factory.mktemp("sft")
    torch.manual_seed(1)
    model = wrap_lora(load_model(tiny_model_dir), rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(d / "adapter")
    load_tokenizer(tiny_model_dir).save_pretrained(d / "adapter")
    merge_adapter(str(d / "adapter"), str(d / "merged"))
    return d / "adapter", d / "merged"


def _cfg(model, tmp_path, **kw):
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(8))
    base = dict(
        model_name_or_path=str(model),
        dataset=data,
        output_dir=str(tmp_path / "run"),
        reward_fn="alignforge.rl.scoring:length_reward",
        reward_fn_kwargs={"target_length": 4},
        lora_dropout=0.0,
        progress=False,
    )
    return build_config(PPOConfig, {**base, **kw})


def test_reference_logits_equal_the_merged_sft_checkpoint(sft_dirs, tiny_model_dir, tmp_path):
    _, merged = sft_dirs
    policy, head = build_policy(
        str(merged),
        dtype="float32",
        lora=dict(r=8, lora_alpha=16, target_modules="all-linear"),
        with_critic=True,
    )
    with torch.no_grad():  # a policy that has moved away from the reference
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    ids = torch.tensor([[5, 17, 42, 99, 3, 250]])
    with torch.no_grad():
        with disabled_adapter(policy):
            ref = policy(input_ids=ids).logits
        sft = load_model(str(merged))(input_ids=ids).logits
        base = load_model(tiny_model_dir)(input_ids=ids).logits
        moved = policy(input_ids=ids).logits
    torch.testing.assert_close(ref, sft, atol=1e-5, rtol=1e-5)
    assert (
        ref - base
    ).abs().max() > 1e-2  # the SFT adapter is in the reference, not the base model
    assert (moved - ref).abs().max() > 1e-2
    # the critic adapter is off for the reference too
    use_adapter(policy, VALUE)
    with torch.no_grad(), disabled_adapter(policy):
        torch.testing.assert_close(policy(input_ids=ids).logits, sft, atol=1e-5, rtol=1e-5)
    use_adapter(policy, POLICY)


def test_unmerged_sft_adapter_is_refused(sft_dirs, tmp_path):
    adapter, _ = sft_dirs
    with pytest.raises(ConfigError, match=r"unmerged PEFT adapter.*BASE model.*alignforge merge"):
        ppo.run(_cfg(adapter, tmp_path))


def test_config_errors_name_the_field(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="finetuning_type"):
        _cfg(tiny_model_dir, tmp_path, finetuning_type="full")
    with pytest.raises(ConfigError, match="num_generations"):
        _cfg(tiny_model_dir, tmp_path, advantage_estimator="grpo")
    with pytest.raises(ConfigError, match="reward_model / reward_fn"):
        _cfg(tiny_model_dir, tmp_path, reward_fn=None)
    with pytest.raises(ConfigError, match="offpolicy_correction: bypass"):
        _cfg(
            tiny_model_dir, tmp_path, offpolicy_old_logps="bypass", offpolicy_correction="truncate"
        )
    with pytest.raises(ConfigError, match="drift_action"):
        _cfg(tiny_model_dir, tmp_path, drift_action="stop")
    with pytest.raises(ConfigError, match="reward_fn: cannot load"):
        load_reward_fn("alignforge.rl.scoring:nope")
