import os
from pathlib import Path

import pytest

SMOL = Path(os.environ.get("ALIGNFORGE_SMOL_DIR", "/tmp/smol"))


@pytest.fixture(scope="session")
def tokenizer():
    if not (SMOL / "tokenizer.json").exists():
        pytest.skip(f"tokenizer of the embedded model not found at {SMOL}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(SMOL))


def make_tiny_model(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )  # fmt: skip
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    return make_tiny_model(tokenizer)
