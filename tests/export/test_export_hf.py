"""``alignforge export --format hf``: merged at float32, then cast; and the errors that need no
llama.cpp."""

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open


def make_adapter(model_dir: str, out: Path, seed: int = 1) -> Path:
    """A LoRA adapter with random, non-zero A and B, so merging it changes the weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    model.save_pretrained(out)
    return out


def merged_fp32(model_dir: str, adapter: Path) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, adapter).merge_and_unload().state_dict()


def read_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(model_dir / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_adapter_is_merged_at_float32_then_cast(tiny_model_dir, tmp_path, dtype):
    """Every exported weight equals (fp32 base + fp32 LoRA delta) rounded once to ``dtype``.

    Merging in ``dtype`` instead rounds the base and the delta before adding them, which changes
    some of the 16-bit values, so this comparison is exact on purpose.
    """
    from alignforge.export import export_hf

    adapter = make_adapter(tiny_model_dir, tmp_path / "adapter")
    out = export_hf(str(adapter), tmp_path / "out", dtype=dtype)
    saved = read_tensors(out)
    expected = merged_fp32(tiny_model_dir, adapter)
    assert saved.keys() == expected.keys()
    for name, tensor in saved.items():
        assert tensor.dtype == getattr(torch, dtype), name
        assert torch.equal(tensor, expected[name].to(tensor.dtype)), name
    assert json.loads((out / "config.json").read_text())["dtype"] == dtype
    assert (out / "chat_template.jinja").exists() and (out / "tokenizer.json").exists()
    record = json.loads((out / "alignforge_export.json").read_text())
    assert record["format"] == "hf" and record["dtype"] == dtype
    assert record["source_fingerprint"].startswith("sha256:")


def test_full_model_export_keeps_its_logits(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from alignforge.export import export_hf

    out = export_hf(tiny_model_dir, tmp_path / "bf16", dtype="bfloat16")
    x = torch.randint(3, 300, (2, 16))
    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(tiny_model_dir)(x).logits
        got = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)(x).logits
    assert read_tensors(out)["lm_head.weight"].dtype == torch.bfloat16
    # bf16 keeps 8 bits of mantissa: relative error per weight <= 2**-9
    torch.testing.assert_close(got, ref, atol=2e-3, rtol=0.05)


def test_export_cli_refuses_options_of_the_other_format(tiny_model_dir, tmp_path):
    from typer.testing import CliRunner

    from alignforge.cli import app

    res = CliRunner().invoke(
        app, ["export", tiny_model_dir, "-o", str(tmp_path / "x"), "--format", "hf", "-q", "q8_0"]
    )
    assert res.exit_code != 0 and "--quant applies to --format gguf" in str(res.exception)
    res = CliRunner().invoke(
        app, ["export", tiny_model_dir, "-o", str(tmp_path / "x"), "-f", "onnx"]
    )
    assert "--format onnx: expected hf or gguf" in str(res.exception)


def test_gguf_export_without_llama_cpp_names_the_extra(tiny_model_dir, tmp_path, monkeypatch):
    import importlib.metadata

    from alignforge.export import ExportError, export_gguf

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "version", missing)
    with pytest.raises(ExportError, match=r"pip install 'alignforge\[gguf\]'"):
        export_gguf(tiny_model_dir, tmp_path / "m.gguf", quant="q8_0")
    assert not (tmp_path / "m.gguf").exists()


def test_gguf_export_checks_its_arguments(tiny_model_dir, tmp_path):
    from alignforge.export import export_gguf

    with pytest.raises(ValueError, match="--quant q3_k: expected one of f16, q8_0, q4_0, q4_k_m"):
        export_gguf(tiny_model_dir, tmp_path / "m.gguf", quant="q3_k")
    with pytest.raises(ValueError, match="a GGUF export is one file ending in .gguf"):
        export_gguf(tiny_model_dir, tmp_path / "m.bin", quant="q8_0")
