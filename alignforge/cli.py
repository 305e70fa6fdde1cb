"""The ``alignforge`` command line: one subcommand per stage.

    alignforge train examples/sft_default.yaml learning_rate=1e-4
    alignforge merge runs/sft/final --output runs/sft-merged
    alignforge export runs/sft/final -o runs/sft-q4_k_m.gguf --format gguf --quant q4_k_m
    alignforge generate runs/sft-merged --prompt "Extract the entities: ..."

Heavy libraries (torch, transformers, the web stack) are imported inside the commands so
that ``alignforge --help`` answers at once.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

app = typer.Typer(
    name="alignforge",
    help="From raw documents to a small, fast model aligned to your task.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

# (module, attribute, name, help) of sub-command groups living next to their code.
_SUBAPPS = [
    (
        "alignforge.datagen.cli",
        "app",
        "data",
        "Chunk documents, generate instructions, sample diverse subsets and preference completions, split and check leaks.",
    ),
    ("alignforge.annotate.cli", "app", "annotate", "Annotation web app, AI judge and blind tests."),
]
# (module, attribute, name) of single commands living next to their code.
_COMMANDS = [
    ("alignforge.evaluate.cli", "eval_command", "eval"),
    ("alignforge.evaluate.cli", "report_command", "report"),
    ("alignforge.rollout.cli", "serve_command", "serve"),
    ("alignforge.export.cli", "export_command", "export"),
    ("alignforge.workflow.cli", "iterate_command", "iterate"),
    ("alignforge.workflow.cli", "demo_command", "demo"),
    ("alignforge.workflow.cli", "examples_command", "examples"),
]


def _register() -> None:
    for module, attr, name, help_ in _SUBAPPS:
        try:
            sub = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
        app.add_typer(sub, name=name, help=help_)
    for module, attr, name in _COMMANDS:
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError):
            continue
        app.command(name)(fn)


@app.callback()
def _root(
    debug: bool = typer.Option(
        False, "--debug", help="Show the full traceback of an error (also ALIGNFORGE_DEBUG=1)."
    ),
) -> None:
    """From raw documents to a small, fast model aligned to your task."""
    if debug:
        os.environ["ALIGNFORGE_DEBUG"] = "1"


@app.command(context_settings={"help_option_names": []})
def train(
    ctx: typer.Context,
    config: str = typer.Argument(
        None, help="YAML config; its `stage:` picks the recipe (sft, rm, dpo, spin, ppo)."
    ),
    overrides: list[str] = typer.Argument(
        None, help="key=value overrides, e.g. learning_rate=1e-4 lora_rank=8."
    ),
    show_help: bool = typer.Option(
        False,
        "--help",
        help="Show this help and the stages; with a config or stage=NAME, that stage's keys "
        "with their type, default and meaning.",
    ),
) -> None:
    """Train with a recipe chosen by the config's `stage:`.

    `alignforge train --help stage=dpo` or `alignforge train CONFIG --help` lists the stage's keys.
    """
    from alignforge.recipes import run_stage, train_help

    if show_help:
        text = train_help(config, overrides or [])
        typer.echo(text if "Keys of stage" in text else f"{ctx.get_help()}\n\n{text}")
        return
    if config is None:
        raise typer.BadParameter(
            "none given; pass a YAML config (--help lists the stages)", ctx, param_hint="CONFIG"
        )
    run_stage(config, overrides or [])


@app.command()
def merge(
    adapter: str = typer.Argument(..., help="A PEFT adapter directory (e.g. runs/sft/final)."),
    output: str = typer.Option(
        ..., "--output", "-o", help="Where to write the merged full-precision HF model."
    ),
    dtype: str = typer.Option(
        "float32", help="Precision of the merged weights: float32, bfloat16 or float16."
    ),
) -> None:
    """Merge a LoRA adapter into its base and save a plain HF model (loads in transformers and vLLM)."""
    from alignforge.models import merge_adapter

    path = merge_adapter(adapter, output, dtype=dtype)
    typer.echo(f"merged model written to {path}")


@app.command()
def generate(
    model: str = typer.Argument(
        ..., help="`default`, an HF model dir, an adapter dir, a .gguf file or a hub id."
    ),
    prompt: list[str] = typer.Option(
        None,
        "--prompt",
        "-p",
        help="A prompt (repeatable). Without prompts or --input, starts an interactive chat.",
    ),
    input: str = typer.Option(
        None,
        "--input",
        "-i",
        help="Batch mode: a JSONL/JSON file with `prompt` or `messages` per row.",
    ),
    output: str = typer.Option(
        None, "--output", "-o", help="Batch mode: JSONL file to write (default: stdout)."
    ),
    max_new_tokens: int = typer.Option(256, help="Tokens to generate per answer."),
    temperature: float = typer.Option(0.0, help="0 means greedy decoding."),
    top_p: float = typer.Option(1.0, help="Nucleus sampling mass."),
    system: str = typer.Option(None, help="Optional system message."),
    batch_size: int = typer.Option(8, help="Prompts generated together in batch mode."),
    template: str = typer.Option(
        "default",
        help="Chat template: `default` (the one saved with the model), chatml, llama3, alpaca, "
        "empty or a Jinja file.",
    ),
    base_url: str = typer.Option(
        None,
        help="Generate on an OpenAI-compatible server (alignforge serve, vLLM) at this base URL, "
        "e.g. http://127.0.0.1:8000/v1; MODEL then only gives the tokenizer and chat template.",
    ),
    served_model: str = typer.Option(
        None, help="With --base-url: the served model's name (default: the first one it lists)."
    ),
) -> None:
    """Chat with, or batch-generate from, a model or adapter, in process or on a server."""
    from alignforge.generate import run_generate

    run_generate(
        model, prompt or [], input, output, max_new_tokens, temperature, top_p, system, batch_size,
        template, base_url, served_model,
    )  # fmt: skip


_register()


def _quiet_libraries() -> None:
    """Library chatter that says nothing to a user: transformers' info logs, and bitsandbytes
    announcing an optional CPU kernel package it did not find."""
    import logging
    import os

    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def main() -> None:
    """Run the command line. An error the user can fix (:mod:`alignforge.errors`) is printed as
    its one- or two-line message and exits non-zero; ``--debug`` shows the traceback instead."""
    from alignforge.errors import debugging, describe

    _quiet_libraries()
    try:
        app()
    except SystemExit as e:
        if e.code == 130:  # typer's exit for a KeyboardInterrupt outside a training loop
            typer.secho("interrupted", fg=typer.colors.RED, err=True)
        raise
    except Exception as e:
        known = describe(e)
        if known is None or debugging():
            raise
        message, code = known
        typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
        sys.exit(code)


if __name__ == "__main__":
    main()
