import json
import os
import subprocess
import sys

import pytest
import torch

from alignforge.config import ConfigError, build_config
from alignforge.config.stages import SFTConfig
from alignforge.recipes import sft
from alignforge.training import NonFiniteLossError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(__file__)))


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    rows = json.load(open(os.path.join(ROOT, "examples/data/alpaca_en_demo.json")))[:48]
    p = tmp_path_factory.mktemp("data") / "train.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(p)


def cfg(model, data, out, **kw):
    base = dict(
        stage="sft",
        model_name_or_path=model,
        dataset=data,
        output_dir=str(out),
        max_length=128,
        per_device_train_batch_size=4,
        learning_rate=3e-3,
        max_steps=8,
        progress=False,
        lora_dropout=0.0,
    )
    return build_config(SFTConfig, {**base, **kw})


def train_losses(out):
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    return [r["loss"] for r in rows if r["split"] == "train"]


def test_full_finetuning_loss_goes_down_and_artifacts_are_written(
    tiny_model_dir, data_file, tmp_path
):
    s = sft.run(
        cfg(
            tiny_model_dir,
            data_file,
            tmp_path / "run",
            finetuning_type="full",
            max_steps=15,
            val_size=0.2,
            eval_steps=5,
        )
    )
    losses = train_losses(tmp_path / "run")
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.3
    assert s["final_eval"]["loss"] < 6.0
    for f in (
        "config.yaml",
        "summary.json",
        "loss_curve.png",
        "final/config.json",
        "final/tokenizer_config.json",
    ):
        assert (tmp_path / "run" / f).exists(), f
    assert s["data"]["truncated"] > 0 and s["tokens_trained"] > 0


class Interrupt(Exception):
    pass


def test_exact_resume_after_interruption(tiny_model_dir, data_file, tmp_path):
    kw = dict(
        max_steps=8, save_steps=2, lora_dropout=0.1
    )  # dropout: the RNG state must be restored too
    sft.run(cfg(tiny_model_dir, data_file, tmp_path / "full", **kw))
    reference = train_losses(tmp_path / "full")

    def crash(loop, row):
        if loop.step == 5:
            raise Interrupt

    with pytest.raises(Interrupt):
        sft.run(cfg(tiny_model_dir, data_file, tmp_path / "cut", **kw), callbacks=[crash])
    assert sorted(p.name for p in (tmp_path / "cut").glob("checkpoint-*")) == [
        "checkpoint-2",
        "checkpoint-4",
    ]
    s = sft.run(cfg(tiny_model_dir, data_file, tmp_path / "cut", **kw))
    assert s["resumed_from"].endswith("checkpoint-4")
    assert train_losses(tmp_path / "cut") == pytest.approx(reference, abs=1e-6)


def test_finished_output_dir_is_not_overwritten(tiny_model_dir, data_file, tmp_path):
    sft.run(cfg(tiny_model_dir, data_file, tmp_path / "r", max_steps=1))
    with pytest.raises(ConfigError, match="already holds a finished run"):
        sft.run(cfg(tiny_model_dir, data_file, tmp_path / "r", max_steps=1))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="did not write"):
        sft.run(cfg(tiny_model_dir, data_file, tmp_path / "other", max_steps=1))
    sft.run(cfg(tiny_model_dir, data_file, tmp_path / "r", max_steps=1, overwrite_output_dir=True))


def test_nan_loss_stops_with_clear_message_and_keeps_checkpoint(
    tiny_model_dir, data_file, tmp_path
):
    def poison(loop, row):
        if loop.step == 2:
            with torch.no_grad():
                for p in loop.model.parameters():
                    if p.requires_grad:
                        p.fill_(float("nan"))

    with pytest.raises(NonFiniteLossError, match=r"loss is nan at step 3 .*checkpoint-2 is intact"):
        sft.run(cfg(tiny_model_dir, data_file, tmp_path / "nan", save_steps=2), callbacks=[poison])
    from safetensors.torch import load_file

    state = load_file(tmp_path / "nan" / "checkpoint-2" / "trainable.safetensors")
    assert all(torch.isfinite(t).all() for t in state.values())


def test_merge_round_trip_equals_adapter_logits(tiny_model_dir, data_file, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from alignforge.models import merge_adapter

    sft.run(cfg(tiny_model_dir, data_file, tmp_path / "lora", max_steps=4))
    merged_dir = merge_adapter(str(tmp_path / "lora" / "final"), str(tmp_path / "merged"))
    x = torch.randint(3, 300, (2, 24))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with torch.no_grad():
        adapter_logits = (
            PeftModel.from_pretrained(base, tmp_path / "lora" / "final").eval()(x).logits
        )
        merged_logits = AutoModelForCausalLM.from_pretrained(merged_dir).eval()(x).logits
        base_logits = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()(x).logits
    torch.testing.assert_close(merged_logits, adapter_logits, atol=1e-4, rtol=1e-4)
    assert (merged_logits - base_logits).abs().max() > 1e-3  # the adapter did change something


def test_qlora_trains_on_cpu(tiny_model_dir, data_file, tmp_path):
    pytest.importorskip("bitsandbytes")
    s = sft.run(
        cfg(tiny_model_dir, data_file, tmp_path / "q", finetuning_type="qlora", max_steps=3)
    )
    assert s["steps"] == 3 and all(map(lambda v: v == v, train_losses(tmp_path / "q")))
    adapter = json.load(open(tmp_path / "q" / "final" / "adapter_config.json"))
    assert adapter["r"] == 16


def test_two_processes_match_one_process(tiny_model_dir, data_file, tmp_path):
    """2 CPU processes (gloo) with 2x2 micro-batches equal 1 process with 4x2: same global batch."""
    common = [
        f"model_name_or_path={tiny_model_dir}",
        f"dataset={data_file}",
        "stage=sft",
        "max_length=128",
        "max_steps=3",
        "finetuning_type=full",
        "progress=false",
        "learning_rate=1e-3",
        "gradient_accumulation_steps=2",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29561",
            "-m",
            "alignforge.cli",
            "train",
            "/dev/null",
            *common,
            f"output_dir={tmp_path / 'two'}",
            "per_device_train_batch_size=2",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    sft.run(
        cfg(
            tiny_model_dir,
            data_file,
            tmp_path / "one",
            finetuning_type="full",
            max_steps=3,
            learning_rate=1e-3,
            gradient_accumulation_steps=2,
            per_device_train_batch_size=4,
        )
    )
    assert train_losses(tmp_path / "two") == pytest.approx(train_losses(tmp_path / "one"), abs=1e-5)
    from safetensors.torch import load_file

    a, b = (
        load_file(tmp_path / "two/final/model.safetensors"),
        load_file(tmp_path / "one/final/model.safetensors"),
    )
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
