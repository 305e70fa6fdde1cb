import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A tiny random Llama with a small BPE tokenizer and a chat template (an HF model dir)."""
    from tiny import make_model, make_tokenizer

    path = tmp_path_factory.mktemp("tiny-model")
    make_model(path, make_tokenizer(path))
    return str(path)


@pytest.fixture(scope="session")
def default_model_dir():
    """The embedded default model (SmolLM2-135M-Instruct), converted once into the cache."""
    from alignforge.models import ensure_default_model

    return str(ensure_default_model())


@pytest.fixture(scope="session")
def tokenizer(default_model_dir):
    """The embedded default model's tokenizer (49k BPE vocabulary, chat template)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


def make_tiny_model(tokenizer, seed: int = 0):
    """A tiny random Llama over ``tokenizer``'s vocabulary."""
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
