"""PPO data-parallel: 2 processes (gloo, ``torch.distributed.run``) train exactly what 1 does.

Each process samples its share of the prompts (a prompt's group on one process, every sample
from its own seeded generator), and every batch statistic (advantage whitening, token counts
of the loss, the KL) is reduced over processes. With one mini-batch per epoch the global
mini-batch is the same set of rows on 1 and 2 processes, so losses and weights must agree.
"""

import json

import pytest
import torch
from helpers import prompt_rows, write_jsonl
from multiproc import run_two_processes
from safetensors.torch import load_file

from alignforge.config import build_config
from alignforge.config.rlhf import PPOConfig
from alignforge.recipes import ppo

SETTINGS = {
    "gae": dict(advantage_estimator="gae", num_generations=1, mini_batch_size=4),
    "grpo": dict(advantage_estimator="grpo", num_generations=2, mini_batch_size=8),
}


def train_rows(out):
    rows = [json.loads(x) for x in open(out / "metrics.jsonl")]
    return [r for r in rows if r["split"] == "train"]


@pytest.mark.parametrize("estimator", ["gae", "grpo"])
def test_two_processes_equal_one(tiny_model_dir, tmp_path, estimator):
    data = write_jsonl(tmp_path / "prompts.jsonl", prompt_rows(16))
    conf = dict(
        stage="ppo",
        model_name_or_path=tiny_model_dir,
        dataset=data,
        reward_fn="alignforge.rl.scoring:token_fraction",
        reward_fn_kwargs={"target_ids": list(range(3, 192))},
        lora_target=["q_proj", "v_proj", "lm_head"],
        max_length=48,
        max_new_tokens=6,
        rollout_batch_size=4,
        ppo_epochs=2,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        kl_coef=0.05,
        max_steps=2,
        progress=False,
        **SETTINGS[estimator],
    )
    run_two_processes({**conf, "output_dir": str(tmp_path / "two")}, tmp_path, timeout=600)
    conf.pop("stage")
    s = ppo.run(build_config(PPOConfig, {**conf, "output_dir": str(tmp_path / "one")}))
    assert s["processes"] == 1
    a, b = train_rows(tmp_path / "two"), train_rows(tmp_path / "one")
    assert [r["step"] for r in a] == [1, 2]  # one run, logged once (rank 0)
    for ra, rb in zip(a, b, strict=True):
        for key in ("reward/mean", "kl", "policy/loss", "policy/loss_tokens", "response_tokens"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-5), (ra["step"], key)
        if estimator == "gae":
            assert ra["value/loss"] == pytest.approx(rb["value/loss"], rel=1e-4, abs=1e-5)
    wa = load_file(tmp_path / "two/final/adapter_model.safetensors")
    wb = load_file(tmp_path / "one/final/adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=1e-4)
    summary = json.loads((tmp_path / "two/summary.json").read_text())
    assert summary["processes"] == 2
