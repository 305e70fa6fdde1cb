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


@pytest.fixture(scope="session")
def tiny_model(tokenizer):
    from tiny import make_tiny_model

    return make_tiny_model(tokenizer)
