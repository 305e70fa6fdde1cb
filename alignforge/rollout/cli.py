"""``alignforge serve``: an OpenAI-compatible HTTP server over a local model."""

from __future__ import annotations

import typer


def serve_command(
    model: str = typer.Argument(..., help="Model directory (Hugging Face format) to serve."),
    host: str = typer.Option(
        "127.0.0.1", help="Interface to bind; 0.0.0.0 exposes it to the network."
    ),
    port: int = typer.Option(8000, help="TCP port."),
    model_name: str = typer.Option(None, help="Name reported by /v1/models (default: the path)."),
    policy_version: str = typer.Option(
        None, help="Policy identity recorded with generations (default: the path)."
    ),
    batch_size: int = typer.Option(
        8, help="Most rows (prompts x n, of any concurrent requests) generated as one batch."
    ),
    dtype: str = typer.Option(
        "float32", help="Precision the weights run in: float32, bfloat16 (a GPU's) or float16."
    ),
    quantization: str = typer.Option(
        None,
        help="int8: every linear layer in torch's dynamic int8 kernel (CPU only, float32 "
        "activations), runtime LoRA adapters in float32 on top.",
    ),
) -> None:
    """Serve MODEL over vLLM's OpenAI-compatible API: /v1/models, /v1/chat/completions and
    /v1/completions (n, seed, stop, logprobs with top alternatives, json_object and json_schema
    response formats, stream, token-id prompts), LoRA adapters loaded at runtime
    (/v1/load_lora_adapter, /v1/unload_lora_adapter) and new weights (/v1/load_weights).
    Concurrent requests are generated in shared batches.

    Example: alignforge serve runs/sft-merged --port 8000

    Runs on the GPU when there is one. A .gguf file is de-quantised into transformers here; to
    serve it with llama.cpp, run `python -m llama_cpp.server --model FILE.gguf` (alignforge\\[gguf]).
    """
    from alignforge.config import ConfigError
    from alignforge.rollout.server import serve

    if dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"--dtype {dtype}: expected float32, bfloat16 or float16")
    if quantization not in (None, "int8"):
        raise ConfigError(f"--quantization {quantization}: expected int8 (or leave it out)")
    if quantization and dtype != "float32":
        raise ConfigError(f"--quantization int8 runs float32 activations through int8 "
                          f"matmuls: leave --dtype at float32 (got {dtype})")  # fmt: skip

    serve(model, host=host, port=port, model_name=model_name, policy_version=policy_version,
          batch_size=batch_size, dtype=dtype, quantization=quantization)  # fmt: skip
