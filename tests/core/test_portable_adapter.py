"""An adapter trained on the embedded default model names its base `default`, not this machine's
cache path, so it loads (generate, eval, merge, export) wherever alignforge's cache is.

Two caches stand for two machines; each holds a converted "default" model (here the tiny random
model, marked as converted from the default GGUF as ``ensure_default_model`` marks it)."""

import json
import shutil

import torch

from alignforge.export.hf import export_hf
from alignforge.models import load_model, load_tokenizer, wrap_lora
from alignforge.models.loading import DEFAULT_DIRNAME, DEFAULT_GGUF


def fake_cache(root, tiny_model_dir):
    model_dir = root / "models" / DEFAULT_DIRNAME
    shutil.copytree(tiny_model_dir, model_dir)
    (model_dir / "alignforge_source.json").write_text(json.dumps({"gguf": f"/x/{DEFAULT_GGUF}"}))
    return model_dir


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_an_adapter_on_the_default_model_loads_on_another_machine(tiny_model_dir, tmp_path):
    mine, theirs = tmp_path / "cache-here", tmp_path / "cache-there"
    here = fake_cache(mine, tiny_model_dir)
    fake_cache(theirs, tiny_model_dir)
    ids = torch.tensor([[1, 20, 30, 40]])
    for i, source in enumerate(("default", str(here))):  # by name or by its cache path
        torch.manual_seed(0)
        model = wrap_lora(load_model(source, cache=str(mine)), rank=2, alpha=64, dropout=0.0)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, 0.05)  # a trained adapter: it changes the logits
        adapter = tmp_path / f"adapter{i}"
        model.save_pretrained(adapter)
        config = json.loads((adapter / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == "default"
    shutil.rmtree(mine)  # the other machine has no such path
    want = logits(model, ids)
    # generate and eval load an adapter with load_model / load_tokenizer
    assert torch.allclose(logits(load_model(str(adapter), cache=str(theirs)), ids), want, atol=1e-5)
    assert load_tokenizer(str(adapter), str(theirs)).name_or_path.startswith(str(theirs))
    out = export_hf(str(adapter), tmp_path / "merged", dtype="float32", cache=str(theirs))
    assert json.loads((out / "alignforge_merge.json").read_text())["base"] == "default"
    assert torch.allclose(logits(load_model(str(out)), ids), want, atol=1e-4)
    # an adapter an older version wrote names its machine's cache path: read as `default`
    config["base_model_name_or_path"] = str(here)
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    assert torch.allclose(logits(load_model(str(adapter), cache=str(theirs)), ids), want, atol=1e-5)
