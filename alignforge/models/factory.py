"""Build the models the recipes train: full, LoRA or QLoRA; merge adapters; fingerprint checkpoints.

    model, tok = load_model_and_tokenizer("default")
    model = wrap_lora(model, rank=16, alpha=32, dropout=0.05, target="all")
    merged = merge_adapter("runs/sft/final", "runs/sft-merged")

With LoRA the reference policy is the same model with the adapter disabled
(``with disabled_adapter(model): ...``), so no second copy is held in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

import torch

from alignforge.config.stages import ModelArgs
from alignforge.models.attention import check_attn_implementation
from alignforge.models.loading import (
    ModelLoadError,
    adapter_base,
    hub_failure,
    is_adapter_dir,
    portable_name,
    resolve_model_path,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_ATTN = ModelArgs.model_fields["attn_implementation"].default


def load_tokenizer(name_or_path: str, cache: str | None = None):
    from transformers import AutoTokenizer

    path = resolve_model_path(name_or_path, cache)
    if is_adapter_dir(path):
        tok_src = path if (Path(path) / "tokenizer_config.json").exists() else adapter_base(path)
        path = resolve_model_path(tok_src, cache)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - re-raised with what was tried
        why = hub_failure(path, e) or f"tokenizer for {name_or_path!r}: tried {path!r}: {_line(e)}"
        raise ModelLoadError(why) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _from_pretrained(
    path: str, dtype: torch.dtype, quantization_config=None, attn: str = DEFAULT_ATTN
):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a bar per weight file says nothing for small models
    kwargs = {"dtype": dtype, "attn_implementation": attn}
    if quantization_config is not None:
        kwargs.update(
            quantization_config=quantization_config,
            device_map="cpu" if not torch.cuda.is_available() else None,
        )
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except Exception as e:  # noqa: BLE001
        hint = ""
        if "attention implementation" in str(e) or "does not support" in str(e):
            hint = f" (attn_implementation={attn}: this model may need another one, e.g. eager)"
        why = hub_failure(path, e) or f"model {path!r}: from_pretrained failed{hint}: {_line(e)}"
        raise ModelLoadError(why) from e
    # the name an adapter trained on it records as its base: `default`, not this machine's cache
    model.name_or_path = model.config.name_or_path = portable_name(path)
    return model


def _line(err: BaseException) -> str:
    """The first line of an error: library messages run to paragraphs (``--debug`` shows all)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def qlora_config(compute_dtype: torch.dtype = torch.float32):
    """4-bit NF4 with double quantisation (Dettmers et al. 2023); bitsandbytes runs it on CPU too."""
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as e:
        raise ModelLoadError(
            "finetuning_type=qlora needs bitsandbytes: pip install 'alignforge[qlora]'"
        ) from e
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def load_model(
    name_or_path: str,
    dtype: str = "float32",
    quantize_4bit: bool = False,
    adapter_trainable: bool = False,
    cache: str | None = None,
    attn_implementation: str = DEFAULT_ATTN,
):
    """Load a causal LM. An adapter directory loads its base and applies the adapter on top.

    ``attn_implementation`` is checked first: a backend this machine cannot run (flash attention
    without flash-attn or a GPU) is a ``ConfigError`` before any weights are read.
    """
    check_attn_implementation(attn_implementation)
    path = resolve_model_path(name_or_path, cache)
    torch_dtype = DTYPES[dtype]
    qcfg = qlora_config(torch_dtype) if quantize_4bit else None
    if is_adapter_dir(path):
        from peft import PeftModel

        base_path = resolve_model_path(adapter_base(path), cache)
        base = _from_pretrained(base_path, torch_dtype, qcfg, attn_implementation)
        return PeftModel.from_pretrained(base, path, is_trainable=adapter_trainable)
    return _from_pretrained(path, torch_dtype, qcfg, attn_implementation)


def load_model_and_tokenizer(
    name_or_path: str,
    dtype: str = "float32",
    cache: str | None = None,
    attn_implementation: str = DEFAULT_ATTN,
):
    model = load_model(
        name_or_path, dtype=dtype, cache=cache, attn_implementation=attn_implementation
    )
    return model, load_tokenizer(name_or_path, cache)


def wrap_lora(
    model,
    rank: int = 16,
    alpha: int = 32,
    dropout: float = 0.05,
    target: str | list[str] = "all",
    quantized: bool = False,
    gradient_checkpointing: bool = False,
    adapter_name: str = "default",
):
    """Add a trainable LoRA adapter (Hu et al. 2021); ``target="all"`` means every linear layer but the head."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if quantized:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing
        )
    cfg = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules="all-linear" if target == "all" else list(target),
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, cfg, adapter_name=adapter_name)


@contextlib.contextmanager
def disabled_adapter(model):
    """Run a PEFT model as its frozen base (the reference policy); a no-op for plain models."""
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            yield model
    else:
        yield model


def merge_adapter(
    adapter_dir: str, output_dir: str, dtype: str = "float32", cache: str | None = None
) -> Path:
    """Merge a LoRA adapter into its base at float32, then save a plain HF model + tokenizer in
    ``dtype``: merging in bf16 would round the base and the adapter's delta before adding them."""
    if not Path(adapter_dir).exists():
        raise ModelLoadError(f"merge: {adapter_dir} does not exist; give an adapter directory")
    if not is_adapter_dir(adapter_dir):
        raise ModelLoadError(
            f"merge: {adapter_dir} is not a PEFT adapter directory (no adapter_config.json)"
        )
    # merging runs no attention; eager loads every architecture (Gemma 2 has no sdpa path)
    model = load_model(adapter_dir, dtype="float32", cache=cache, attn_implementation="eager")
    merged = model.merge_and_unload().to(DTYPES[dtype])
    out = Path(output_dir)
    merged.save_pretrained(out, safe_serialization=True)
    load_tokenizer(adapter_dir, cache).save_pretrained(out)
    (out / "alignforge_merge.json").write_text(
        json.dumps({"adapter": str(adapter_dir), "base": adapter_base(adapter_dir), "dtype": dtype})
    )
    return out


_WEIGHT_SUFFIXES = {".safetensors", ".bin", ".pt", ".pth", ".gguf", ".json", ".model"}
_FULL_HASH_LIMIT = 64 * 2**20


def fingerprint(path: str | Path) -> str:
    """``sha256:<16 hex>`` over a checkpoint's weight and config files (names, sizes, content).

    Files up to 64 MiB are hashed whole; larger ones by size plus their first and last 4 MiB,
    which changes whenever training touches the weights while staying fast on big models.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"policy checkpoint {path} does not exist")
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
    )
    if not files:
        raise ValueError(f"no model or adapter files under {path}")
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if path.is_dir() else f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= _FULL_HASH_LIMIT:
                h.update(fh.read())
            else:
                h.update(fh.read(4 * 2**20))
                fh.seek(size - 4 * 2**20)
                h.update(fh.read())
    return "sha256:" + h.hexdigest()[:16]
