"""PPO on a tiny model: reward rises, exact resume, drift actions, off-policy rejection."""

import json
import math

import pytest
from helpers import prompt_rows, write_jsonl

from alignforge.config import build_config
from alignforge.config.rlhf import PPOConfig
from alignforge.recipes import ppo
from alignforge.rl.policy import token_logps
from alignforge.rollout.batch import rollout_batch, trim_padding

# LoRA on the LM head too: a randomly initialised tiny model's logits are nearly flat, and only
# the head can sharpen them within a few steps.
TARGET = ["q_proj", "v_proj", "up_proj", "down_proj", "lm_head"]
TIMING = ("time/", "tokens_per_s")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("ppo") / "prompts.jsonl", prompt_rows(32))


def cfg(model, data, out, **kw):
    base = dict(
        model_name_or_path=model,
        dataset=data,
        output_dir=str(out),
        reward_fn="alignforge.rl.scoring:token_fraction",
        reward_fn_kwargs={"target_ids": list(range(3, 192))},
        lora_target=TARGET,
        lora_dropout=0.0,
        max_length=48,
        max_new_tokens=8,
        rollout_batch_size=8,
        mini_batch_size=8,
        ppo_epochs=1,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        kl_coef=0.01,
        max_steps=4,
        progress=False,
    )
    return build_config(PPOConfig, {**base, **kw})


def rows(out, split="train"):
    return [json.loads(x) for x in open(out / "metrics.jsonl") if json.loads(x)["split"] == split]


def test_reward_rises(tiny_model_dir, prompts, tmp_path):
    s = ppo.run(
        cfg(
            tiny_model_dir,
            prompts,
            tmp_path / "run",
            max_steps=24,
            rollout_batch_size=16,
            ppo_epochs=2,
            learning_rate=1e-2,
        )
    )
    assert s["reward_last_quarter"] > s["reward_first_quarter"] + 0.08, s
    r = rows(tmp_path / "run")
    for key in (
        "reward/mean",
        "kl",
        "policy/clipfrac",
        "value/loss",
        "offpolicy/kl_k3",
        "offpolicy/ess",
        "time/generate",
        "time/score",
        "time/train",
    ):
        assert key in r[0], key
    assert abs(r[0]["offpolicy/kl_k3"]) < 1e-4  # same engine: behaviour == trainer log-probs
    assert (tmp_path / "run/final/adapter_config.json").exists()
    assert (tmp_path / "run/final/value/value_head.safetensors").exists()
    assert len((tmp_path / "run/reward_scores_policy.jsonl").read_text().splitlines()) == 24


class Interrupt(Exception):
    pass


def test_exact_resume(tiny_model_dir, prompts, tmp_path):
    kw = dict(
        max_steps=4,
        save_steps=2,
        max_staleness=1,
        rollout_batch_size=4,
        mini_batch_size=2,
        ppo_epochs=2,
        adaptive_kl=True,
        kl_target=0.5,
        kl_horizon=100,
    )
    ppo.run(cfg(tiny_model_dir, prompts, tmp_path / "full", **kw))

    def stop_after_3(run, row):
        if run.step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        ppo.run(cfg(tiny_model_dir, prompts, tmp_path / "cut", **kw), callbacks=[stop_after_3])
    s = ppo.run(cfg(tiny_model_dir, prompts, tmp_path / "cut", **kw))
    assert s["resumed_from"].endswith("checkpoint-2")
    full, cut = rows(tmp_path / "full"), rows(tmp_path / "cut")
    assert [r["step"] for r in cut] == [1, 2, 3, 4]
    for a, b in zip(full, cut, strict=True):
        for k in a:
            if not k.startswith(TIMING):
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)
    assert (tmp_path / "cut/reward_scores_policy.jsonl").read_text() == (
        tmp_path / "full/reward_scores_policy.jsonl"
    ).read_text()


@pytest.fixture(scope="module")
def far_reference(tmp_path_factory):
    p = tmp_path_factory.mktemp("drift") / "ref.json"
    p.write_text(json.dumps([100.0 + 0.1 * i for i in range(50)]))
    return str(p)


def drift_cfg(tiny_model_dir, prompts, out, ref, action, **kw):
    return cfg(
        tiny_model_dir,
        prompts,
        out,
        drift_reference=ref,
        drift_action=action,
        drift_min_samples=8,
        rollout_batch_size=4,
        max_steps=3,
        **kw,
    )


def test_drift_warn_logs_and_continues(tiny_model_dir, prompts, far_reference, tmp_path):
    with pytest.warns(UserWarning, match="reward drift at PPO step 2"):
        s = ppo.run(drift_cfg(tiny_model_dir, prompts, tmp_path / "w", far_reference, "warn"))
    assert s["steps"] == 3 and s["stopped"] is None
    assert [e["event"] for e in s["drift_events"]] == ["drift_warn", "drift_warn"]
    r = rows(tmp_path / "w")
    assert r[0]["drift/breached"] == 0.0 and r[1]["drift/breached"] == 1.0
    assert r[1]["drift/outlier_frac"] == 1.0 and r[1]["drift/reference_mean"] > 100


def test_drift_stop_ends_the_run_with_a_message(tiny_model_dir, prompts, far_reference, tmp_path):
    s = ppo.run(drift_cfg(tiny_model_dir, prompts, tmp_path / "s", far_reference, "stop"))
    assert s["steps"] == 2 and "reward drift at PPO step 2" in s["stopped"]
    assert (
        "outlier_frac" in s["stopped"]
        and json.loads((tmp_path / "s/summary.json").read_text())["stopped"]
    )


def test_drift_restore_reloads_checkpoint_and_lowers_lr(
    tiny_model_dir, prompts, far_reference, tmp_path
):
    out = tmp_path / "r"
    c = drift_cfg(
        tiny_model_dir,
        prompts,
        out,
        far_reference,
        "restore",
        save_steps=1,
        drift_max_restores=1,
        drift_lr_factor=0.25,
    )
    s = ppo.run(c)
    events = s["drift_events"]
    assert [e["event"] for e in events] == ["drift_restore", "drift_stop"]
    assert events[0]["restored_step"] == 1 and events[0]["lr_scale"] == 0.25
    assert events[0]["restored_from"].endswith("checkpoint-1")
    r = rows(out)
    assert [x["step"] for x in r] == [1, 2]  # the drifted step 2 was rolled back and re-run
    assert r[0]["lr"] == pytest.approx(3e-3) and r[1]["lr"] == pytest.approx(3e-3 * 0.25)
    assert "restores so far 1" in s["stopped"]


def test_rejection_removes_tokens_from_the_loss_denominator(tiny_model_dir, prompts, tmp_path):
    """int8 behaviour policy + IcePop-style token masking inside a real PPO step.

    Before any update logps == old_logps, so each token's clipped loss is -A_t * w_t and the
    step's policy loss must be sum(-A w over kept tokens) / (number of kept tokens).
    """
    c = cfg(
        tiny_model_dir,
        prompts,
        tmp_path / "m",
        rollout_precision="int8",
        offpolicy_correction="mask",
        offpolicy_lower=0.9995,
        offpolicy_upper=1.0005,
        advantage_estimator="reinforce_pp",
    )
    run = ppo.PPORun(c)
    pairs = run.next_rollouts()
    rollouts = [r for _, r in pairs]
    scores, _, _ = run.score(pairs)
    prepared, stats = run.prepare(rollout_batch(rollouts, run.tokenizer.pad_token_id), scores)
    mask, kept = prepared["mask"], prepared["loss_mask"]
    assert stats["offpolicy/kl_k3"] > 0  # int8 sampling differs from the fp32 trainer
    assert 0 < kept.sum() < mask.sum() and stats["offpolicy/frac_masked"] == pytest.approx(
        1 - float(kept.sum() / mask.sum()), abs=1e-6
    )
    loss, mb_stats = run.minibatch_loss(prepared)
    expected = (-prepared["advantages"] * prepared["weights"] * kept).sum() / kept.sum()
    wrong = (-prepared["advantages"] * prepared["weights"] * kept).sum() / mask.sum()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4, abs=1e-6)
    assert not math.isclose(loss.item(), wrong.item(), rel_tol=1e-3)
    assert mb_stats["policy/loss_tokens"] == kept.sum().item()
    # the full step logs the denominator it used: the tokens the rejection kept
    row = run.train_step()
    assert row["policy/loss_tokens"] <= row["response_tokens"]
    assert row["policy/loss_tokens"] == pytest.approx(
        row["response_tokens"] * (1 - row["offpolicy/frac_masked"])
    )


@pytest.mark.parametrize("estimator", ["grpo", "rloo", "reinforce_pp"])
def test_critic_free_estimators_run_without_a_value_model(
    tiny_model_dir, prompts, tmp_path, estimator
):
    s = ppo.run(
        cfg(
            tiny_model_dir,
            prompts,
            tmp_path / "g",
            advantage_estimator=estimator,
            num_generations=2,
            rollout_batch_size=2,
            mini_batch_size=2,
            max_steps=2,
        )
    )
    r = rows(tmp_path / "g")
    assert s["steps"] == 2 and "value/loss" not in r[0] and "policy/loss" in r[0]
    assert not (tmp_path / "g/final/value").exists()


def bad_reward(prompts, completions, completion_ids):
    return [float("nan")] * len(prompts)


def test_non_finite_rewards_and_losses_stop_with_a_clear_error(
    tiny_model_dir, prompts, tmp_path, monkeypatch
):
    with pytest.raises(ValueError, match="need one finite float per completion"):
        ppo.run(
            cfg(
                tiny_model_dir,
                prompts,
                tmp_path / "a",
                reward_fn="test_ppo:bad_reward",
                reward_fn_kwargs={},
            )
        )
    run = ppo.PPORun(cfg(tiny_model_dir, prompts, tmp_path / "b"))
    real = run.minibatch_loss
    monkeypatch.setattr(run, "minibatch_loss", lambda mb, *a: (real(mb, *a)[0] * float("nan"), {}))
    with pytest.raises(
        ppo.NonFiniteLossError, match="loss is nan at step 1.*no checkpoint was written yet"
    ):
        run.train_step()


@pytest.mark.parametrize("target", [TARGET, ["q_proj", "v_proj"]], ids=["lora-head", "frozen-head"])
def test_masked_token_logps_equal_full_ones_and_trimming_keeps_them(
    tiny_model_dir, prompts, tmp_path, target
):
    """Scoring only the response positions (head on those rows alone, at a temperature) gives the
    full forward's log-probs there; cutting the right padding changes nothing either."""
    import torch

    run = ppo.PPORun(
        cfg(tiny_model_dir, prompts, tmp_path / "m", lora_target=target, temperature=0.7)
    )
    rollouts = [r for _, r in run.next_rollouts()]
    batch = rollout_batch(rollouts, run.tokenizer.pad_token_id)
    pad = {k: v for k, v in batch.items()}  # one more padding column than any row needs
    pad["input_ids"] = torch.cat([batch["input_ids"], batch["input_ids"][:, :1]], 1)
    pad["attention_mask"] = torch.cat(
        [batch["attention_mask"], torch.zeros_like(batch["attention_mask"][:, :1])], 1
    )
    for k in ("mask", "rollout_logps"):
        pad[k] = torch.cat([batch[k], torch.zeros_like(batch[k][:, :1])], 1)
    with torch.no_grad():
        full = token_logps(run.model, {k: v for k, v in pad.items() if k != "mask"}, 0.7)
        masked = token_logps(run.model, pad, 0.7)
        trimmed = token_logps(run.model, trim_padding(pad), 0.7)
    m = pad["mask"].bool()
    assert m.sum() > 0
    torch.testing.assert_close(masked[m], full[m], rtol=1e-4, atol=1e-5)
    assert (masked[~m] == 0).all()
    assert trimmed.shape[1] == masked.shape[1] - 1
    torch.testing.assert_close(trimmed, masked[:, :-1], rtol=1e-4, atol=1e-5)
