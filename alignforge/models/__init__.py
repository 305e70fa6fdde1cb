from alignforge.models.attention import ATTN_IMPLEMENTATIONS, check_attn_implementation
from alignforge.models.factory import (
    disabled_adapter,
    fingerprint,
    load_model,
    load_model_and_tokenizer,
    load_tokenizer,
    merge_adapter,
    qlora_config,
    wrap_lora,
)
from alignforge.models.loading import (
    DEFAULT_MODEL,
    ModelLoadError,
    cache_dir,
    ensure_default_model,
    is_adapter_dir,
    resolve_model_path,
)

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "DEFAULT_MODEL",
    "ModelLoadError",
    "cache_dir",
    "check_attn_implementation",
    "disabled_adapter",
    "ensure_default_model",
    "fingerprint",
    "is_adapter_dir",
    "load_model",
    "load_model_and_tokenizer",
    "load_tokenizer",
    "merge_adapter",
    "qlora_config",
    "resolve_model_path",
    "wrap_lora",
]
