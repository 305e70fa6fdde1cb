"""``alignforge export``: a deployable copy of a model, merged HF (bf16/fp16) or GGUF."""

from __future__ import annotations

from pathlib import Path

import typer


def export_command(
    model: str = typer.Argument(
        ..., help="A PEFT adapter dir (merged at float32 first), an HF model dir or `default`."
    ),
    output: Path = typer.Option(
        ..., "--output", "-o", help="hf: the directory to write; gguf: the .gguf file to write."
    ),
    format: str = typer.Option("gguf", "--format", "-f", help="hf or gguf."),
    dtype: str = typer.Option(
        None, "--dtype", help="hf only: bfloat16 (default), float16 or float32."
    ),
    quant: str = typer.Option(
        None, "--quant", "-q", help="gguf only: f16, q8_0, q4_0 or q4_k_m (default)."
    ),
) -> None:
    """Export MODEL for serving: a merged HF model (vLLM, TGI) or a GGUF file (llama.cpp, Ollama).

    GGUF files hold the tokenizer and chat template and need llama-cpp-python
    (`pip install 'alignforge\\[gguf]'`).
    Score the export against the model it came from with
    `alignforge eval --system fp32=MODEL --system q4=OUT.gguf ...`.
    """
    from alignforge.config import ConfigError
    from alignforge.export import export_gguf, export_hf

    if format not in ("hf", "gguf"):
        raise ConfigError(f"--format {format}: expected hf or gguf")
    if format == "hf" and quant:
        raise ConfigError("--quant applies to --format gguf; use --dtype with --format hf")
    if format == "gguf" and dtype:
        raise ConfigError("--dtype applies to --format hf; use --quant with --format gguf")
    try:
        if format == "hf":
            path = export_hf(model, output, dtype=dtype or "bfloat16")
        else:
            path = export_gguf(model, output, quant=quant or "q4_k_m")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    typer.echo(f"exported {model} to {path}")
