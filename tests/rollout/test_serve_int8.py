"""``alignforge serve --quantization int8``: torch's dynamic int8 kernel under float LoRA adapters
loaded at runtime, on a tiny random model."""

import copy

import httpx
import pytest
import torch
from torch import nn

from alignforge.rollout import TransformersEngine, chat_prompt_ids
from alignforge.rollout.batch import Int8Linear, quantize_int8
from alignforge.rollout.server import _load_model, create_app, start_server

MSG = [{"role": "user", "content": "Name a city."}]


def test_int8_linear_is_torchs_dynamic_int8_product():
    """The layer's output is exactly ``quantize_dynamic``'s (int8 weights, activations quantised
    per call): close to the float product but not equal to it."""
    torch.manual_seed(0)
    linear, x = nn.Linear(64, 32), torch.randn(5, 64)
    reference = torch.ao.quantization.quantize_dynamic(
        nn.Sequential(copy.deepcopy(linear)), {nn.Linear}, dtype=torch.qint8
    )
    with torch.no_grad():
        out, exact = Int8Linear(linear)(x), linear(x)
        assert torch.equal(out, reference(x))
    assert 0 < (out - exact).abs().max() < 0.05 * exact.abs().max()


def test_served_int8_model_takes_lora_adapters(tiny_model_dir, tmp_path):
    """Every linear layer is served in int8; a LoRA adapter loaded at runtime generates what peft
    gives over the same int8 base, a little off the float32 base with the adapter; the reloaded
    base stays int8."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model, tok = _load_model(tiny_model_dir, quantization="int8")
    assert not any(type(m) is nn.Linear for m in model.modules())
    assert sum(isinstance(m, Int8Linear) for m in model.modules()) == 15  # 2 x 7 + lm_head
    base, _ = _load_model(tiny_model_dir)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(copy.deepcopy(base), cfg).save_pretrained(tmp_path / "lora")

    engine = TransformersEngine(model, tok, policy_version="v0")
    running = start_server(create_app(engine, model_name="base"))
    try:
        url = running.base_url
        body = {"lora_name": "pol", "lora_path": str(tmp_path / "lora")}
        assert httpx.post(url + "/load_lora_adapter", json=body).status_code == 200
        kw = dict(messages=MSG, max_tokens=6, temperature=0, logprobs=True)
        served = httpx.post(url + "/chat/completions", json={"model": "pol", **kw}).json()
        logps = [c["logprob"] for c in served["choices"][0]["logprobs"]["content"]]

        prompt = chat_prompt_ids(tok, MSG)
        int8_ref = PeftModel.from_pretrained(quantize_int8(copy.deepcopy(base)), tmp_path / "lora")
        [[expected]] = TransformersEngine(int8_ref.eval(), tok).generate(
            [prompt], greedy=True, max_new_tokens=6
        )
        assert logps == pytest.approx(expected.logps, abs=1e-5)
        ids = torch.tensor([prompt + expected.completion_ids])
        float_ref = PeftModel.from_pretrained(base, tmp_path / "lora").eval()
        with torch.no_grad():
            lp = torch.log_softmax(float_ref(ids).logits[0, len(prompt) - 1 : -1], -1)
        float_logps = lp.gather(-1, torch.tensor(expected.completion_ids)[:, None])[:, 0]
        gap = (torch.tensor(logps) - float_logps).abs().max()
        assert 0 < gap < 0.1

        r = httpx.post(url + "/load_weights", json={"path": tiny_model_dir}, timeout=60)
        assert r.status_code == 200
        assert sum(isinstance(m, Int8Linear) for m in engine.model.modules()) == 15
        again = httpx.post(url + "/chat/completions", json={"model": "pol", **kw}).json()
        assert [c["logprob"] for c in again["choices"][0]["logprobs"]["content"]] == logps
    finally:
        running.stop()


def test_cli_refuses_int8_with_another_dtype():
    from typer.testing import CliRunner

    from alignforge.cli import app

    res = CliRunner().invoke(app, ["serve", "default", "--quantization", "int8", "--dtype",
                                   "bfloat16"])  # fmt: skip
    assert res.exit_code != 0 and "leave --dtype at float32" in str(res.exception)
    res = CliRunner().invoke(app, ["serve", "default", "--quantization", "fp8"])
    assert res.exit_code != 0 and "--quantization fp8: expected int8" in str(res.exception)
