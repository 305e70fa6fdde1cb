"""Reward model: score position, padding invariance, learnable preferences, save/load, bad rows."""

import json
import warnings

import pytest
import torch
from helpers import preference_rows, write_jsonl

from alignforge.config import build_config
from alignforge.config.rlhf import RMConfig
from alignforge.data import DataError
from alignforge.models import load_model, load_tokenizer
from alignforge.models.heads import (
    RewardModel,
    ScalarHead,
    load_reward_model,
    pad_left,
    score_index,
)
from alignforge.recipes import reward


def test_score_index_is_the_last_attended_token_for_any_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 1, 1, 0]])
    assert score_index(mask).tolist() == [4, 2, 3]
    with pytest.raises(ValueError, match="all padding"):
        score_index(torch.tensor([[0, 0]]))


def test_reward_is_read_at_the_last_token_and_ignores_padding_side(tiny_model_dir):
    torch.manual_seed(0)
    lm = load_model(tiny_model_dir)
    rm = RewardModel(lm, ScalarHead(lm.config.hidden_size)).eval()
    seqs = [[5, 6, 7, 8, 9], [11, 12, 13]]
    left = pad_left(seqs, 0)
    right_ids = torch.tensor([[5, 6, 7, 8, 9], [11, 12, 13, 0, 0]])
    right_mask = (torch.arange(5) < torch.tensor([[5], [3]])).long()
    with torch.no_grad():
        a = rm(left["input_ids"], left["attention_mask"])
        b = rm(right_ids, right_mask)
        alone = rm(torch.tensor([[11, 12, 13]]), torch.ones(1, 3, dtype=torch.long))
        h = lm.model(input_ids=torch.tensor([[11, 12, 13]])).last_hidden_state[0, -1]
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a[1], alone[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(
        alone[0], rm.head(h), atol=1e-5, rtol=1e-5
    )  # last token's hidden state


@pytest.fixture(scope="module")
def trained_rm(tiny_model_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("rm")
    data = write_jsonl(d / "pairs.jsonl", preference_rows(160))
    cfg = build_config(
        RMConfig,
        dict(
            model_name_or_path=tiny_model_dir,
            dataset=data,
            val_size=0.25,
            output_dir=str(d / "run"),
            max_length=64,
            per_device_train_batch_size=8,
            learning_rate=3e-3,
            max_steps=24,
            lora_dropout=0.0,
            progress=False,
            agreement_ceiling=0.9,
            center_rewards_coef=0.01,
        ),
    )
    return reward.run(cfg), d / "run"


def test_rm_learns_preferences_well_above_coin_flip(trained_rm):
    summary, out = trained_rm
    ev, base = summary["eval"], summary["baselines"]
    held = summary["eval_data"]  # 40 rows; a pair whose answers are equal once cut is dropped
    assert ev["n_pairs"] == held["used"] == 40 - held["dropped_identical"] >= 36
    assert ev["n_prompts"] >= ev["n_pairs"] - 3  # a few instructions repeat
    assert ev["accuracy"] >= 0.8 and ev["ci_pairs"][0] > 0.5 and ev["vs"]["coin_flip"]["beats"]
    assert ev["agreement_ceiling"] == 0.9
    assert len(ev["warnings"]) == 1 and ev["warnings"][0].startswith(f"only {ev['n_pairs']} pairs")
    # praise words, not length, decide these pairs: the RM beats the length rule and random heads
    assert ev["vs"]["longer_answer"]["beats"] and ev["vs"]["untrained_heads"]["beats"]
    assert 0.3 < base["untrained_heads"]["mean"] < 0.7 and base["coin_flip"]["accuracy"] == 0.5
    assert summary["data"]["rows"] == 120 and summary["data"]["dropped_too_long"] == 0
    scores = json.loads((out / "reward_scores_eval.json").read_text())
    assert len(scores) == 2 * ev["n_pairs"] and all(isinstance(s, float) for s in scores)
    assert (out / "final" / "reward_scores_eval.json").exists()
    assert (out / "reward_scores_eval.png").exists()


def test_saved_rm_loads_and_scores_like_the_trained_one(trained_rm):
    summary, out = trained_rm
    rm = load_reward_model(out / "final")
    rows = preference_rows(160)[120:]  # the held-out split is a random quarter; score any rows
    prompts = [r["prompt"] for r in rows[:6]]
    chosen = [r["chosen"] for r in rows[:6]]
    rejected = [r["rejected"] for r in rows[:6]]
    sc, sr = rm.score(prompts, chosen), rm.score(prompts, rejected)
    assert sum(c > r for c, r in zip(sc, sr, strict=True)) >= 5
    # batch composition does not change a score (left padding + rebuilt positions)
    assert rm.score(prompts[:1], chosen[:1])[0] == pytest.approx(sc[0], abs=1e-4)


def test_rm_needs_held_out_pairs(tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "p.jsonl", preference_rows(8))
    cfg = build_config(
        RMConfig,
        dict(model_name_or_path=tiny_model_dir, dataset=data, output_dir=str(tmp_path / "o")),
    )
    with pytest.raises(DataError, match="eval_dataset / val_size"):
        reward.run(cfg)


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_saved_rm_reproduces_the_eval_scores(tiny_model_dir, tmp_path, finetuning_type):
    rows = preference_rows(24, seed=3)
    train, held = (
        write_jsonl(tmp_path / "t.jsonl", rows[:18]),
        write_jsonl(tmp_path / "e.jsonl", rows[18:]),
    )
    cfg = build_config(
        RMConfig,
        dict(
            model_name_or_path=tiny_model_dir,
            dataset=train,
            eval_dataset=held,
            output_dir=str(tmp_path / "o"),
            finetuning_type=finetuning_type,
            max_steps=2,
            max_length=48,
            progress=False,
            bootstrap_samples=100,
        ),
    )
    reward.run(cfg)
    final = tmp_path / "o" / "final"
    assert (
        final / ("config.json" if finetuning_type == "full" else "adapter_config.json")
    ).exists()
    saved = json.loads((tmp_path / "o" / "reward_scores_eval.json").read_text())
    rm = load_reward_model(final)
    prompts = [r["prompt"] for r in rows[18:]]
    again = rm.score(prompts, [r["chosen"] for r in rows[18:]]) + rm.score(
        prompts, [r["rejected"] for r in rows[18:]]
    )
    assert again == pytest.approx(saved, abs=1e-4)


def test_full_rm_two_processes_equal_one_with_an_untied_lm_head(tiny_model_dir, tmp_path):
    """Full fine-tuning under DDP (2 gloo processes): the reward model never runs the LM head, so
    an untied head is frozen instead of stopping DDP as an unused parameter. Losses per step,
    the trained weights and the head equal a 1-process run with the same global batch."""
    from multiproc import assert_same_losses, assert_same_weights, run_two_processes
    from safetensors.torch import load_file

    lm = load_model(tiny_model_dir)
    assert lm.get_output_embeddings().weight is not lm.get_input_embeddings().weight
    assert reward.freeze_unused_lm_head(lm) and not lm.lm_head.weight.requires_grad
    assert lm.model.embed_tokens.weight.requires_grad
    rows = preference_rows(40, seed=5)
    conf = dict(
        stage="rm", model_name_or_path=tiny_model_dir,
        dataset=write_jsonl(tmp_path / "t.jsonl", rows[:32]),
        eval_dataset=write_jsonl(tmp_path / "e.jsonl", rows[32:]), finetuning_type="full",
        max_length=48, gradient_accumulation_steps=2, learning_rate=1e-3, max_steps=3,
        bootstrap_samples=100, progress=False, report_to="none",
        center_rewards_coef=0.01,  # else the head's bias has no gradient, and Adam moves it by noise
    )  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    run_two_processes({**conf, "output_dir": str(two), "per_device_train_batch_size": 2}, tmp_path)
    c1 = {**conf, "output_dir": str(one), "per_device_train_batch_size": 4}
    s1 = reward.run(build_config(RMConfig, c1))
    s2 = json.loads((two / "summary.json").read_text())
    assert_same_losses(two / "metrics.jsonl", one / "metrics.jsonl", steps=3)
    assert abs(s1["final_eval"]["loss"] - s2["final_eval"]["loss"]) < 1e-5
    assert s1["trainable_params"] == s2["trainable_params"] < s1["total_params"]
    for name in ("model.safetensors", "score_head.safetensors"):
        assert_same_weights(two / "final" / name, one / "final" / name)
    saved = load_file(two / "final/model.safetensors")
    torch.testing.assert_close(saved["lm_head.weight"], lm.lm_head.weight.detach())
    assert not torch.equal(saved["model.embed_tokens.weight"], lm.model.embed_tokens.weight)


def test_rm_and_dpo_cut_an_over_long_pair_identically(tiny_model_dir, tmp_path):
    """One length rule: the reward model, DPO and a reward model scoring one answer alone keep
    the same tokens of a pair whose prompt and answers are all over-long."""
    from alignforge.config.preference import DPOConfig
    from alignforge.models.heads import encode_pair
    from alignforge.recipes import dpo

    long = " ".join(["word"] * 80)
    row = {"prompt": "Why? " + long, "chosen": "Yes, " + long, "rejected": "No, " + long}
    data = write_jsonl(tmp_path / "p.jsonl", [row, row])
    common = dict(
        model_name_or_path=tiny_model_dir, dataset=data, eval_dataset=data,
        output_dir=str(tmp_path / "o"), max_length=40, max_prompt_length=16,
    )  # fmt: skip
    tok = load_tokenizer(tiny_model_dir)
    rm_pair = reward.load_pairs(build_config(RMConfig, common), tok)[0][0]
    dpo_pair = dpo.load_pairs(build_config(DPOConfig, common), tok)[0][0]
    assert rm_pair == dpo_pair and rm_pair.truncated
    assert len(rm_pair.prompt_ids) == 16 and len(rm_pair.chosen_ids) == 24
    alone = encode_pair(tok, row["prompt"], row["chosen"], 40, 16)
    assert alone == rm_pair.prompt_ids + rm_pair.chosen_ids
    batch = reward.PairCollator(tok.pad_token_id)([rm_pair])  # left-padded, as the RM reads it
    assert batch["input_ids"][0].tolist() == rm_pair.prompt_ids + rm_pair.chosen_ids


def test_memory_estimate_by_hand_and_the_warning(monkeypatch):
    """1 layer, hidden 10, 2 heads, 3 sequences of 4 tokens: per token 16 * 10 + 4 * 2 heads *
    4 keys = 192 floats, times 12 tokens, times 4 bytes = 9216 bytes. Checkpointing adds each
    layer's input (12 * 10 floats) to one layer's activations: 9216 + 480 = 9696."""
    from types import SimpleNamespace

    from alignforge.recipes import memory

    config = SimpleNamespace(num_hidden_layers=1, hidden_size=10, num_attention_heads=2)
    assert memory.activation_bytes(config, 3, 4, checkpointing=False) == 9216
    assert memory.activation_bytes(config, 3, 4, checkpointing=True) == 9696
    cfg = SimpleNamespace(max_length=4, per_device_train_batch_size=2, gradient_checkpointing=False)
    monkeypatch.setattr(memory, "device_memory_bytes", lambda: 100_000)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        memory.warn_if_memory_short(config, cfg, sequences_per_batch=3)  # below half of 100,000
    monkeypatch.setattr(memory, "device_memory_bytes", lambda: 10_000)
    with pytest.warns(UserWarning, match="max_length 4: about 0 GiB .* gradient_checkpointing"):
        memory.warn_if_memory_short(config, cfg, sequences_per_batch=3)
