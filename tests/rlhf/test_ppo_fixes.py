"""PPO's mathematics against TRL and the papers: dropout, where the KL goes, what the RM reads."""

import pytest
import torch
from helpers import prompt_rows, write_jsonl

from alignforge.config import build_config
from alignforge.config.rlhf import PPOConfig
from alignforge.recipes import ppo
from alignforge.rl.scoring import rm_input_ids
from alignforge.rollout.batch import rollout_batch


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("fix") / "prompts.jsonl", prompt_rows(16))


def cfg(model, data, out, **kw):
    base = dict(
        model_name_or_path=model, dataset=data, output_dir=str(out),
        reward_fn="alignforge.rl.scoring:token_fraction",
        reward_fn_kwargs={"target_ids": list(range(3, 192))},
        lora_target=["q_proj", "v_proj", "lm_head"], max_length=48, max_new_tokens=6,
        rollout_batch_size=4, mini_batch_size=4, ppo_epochs=1, kl_coef=0.5, max_steps=2,
        progress=False,
    )  # fmt: skip
    return build_config(PPOConfig, {**base, **kw})


def prepared_batch(run):
    pairs = run.next_rollouts()
    scores, _, _ = run.score(pairs)
    batch = rollout_batch([r for _, r in pairs], run.tokenizer.pad_token_id)
    return run.prepare(batch, scores)[0], scores


@pytest.mark.parametrize("disable", [True, False])
def test_dropout_is_off_so_the_first_ratio_is_one(tiny_model_dir, prompts, tmp_path, disable):
    """Old log-probs are computed in eval mode; with LoRA dropout on in training the ratio of the
    first mini-batch would already differ from 1 (TRL disables dropout for this reason)."""
    torch.manual_seed(0)
    run = ppo.PPORun(
        cfg(tiny_model_dir, prompts, tmp_path / "d", lora_dropout=0.5, disable_dropout=disable)
    )
    with torch.no_grad():  # a policy away from zero-init LoRA, so dropout changes the output
        for name, p in run.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    prepared, _ = prepared_batch(run)
    run.model.train()
    _, stats = run.minibatch_loss(prepared)
    if disable:
        assert abs(stats["policy/approx_kl"]) < 1e-6 and stats["policy/ratio_max"] == pytest.approx(
            1
        )
    else:
        assert stats["policy/approx_kl"] > 1e-4


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_grpo_puts_the_configured_kl_estimator_into_the_loss(
    tiny_model_dir, prompts, tmp_path, estimator
):
    """Before any update logps = old_logps, so the loss is
    ``(sum -A_t + beta * sum KL_t) / n`` with KL_t = ``-r`` (k1) or ``exp(r) - 1 - r`` (k3),
    ``r = ref - logp``, over the n response tokens."""
    c = cfg(tiny_model_dir, prompts, tmp_path / "g", advantage_estimator="grpo",
            num_generations=2, mini_batch_size=8, kl_estimator=estimator)  # fmt: skip
    run = ppo.PPORun(c)
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)  # the policy differs from the reference
    prepared, _ = prepared_batch(run)
    loss, _ = run.minibatch_loss(prepared)
    m, r = prepared["loss_mask"], prepared["ref_logps"] - prepared["old_logps"]
    kl = -r if estimator == "k1" else torch.exp(r) - 1 - r
    expected = ((-prepared["advantages"] * m).sum() + 0.5 * (kl * m).sum()) / m.sum()
    assert (kl * m).abs().sum() > 1e-3
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("kl_coef", [0.0, 0.5])
def test_no_reference_pass_when_nothing_reads_the_kl(
    tiny_model_dir, prompts, tmp_path, monkeypatch, kl_coef
):
    """With kl_coef 0 (fixed) the reference log-probs would only feed a logged KL, so the
    adapter-disabled pass is skipped (as TRL does at beta 0) and no `kl` is logged; the loss is
    unchanged. With a coefficient the pass runs and the KL is logged."""
    from alignforge.rl import prepare

    passes = []
    real = prepare.disabled_adapter
    monkeypatch.setattr(prepare, "disabled_adapter", lambda m: passes.append(1) or real(m))
    c = cfg(tiny_model_dir, prompts, tmp_path / "k", advantage_estimator="grpo",
            num_generations=2, mini_batch_size=8, kl_coef=kl_coef)  # fmt: skip
    run = ppo.PPORun(c)
    prepared, _ = prepared_batch(run)
    row = run.train_step()
    assert (prepared["ref_logps"] is None) == (kl_coef == 0)
    assert bool(passes) == (kl_coef > 0)
    assert ("kl" in row) == (kl_coef > 0)
    loss, _ = run.minibatch_loss(prepared)
    assert torch.isfinite(loss)


def test_rloo_puts_the_kl_into_the_reward_as_the_paper_does(tiny_model_dir, prompts, tmp_path):
    """RLOO (Ahmadian et al. 2024): the reward is ``s - beta * sum_t KL_t`` (k1), and the advantage
    is ``k/(k-1) (R_i - mean_group R)``; nothing of the KL is left for the loss."""
    c = cfg(tiny_model_dir, prompts, tmp_path / "r", advantage_estimator="rloo",
            num_generations=2, mini_batch_size=8)  # fmt: skip
    assert c.kl_in_reward_resolved and c.kl_kind == "k1"
    run = ppo.PPORun(c)
    with torch.no_grad():
        for name, p in run.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3)
    prepared, scores = prepared_batch(run)
    m = prepared["mask"]
    kl_seq = ((prepared["old_logps"] - prepared["ref_logps"]) * m).sum(-1)
    reward = (scores - 0.5 * kl_seq).view(-1, 2)
    expected = (2 * (reward - reward.mean(1, keepdim=True))).view(-1)
    got = (prepared["advantages"] * m).sum(-1) / m.sum(-1)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    loss, _ = run.minibatch_loss(prepared)
    plain = (-prepared["advantages"] * prepared["loss_mask"]).sum() / prepared["loss_mask"].sum()
    assert loss.item() == pytest.approx(plain.item(), rel=1e-5, abs=1e-6)


def test_the_reward_model_sees_a_truncated_answer_without_an_end_of_turn(tiny_model_dir):
    from alignforge.models import load_tokenizer
    from alignforge.models.heads import encode_pair
    from alignforge.rollout import chat_prompt_ids

    tok = load_tokenizer(tiny_model_dir)
    finished = rm_input_ids(tok, "Name a colour.", "red", True, 512)
    cut = rm_input_ids(tok, "Name a colour.", "red", False, 512)
    assert finished == encode_pair(tok, "Name a colour.", "red", 512)
    assert cut == chat_prompt_ids(tok, "Name a colour.") + tok.encode(
        "red", add_special_tokens=False
    )
    assert finished[: len(cut)] == cut and len(finished) > len(cut)  # only the end-of-turn differs


def test_the_reward_model_scores_over_long_rollouts_with_the_rule_it_was_trained_with(
    tiny_model_dir,
):
    """A long prompt keeps its last ``max_prompt_length`` tokens and the answer its first ones,
    as in the RM's training pairs; without the rule the answer would be cut away."""
    from alignforge.data.preference import prepare_pairs
    from alignforge.models import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    prompt, answer = "word " * 80 + "Name a colour.", "red " * 30
    row = {"prompt": prompt, "chosen": answer, "rejected": "blue"}
    (pair,), _ = prepare_pairs([row], tok, max_length=64, max_prompt_length=24)
    finished = rm_input_ids(tok, prompt, answer, True, 64, 24)
    assert finished == pair.prompt_ids + pair.chosen_ids and len(finished) == 64
    assert len(pair.prompt_ids) == 24
    cut = rm_input_ids(tok, prompt, answer, False, 64, 24)
    assert cut[:24] == pair.prompt_ids and len(cut) == 64


def test_stale_rollouts_without_a_correction_are_named(tiny_model_dir, prompts, tmp_path):
    with pytest.warns(UserWarning, match="max_staleness=1 with offpolicy_correction=none"):
        ppo.PPORun(cfg(tiny_model_dir, prompts, tmp_path / "s", max_staleness=1))


def test_batches_that_do_not_split_over_processes_are_refused():
    from alignforge.config import ConfigError

    c = PPOConfig.model_construct(rollout_batch_size=3, mini_batch_size=4, max_staleness=0)
    with pytest.raises(ConfigError, match="rollout_batch_size: 3 must be divisible by the 2"):
        ppo.check_parallel(c, 2)


@pytest.mark.parametrize("key", ["gradient_accumulation_steps", "eval_dataset", "truncation"])
def test_ppo_config_refuses_keys_it_would_ignore(key):
    from alignforge.config import ConfigError

    with pytest.raises(ConfigError, match=f"{key}: unknown key"):
        build_config(
            PPOConfig, {"dataset": "p.jsonl", "output_dir": "o", "reward_fn": "m:f", key: 2}
        )


def test_gradient_checkpointing_trains_the_policy(tiny_model_dir, prompts, tmp_path):
    s = ppo.run(
        cfg(tiny_model_dir, prompts, tmp_path / "gc", gradient_checkpointing=True, max_steps=1)
    )
    assert s["steps"] == 1


_CALLS = {"n": 0}


def counting_reward(prompts, completions, completion_ids):
    """A stateful reward: every answer earns the number of batches rewarded before it."""
    _CALLS["n"] += 1
    return [float(_CALLS["n"]) + 0.01 * len(ids) for ids in completion_ids]


counting_reward.state_dict = lambda: dict(_CALLS)
counting_reward.load_state_dict = lambda s: _CALLS.update(s)


def test_resume_restores_a_stateful_reward_function(tiny_model_dir, prompts, tmp_path):
    """The reward function's state is part of the checkpoint: after a restart (its state lost)
    the resumed run's rewards equal the uninterrupted run's."""
    import json

    kw = dict(reward_fn="test_ppo_fixes:counting_reward", reward_fn_kwargs={}, max_steps=4,
              save_steps=2)  # fmt: skip
    _CALLS["n"] = 0
    ppo.run(cfg(tiny_model_dir, prompts, tmp_path / "full", **kw))

    class Stop(Exception):
        pass

    def stop_after_3(run, row):
        if run.step == 3:
            raise Stop

    _CALLS["n"] = 0
    with pytest.raises(Stop):
        ppo.run(cfg(tiny_model_dir, prompts, tmp_path / "cut", **kw), callbacks=[stop_after_3])
    _CALLS["n"] = 0  # a new process: the function's state is gone
    ppo.run(cfg(tiny_model_dir, prompts, tmp_path / "cut", **kw))

    def rewards(out):
        rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
        return [r["reward/fn_mean"] for r in rows if r["split"] == "train"]

    assert rewards(tmp_path / "cut") == pytest.approx(rewards(tmp_path / "full"))
    assert rewards(tmp_path / "full")[3] > 4  # the fourth batch saw three before it
