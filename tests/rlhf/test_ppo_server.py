"""PPO drawing its rollouts from ``alignforge serve`` in a subprocess (``rollout_engine: server``):
the same training as in process, the policy's adapter really loaded after each update, rollouts
drawn a step ahead in the background, and a server that dies mid-run."""

import json

import pytest
import torch
from helpers import prompt_rows, write_jsonl
from serve_process import ServeProcess

from alignforge.config import ConfigError, build_config
from alignforge.config.rlhf import PPOConfig
from alignforge.errors import UserError
from alignforge.recipes import ppo
from alignforge.rl.policy import token_logps
from alignforge.rollout.batch import rollout_batch

COMPARED = ("reward/mean", "kl", "policy/loss", "value/loss", "response_tokens")


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("ppo-server") / "prompts.jsonl", prompt_rows(16))


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    running = ServeProcess(tiny_model_dir, tmp_path_factory.mktemp("serve") / "log").start()
    yield running
    running.stop()


def cfg(model, data, out, **kw):
    base = dict(
        model_name_or_path=model, dataset=data, output_dir=str(out),
        reward_fn="alignforge.rl.scoring:token_fraction",
        reward_fn_kwargs={"target_ids": list(range(3, 192))},
        lora_target=["q_proj", "v_proj", "lm_head"], lora_dropout=0.0, max_length=48,
        max_new_tokens=6, rollout_batch_size=4, mini_batch_size=4, ppo_epochs=1,
        learning_rate=1e-2, lr_scheduler_type="constant", kl_coef=0.05, max_steps=2,
        progress=False,
    )  # fmt: skip
    return build_config(PPOConfig, {**base, **kw})


def rows(out):
    return [r for r in map(json.loads, open(out / "metrics.jsonl")) if r["split"] == "train"]


def test_a_server_run_trains_what_an_in_process_run_trains(
    tiny_model_dir, prompts, server, tmp_path
):
    """fp32 server, same seeds: each step's rollouts are the in-process engine's, so rewards,
    KL and losses agree; at step 2 that holds only if the step-1 adapter was loaded. After the
    update the server's log-probs of its own samples are the trainer's new policy's."""
    checked = []

    def server_is_the_new_policy(run, row):
        name = run.rollouts.sync.publish(run.model, run.step)  # what the next batch will use
        engine = run.rollouts.make_engine(run.step)
        assert engine.model == name == f"policy-step-{run.step}"
        [group] = engine.generate(
            [run.prompt_ids[0]], n=2, temperature=1.0, max_new_tokens=6, seed=9
        )
        batch = rollout_batch(group, run.tokenizer.pad_token_id)
        was_training = run.model.training
        with torch.no_grad():
            trainer = token_logps(run.model.eval(), batch, 1.0)
        run.model.train(was_training)
        assert torch.allclose(trainer * batch["mask"], batch["rollout_logps"], atol=1e-5)
        assert all(r.policy_version == str(run.step) for r in group)
        checked.append(run.step)

    remote = ppo.run(cfg(tiny_model_dir, prompts, tmp_path / "server", rollout_engine="server",
                         rollout_base_url=server.base_url, rollout_model="tiny"),
                     callbacks=[server_is_the_new_policy])  # fmt: skip
    ppo.run(cfg(tiny_model_dir, prompts, tmp_path / "local"))
    assert checked == [1, 2] and remote["rollout_engine"] == "server"
    for a, b in zip(rows(tmp_path / "server"), rows(tmp_path / "local"), strict=True):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
        assert a["staleness"] == 0 and abs(a["offpolicy/kl_k3"]) < 1e-6
    scores = [json.loads(x) for x in open(tmp_path / "server/reward_scores_policy.jsonl")]
    assert [s["policy_version"] for s in scores] == ["0", "1"]
    sent = tmp_path / "server/rollout_policy/slot-0"
    assert (sent / "adapter_config.json").exists() and not (sent / "value").exists()


def test_one_step_stale_rollouts_are_drawn_in_the_background(
    tiny_model_dir, prompts, server, tmp_path
):
    """max_staleness 1: batch g is drawn by the policy of step g-1 while step g-1 trains; the
    correction's diagnostics see the lag; at most two adapters are loaded at a time."""
    out, loaded = tmp_path / "stale", []
    s = ppo.run(cfg(tiny_model_dir, prompts, out, rollout_engine="server", max_steps=3,
                    rollout_base_url=[server.base_url], max_staleness=1,
                    offpolicy_correction="truncate"),
                callbacks=[lambda run, row: loaded.append(server.adapters())])  # fmt: skip
    assert s["steps"] == 3 and s["max_staleness"] == 1
    r = rows(out)
    assert [x["staleness"] for x in r] == [0, 1, 1]
    versions = [json.loads(x)["policy_version"] for x in open(out / "reward_scores_policy.jsonl")]
    assert versions == ["0", "0", "1"]
    assert abs(r[0]["offpolicy/kl_k3"]) < 1e-6 < abs(r[2]["offpolicy/kl_k3"])
    for key in ("offpolicy/ess", "offpolicy/weight_max", "offpolicy/frac_truncated"):
        assert key in r[2], key
    assert all(len(names) <= 2 for names in loaded), loaded
    assert server.adapters() == []  # unloaded at the end of the run
    assert sorted(p.name for p in (out / "rollout_policy").iterdir()) == ["slot-0", "slot-1"]


def test_a_dead_server_stops_the_run_and_the_same_command_resumes(
    tiny_model_dir, prompts, tmp_path
):
    """The server dies after step 2 (checkpoint-2 saved): step 3 fails after the retries with one
    line naming the URL and the checkpoint; with the server back, the same config resumes."""
    running = ServeProcess(tiny_model_dir, tmp_path / "serve.log").start()
    conf = cfg(tiny_model_dir, prompts, tmp_path / "run", rollout_engine="server", max_steps=3,
               save_steps=1, rollout_base_url=running.base_url)  # fmt: skip

    def kill_after_2(run, row):
        if run.step == 2:
            running.stop()

    try:
        with pytest.raises(UserError) as info:
            ppo.run(conf, callbacks=[kill_after_2])
        message = str(info.value)
        assert "\n" not in message
        assert f"rollout server failed at PPO step 3: {running.base_url}/" in message
        assert "no response after 5 attempt(s)" in message and "checkpoint-2" in message
        running.start()
        s = ppo.run(conf)
    finally:
        running.stop()
    assert s["resumed_from"].endswith("checkpoint-2") and s["steps"] == 3
    assert [x["step"] for x in rows(tmp_path / "run")] == [1, 2, 3]


@pytest.mark.parametrize(
    ("kw", "match"),
    [
        (dict(rollout_engine="server"), "rollout_base_url: rollout_engine server needs"),
        (dict(rollout_base_url="http://x:8000/v1"), "rollout_base_url: only read with rollout_engine: server"),
        (dict(rollout_engine="server", rollout_base_url="x:8000"), "rollout_base_url: 'x:8000' is not an http"),
        (dict(rollout_engine="server", rollout_base_url="http://x/v1", rollout_precision="int8"),
         "rollout_precision: a server samples in its own precision"),
        (dict(rollout_staleness=1), "rollout_staleness: unknown key; it is now max_staleness"),
    ],
)  # fmt: skip
def test_rollout_engine_settings_are_checked(tiny_model_dir, prompts, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        cfg(tiny_model_dir, prompts, tmp_path / "x", **kw)


def test_two_processes_take_their_shares_of_process_0s_batches(
    tiny_model_dir, prompts, server, tmp_path
):
    """2 gloo processes: process 0 draws each whole batch from the server and each process
    trains on its share; the run logs what one process logs."""
    from multiproc import run_two_processes

    conf = dict(stage="ppo", model_name_or_path=tiny_model_dir, dataset=prompts,
                reward_fn="alignforge.rl.scoring:token_fraction",
                reward_fn_kwargs={"target_ids": list(range(3, 192))},
                lora_target=["q_proj", "v_proj", "lm_head"], max_length=48, max_new_tokens=6,
                rollout_batch_size=4, mini_batch_size=4, ppo_epochs=1, learning_rate=1e-2,
                lr_scheduler_type="constant", kl_coef=0.05, max_steps=2, progress=False,
                rollout_engine="server", rollout_base_url=server.base_url)  # fmt: skip
    run_two_processes({**conf, "output_dir": str(tmp_path / "two")}, tmp_path, timeout=600)
    conf.pop("stage")
    ppo.run(build_config(PPOConfig, {**conf, "output_dir": str(tmp_path / "one")}))
    for a, b in zip(rows(tmp_path / "two"), rows(tmp_path / "one"), strict=True):
        for key in COMPARED:
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), (a["step"], key)
