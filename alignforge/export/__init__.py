"""Deployable copies of a trained model: a merged HF model in bf16/fp16, or a GGUF file.

    alignforge export runs/ppo/final -o runs/export/hf --format hf --dtype bfloat16
    alignforge export runs/ppo/final -o runs/export/model-q4_k_m.gguf --format gguf --quant q4_k_m

    from alignforge.export import export_gguf, export_hf
    export_gguf("runs/ppo/final", "runs/export/model-q8_0.gguf", quant="q8_0")

Adapters are merged into their base at float32 before anything else, so the only precision lost
is the one the chosen format asks for. The exported GGUF is evaluated like any other system
(``alignforge eval --system q4=runs/export/model-q4_k_m.gguf``, run by llama.cpp).
"""

from alignforge.export.gguf import GGUF_QUANTS, ExportError, export_gguf
from alignforge.export.hf import HF_DTYPES, export_hf

__all__ = ["GGUF_QUANTS", "HF_DTYPES", "ExportError", "export_gguf", "export_hf"]
