"""DPO (reference log-probs pre-computed) and SPIN data-parallel: 2 processes (gloo,
``torch.distributed.run``) train exactly what 1 process does, with the same global batch.

The reference / opponent log-probs are shared out over the processes (each scores its batches)
and written once by rank 0; SPIN's generations are shared out the same way.
"""

import json

import torch
from multiproc import assert_same_losses, assert_same_weights, run_two_processes
from test_dpo import style_pairs
from test_spin import sft_file

from alignforge.config import build_config
from alignforge.config.preference import DPOConfig, SPINConfig
from alignforge.recipes import dpo, spin


def test_dpo_with_precomputed_reference_two_processes_equal_one(tiny_model_dir, tmp_path):
    words = "river stone cloud apple tiger lamp garden piano rocket forest candle mirror".split()
    for name, rows in (("train", style_pairs(words * 2)), ("eval", style_pairs(words[:6], 1))):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    conf = dict(
        stage="dpo", model_name_or_path=tiny_model_dir, dataset=str(tmp_path / "train.jsonl"),
        eval_dataset=str(tmp_path / "eval.jsonl"), max_length=64, finetuning_type="full",
        precompute_ref_logps=True, per_device_eval_batch_size=4, gradient_accumulation_steps=2,
        learning_rate=1e-3, max_steps=3, progress=False, report_to="none",
    )  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    run_two_processes(
        {**conf, "output_dir": str(two), "cache_dir": str(tmp_path / "c2"),
         "per_device_train_batch_size": 2}, tmp_path,
    )  # fmt: skip
    c1 = {**conf, "output_dir": str(one), "cache_dir": str(tmp_path / "c1")}
    s1 = dpo.run(build_config(DPOConfig, {**c1, "per_device_train_batch_size": 4}))
    s2 = json.loads((two / "summary.json").read_text())
    assert s1["ref_logps"] == s2["ref_logps"] == {"train": "computed", "eval": "computed"}
    assert_same_losses(two / "metrics.jsonl", one / "metrics.jsonl", steps=3)
    assert abs(s2["final_eval"]["loss"] - s1["final_eval"]["loss"]) < 1e-5
    assert_same_weights(two / "final/model.safetensors", one / "final/model.safetensors")
    # the shared-out reference equals the one-process one, one complete file per split
    for a, b in zip(
        sorted((tmp_path / "c2/ref_logps").iterdir()),
        sorted((tmp_path / "c1/ref_logps").iterdir()),
        strict=True,
    ):
        assert a.name == b.name and a.suffix == ".pt"
        x, y = torch.load(a), torch.load(b)
        assert x["keys"] == y["keys"]
        torch.testing.assert_close(x["values"], y["values"], atol=1e-6, rtol=0)
        assert (x["values"] < 0).all()  # every row was filled in, none left at 0


def test_spin_two_processes_equal_one(tiny_model_dir, tmp_path):
    """8 prompts, a global batch of 4 (1 x 2 accumulated on each of 2 processes, 2 x 2 on one):
    whole epochs, so both read the pairs in the same order."""
    conf = dict(
        stage="spin", model_name_or_path=tiny_model_dir, dataset=sft_file(tmp_path, n=8),
        num_iterations=1, beta=0.1, learning_rate=2e-3, max_new_tokens=8,
        generation_batch_size=2, max_length=96, per_device_eval_batch_size=3,
        gradient_accumulation_steps=2, max_steps=2, lora_rank=8, lora_dropout=0.0,
        progress=False, report_to="none",
    )  # fmt: skip
    two, one = tmp_path / "two", tmp_path / "one"
    run_two_processes({**conf, "output_dir": str(two), "per_device_train_batch_size": 2}, tmp_path)
    c1 = {**conf, "output_dir": str(one), "per_device_train_batch_size": 4}
    s1 = spin.run(build_config(SPINConfig, c1))
    s2 = json.loads((two / "summary.json").read_text())
    it1, it2 = one / "iter_0", two / "iter_0"
    # the same answers, generated half by each process
    pairs1, pairs2 = (json.loads((d / "pairs_train.json").read_text()) for d in (it1, it2))
    assert pairs1 == pairs2 and len(pairs1["rows"]) == 8
    o1, o2 = (torch.load(d / "opponent_logps_train.pt") for d in (it1, it2))
    assert o1["keys"] == o2["keys"]
    torch.testing.assert_close(o1["values"], o2["values"], atol=1e-6, rtol=0)
    assert_same_losses(it2 / "metrics.jsonl", it1 / "metrics.jsonl", steps=2)
    f1, f2 = s1["iterations"][0]["final"], s2["iterations"][0]["final"]
    assert abs(f1["loss"] - f2["loss"]) < 1e-5
    assert_same_weights(it2 / "model/model.safetensors", it1 / "model/model.safetensors")
