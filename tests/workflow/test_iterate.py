import json
import os

import pytest

from alignforge.config import ConfigError
from alignforge.workflow import iterate as it
from alignforge.workflow.config import IterateConfig
from alignforge.workflow.steps import ProvenanceError, check_provenance

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


def samples_from(fp):
    return [{"prompt_id": "p", "policy": {"model": "m", "fingerprint": fp}, "completions": []}]


def test_provenance_refuses_samples_from_another_checkpoint(tiny_model_dir):
    from alignforge.models import fingerprint

    check_provenance(samples_from(fingerprint(tiny_model_dir)), tiny_model_dir, False, "none")
    with pytest.raises(ProvenanceError, match="off-policy data"):
        check_provenance(samples_from("sha256:older"), tiny_model_dir, False, "none")
    with pytest.raises(ProvenanceError):  # allowed only with an importance correction on
        check_provenance(samples_from("sha256:older"), tiny_model_dir, True, "none")
    check_provenance(samples_from("sha256:older"), tiny_model_dir, True, "truncate")


@pytest.fixture()
def prompts_file(tmp_path):
    rows = json.load(open(os.path.join(ROOT, "examples/data/alpaca_en_demo.json")))
    rows = [r for r in rows if len(r["output"]) < 200][:24]
    p = tmp_path / "prompts.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def config(tmp_path, model, prompts, **kw):
    base = dict(
        output_dir=str(tmp_path / "run"),
        policy=model,
        task="instruction",
        prompts=prompts,
        eval_dataset=prompts,
        eval_limit=4,
        rounds=1,
        prompts_per_round=8,
        samples_per_prompt=3,
        max_new_tokens=12,
        judge="metric",
        min_pairs=2,
        rm={"max_steps": 2, "per_device_train_batch_size": 4, "finetuning_type": "lora"},
        ppo={
            "max_steps": 2,
            "rollout_batch_size": 4,
            "mini_batch_size": 4,
            "max_new_tokens": 12,
            "save_steps": 1,
        },
    )
    return IterateConfig(**{**base, **kw})


def test_interrupted_iterate_resumes_at_the_right_step(
    tiny_model_dir, prompts_file, tmp_path, monkeypatch
):
    cfg = config(tmp_path, tiny_model_dir, prompts_file)
    real_ppo = it._train_ppo

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(it, "_train_ppo", interrupted)
    with pytest.raises(KeyboardInterrupt):
        it.run_iterate(cfg, log=lambda m: None)
    rnd = tmp_path / "run" / "round_1"
    done = {p.name for p in rnd.glob("*.done.json")}
    assert done == {"sample.done.json", "judge.done.json", "rm.done.json"}
    before = {n: json.loads((rnd / n).read_text())["finished_at"] for n in done}

    calls = []
    monkeypatch.setattr(it, "_train_ppo", lambda *a, **k: calls.append(1) or real_ppo(*a, **k))
    logs = []
    history = it.run_iterate(cfg, log=logs.append)
    assert calls == [1]  # only PPO (and what follows) ran again
    assert {n: json.loads((rnd / n).read_text())["finished_at"] for n in done} == before
    assert any("sample: done earlier, skipped" in m for m in logs)
    assert (rnd / "ppo.done.json").exists() and (rnd / "eval.done.json").exists()
    assert history[0]["policy"].endswith("round_1/policy")
    assert json.loads((rnd / "judge.done.json").read_text())["n_records"] >= 2


def test_each_round_runs_ppo_with_its_own_seed_and_reward_sources(
    tiny_model_dir, prompts_file, tmp_path
):
    """Rounds must not replay round 1's prompt order; without a reward model PPO gets the task
    reward and no drift monitor (it would have no reward-model scores to compare against), and
    says so."""
    cfg = config(
        tmp_path, tiny_model_dir, prompts_file, seed=3, ppo={"max_steps": 2, "drift_action": "warn"}
    )
    notes = []
    r1 = it.ppo_data(cfg, "pol", None, it.Round(tmp_path / "r1"), 1, log=notes.append)
    r2 = it.ppo_data(cfg, "pol", None, it.Round(tmp_path / "r2"), 2, log=notes.append)
    assert (r1["seed"], r2["seed"]) == (4, 5)
    assert (
        r1["drift_action"] == "none"
        and r1["reward_fn"].endswith(":task_reward")
        and "reward_model" not in r1
    )
    assert len(notes) == 2 and "drift monitor off (ppo.drift_action=warn" in notes[0]
    assert sum(1 for _ in open(r1["dataset"])) == 24  # every prompt row, as chat messages
    with_rm = it.ppo_data(cfg, "pol", "rm/final", it.Round(tmp_path / "r3"), 3)
    assert (
        with_rm["reward_model"] == "rm/final"
        and with_rm["drift_action"] == "warn"
        and with_rm["reward_fn_weight"] == 1.0
    )
    rm_only = config(tmp_path, tiny_model_dir, prompts_file, task_reward_weight=0.0)
    assert "reward_fn" not in it.ppo_data(rm_only, "pol", "rm/final", it.Round(tmp_path / "r5"), 1)
    assert r1["reward_fn_kwargs"]["marginal"] is True  # the default
    item = config(tmp_path, tiny_model_dir, prompts_file, task_reward="item")
    assert (
        it.ppo_data(item, "pol", None, it.Round(tmp_path / "r6"), 1)["reward_fn_kwargs"]["marginal"]
        is False
    )
    pinned = config(tmp_path, tiny_model_dir, prompts_file, ppo={"seed": 10})
    assert it.ppo_data(pinned, "pol", None, it.Round(tmp_path / "r4"), 2)["seed"] == 12


def test_task_reward_finds_each_prompts_reference_and_scores_item_or_marginal(tmp_path):
    from alignforge.evaluate.tasks import get_task
    from alignforge.workflow.rewards import task_reward

    task = get_task("extraction")
    rows = [json.loads(x) for x in open(os.path.join(ROOT, "examples/data/ner_finance.jsonl"))]
    with_ents = next(r for r in rows if "ORGANIZATION" in r["ideal"])
    without = next(r for r in rows if r["ideal"].startswith("No entities"))
    refs = tmp_path / "refs.jsonl"
    refs.write_text(json.dumps(with_ents) + "\n" + json.dumps(without) + "\n")
    gold = task.example(with_ents, 0).reference
    prompts = [task.example(without, 1).messages, task.example(with_ents, 0).messages]
    answers = ['{"entities": []}', json.dumps(gold)]
    assert task_reward(prompts, answers, "extraction", str(refs)) == [1.0, 1.0]
    # pooled over the batch only the found entities count: the empty answer adds nothing
    marginal = task_reward(prompts, answers, "extraction", str(refs), marginal=True)
    assert marginal == [0.0, 2.0]  # N * (F1 1.0 - F1 of nothing 0)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(ppo={"max_step": 2}), r"iterate\.ppo:\n  max_step: unknown key"),
        (dict(rm={"lora_rank": 0}), r"iterate\.rm:\n  lora_rank: Input should be greater than 0"),
        (dict(ppo={"finetuning_type": "full"}), "ppo trains a LoRA policy"),
        (dict(ppo={"drift_action": "restore"}), "save_steps: drift_action restore needs"),
        (dict(ppo={"dataset": "mine.jsonl"}), "ppo.dataset: iterate sets it in every round"),
        (dict(rm={"model_name_or_path": "rm0"}), "rm.model_name_or_path: iterate sets it"),
        (dict(ppo={"reward_fn": "my:fn"}), "set task_reward_weight: 0 to use your own reward_fn"),
        (
            dict(ppo={"reward_fn_weight": 2.0}, task_reward_weight=0.0),
            "ppo.reward_fn_weight: there is no ppo.reward_fn",
        ),
    ],
)
def test_nested_configs_are_refused_before_any_sampling(
    tiny_model_dir, prompts_file, tmp_path, monkeypatch, change, message
):
    """A bad rm: or ppo: key fails when iterate starts, not after the sampling and judging."""

    def sample(*a, **k):
        raise AssertionError("sampled before the configs were checked")

    monkeypatch.setattr(it.steps, "sample", sample)
    cfg = config(tmp_path, tiny_model_dir, prompts_file, **change)
    with pytest.raises(ConfigError, match=message):
        it.run_iterate(cfg, log=lambda m: None)
    assert not (tmp_path / "run").exists()


def test_users_reward_fn_and_drift_action_are_kept_or_the_change_is_announced(
    tiny_model_dir, prompts_file, tmp_path
):
    own = {"max_steps": 2, "reward_fn": "my:fn", "reward_fn_weight": 2.0, "drift_action": "stop"}
    cfg = config(tmp_path, tiny_model_dir, prompts_file, task_reward_weight=0.0, ppo=own)
    it.validate(cfg)  # the user's reward_fn stands in for the task reward: accepted
    notes = []
    for rm_path in ("rm/final", None):
        data = it.ppo_fields(cfg, "pol", rm_path, tmp_path, 1, log=notes.append)
        assert (data["reward_fn"], data["reward_fn_weight"]) == ("my:fn", 2.0)
    assert data["drift_action"] == "none" and notes == [notes[0]]
    assert "drift monitor off (ppo.drift_action=stop applies to rounds with one" in notes[0]
    with_ref = config(
        tmp_path, tiny_model_dir, prompts_file, ppo={**own, "drift_reference": "scores.json"},
        task_reward_weight=0.0,
    )  # fmt: skip
    assert (
        it.ppo_fields(with_ref, "pol", None, tmp_path, 1, log=notes.append)["drift_action"]
        == "stop"
    )
    default = config(tmp_path, tiny_model_dir, prompts_file, ppo={"max_steps": 2})
    assert "drift_action" not in it.ppo_fields(default, "pol", None, tmp_path, 1, log=notes.append)
    assert len(notes) == 1  # neither change was needed
    rm_only = config(tmp_path, tiny_model_dir, prompts_file, task_reward_weight=0.0)
    data = it.ppo_fields(rm_only, "pol", None, tmp_path, 1, log=notes.append)
    assert data["reward_fn"] == it.TASK_REWARD_FN and data["reward_fn_weight"] == 1.0
    assert "PPO runs on the task reward (weight 1.0) although task_reward_weight is 0" in notes[-1]


def test_rounds_train_the_rm_and_ppo_with_the_progress_bars_of_alignforge_train(
    tiny_model_dir, prompts_file, tmp_path
):
    """A round's RM and PPO show their progress bars, as `alignforge train` does, unless the
    user's rm: / ppo: turn them off."""
    from alignforge.config import build_config
    from alignforge.config.rlhf import PPOConfig, RMConfig

    def built(cfg):
        rm = it.rm_data(cfg, "pol", tmp_path / "train.jsonl", None, tmp_path)
        ppo = it.ppo_fields(cfg, "pol", "rm/final", tmp_path, 1, log=lambda m: None)
        return build_config(RMConfig, rm).progress, build_config(PPOConfig, ppo).progress

    assert built(config(tmp_path, tiny_model_dir, prompts_file)) == (True, True)
    off = {"progress": False}
    quiet = config(tmp_path, tiny_model_dir, prompts_file, rm=off, ppo=off)
    assert built(quiet) == (False, False)


def test_a_rounds_samples_can_be_drawn_on_a_server_given_the_policy(tiny_model_dir, tmp_path):
    """``rollout_engine: server``: the round's policy is loaded on ``alignforge serve`` (started
    here with other weights) before it samples, so the samples are the in-process ones."""
    from tiny import make_model
    from transformers import AutoTokenizer

    from alignforge.rollout import TransformersEngine
    from alignforge.rollout.server import create_app, start_server
    from alignforge.workflow import steps

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    other = make_model(tmp_path / "other", tok, seed=1).eval()
    running = start_server(create_app(TransformersEngine(other, tok), model_name="tiny"))
    prompts = [{"prompt": [{"role": "user", "content": q}], "prompt_id": q, "doc_id": q}
               for q in ("Name a river.", "Why?")]  # fmt: skip
    rest = (3, 1.0, 8, {"train": 1.0}, 7)  # k, temperature, max_new_tokens, splits, seed
    try:
        served = steps.sample(tiny_model_dir, prompts, tmp_path / "s", *rest, "server",
                              running.base_url)  # fmt: skip
    finally:
        running.stop()
    local = steps.sample(tiny_model_dir, prompts, tmp_path / "l", *rest)
    ids = [[c["token_ids"] for c in r["completions"]] for r in local]
    assert [[c["token_ids"] for c in r["completions"]] for r in served] == ids
    with pytest.raises(ValueError, match="rollout_base_url: rollout_engine server needs"):
        config(tmp_path, tiny_model_dir, "p.jsonl", rollout_engine="server")
