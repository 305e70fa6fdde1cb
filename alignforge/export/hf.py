"""A merged Hugging Face model in bf16 or fp16 (safetensors), as vLLM and TGI load it:
``alignforge export runs/ppo/final -o runs/export/hf --format hf --dtype bfloat16``.
"""

from __future__ import annotations

import json
from pathlib import Path

HF_DTYPES = ("bfloat16", "float16", "float32")


def export_hf(model: str, output_dir: str | Path, dtype: str = "bfloat16", cache=None) -> Path:
    """Save ``model`` (an adapter dir, an HF model dir or ``default``) as a plain HF model in
    ``dtype``. An adapter is merged into its base at float32 first, then cast."""
    from alignforge.models import (
        fingerprint,
        is_adapter_dir,
        load_model,
        load_tokenizer,
        merge_adapter,
        resolve_model_path,
    )

    if dtype not in HF_DTYPES:
        raise ValueError(f"--dtype {dtype}: expected one of {', '.join(HF_DTYPES)}")
    path = resolve_model_path(model, cache)
    out = Path(output_dir)
    if is_adapter_dir(path):
        merge_adapter(path, str(out), dtype=dtype, cache=cache)
    else:
        weights = load_model(path, dtype="float32", cache=cache, attn_implementation="eager")
        weights.to(_torch_dtype(dtype)).save_pretrained(out, safe_serialization=True)
        load_tokenizer(path, cache).save_pretrained(out)
    record = {"source": str(model), "source_fingerprint": fingerprint(path), "format": "hf",
              "dtype": dtype}  # fmt: skip
    (out / "alignforge_export.json").write_text(json.dumps(record, indent=1))
    return out


def _torch_dtype(name: str):
    from alignforge.models.factory import DTYPES

    return DTYPES[name]
