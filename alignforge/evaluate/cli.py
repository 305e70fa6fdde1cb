"""``alignforge eval`` and ``alignforge report``.

    alignforge eval --task extraction --data examples/data/ner_finance.jsonl \\
        --model runs/sft/final --output-dir runs/eval --limit 200
    alignforge eval --task extraction --data test.jsonl --output-dir runs/eval \\
        --system sft=runs/sft/final --system ppo=model=runs/sft-merged,adapter=runs/ppo/final \\
        --system frontier=base_url=https://api.example.com/v1,model=big-model
    alignforge report runs/my-run

Only typer and the standard library are imported here; the work happens in ``runner`` and
``report``, imported when a command runs.
"""

from __future__ import annotations

from pathlib import Path

import typer


def eval_command(
    data: Path = typer.Option(
        ...,
        "--data",
        help="Test split: JSONL, JSON list, a directory with <split>.jsonl, or a HF datasets (save_to_disk) directory.",
    ),
    output_dir: Path = typer.Option(
        ...,
        "--output-dir",
        "-o",
        help="Where results.json, results.md, failures.jsonl and per-system generation caches go.",
    ),
    task: str = typer.Option(
        "extraction",
        "--task",
        help="Registered task: extraction, instruction, or one you registered; or preference: pairs scored by reward models and DPO adapters (--system), beside baselines.",
    ),
    model: str = typer.Option(
        None,
        "--model",
        help="Local model directory, adapter directory or .gguf file (run by llama.cpp); with --base-url, the served model name.",
    ),
    adapter: str = typer.Option(
        None, "--adapter", help="PEFT adapter directory applied on top of --model."
    ),
    base_url: str = typer.Option(
        None,
        "--base-url",
        help="OpenAI-compatible server's base URL, e.g. http://127.0.0.1:8000/v1 (streams to measure TTFT).",
    ),
    endpoint: str = typer.Option(None, "--endpoint", hidden=True),  # --base-url's former name
    name: str = typer.Option(
        None, "--name", help="Display name of the single system given by --model/--base-url."
    ),
    system: list[str] = typer.Option(
        None,
        "--system",
        help="Repeatable: name=PATH (a model dir, adapter dir or .gguf file), or name=key=value,... with keys model, adapter, base_url, api_key_env.",
    ),
    systems_file: Path = typer.Option(
        None,
        "--systems",
        help="YAML file with a `systems:` list of {name, model, adapter?, base_url?, api_key_env?}.",
    ),
    split: str = typer.Option(
        None, "--split", help="Split of a dataset directory (default: test)."
    ),
    limit: int = typer.Option(None, "--limit", min=1, help="Evaluate only the first N rows."),
    max_new_tokens: int = typer.Option(
        256, "--max-new-tokens", min=1, help="Generation budget per item."
    ),
    batch_size: int = typer.Option(
        8, "--batch-size", min=1, help="Local models: prompts per generate() batch."
    ),
    concurrency: int = typer.Option(
        4, "--concurrency", min=1, help="Endpoints: parallel streaming requests."
    ),
    api_key_env: str = typer.Option(
        "OPENAI_API_KEY",
        "--api-key-env",
        help="Environment variable holding the server's API key.",
    ),
    n_boot: int = typer.Option(
        2000, "--n-boot", min=100, help="Bootstrap resamples for the confidence intervals."
    ),
    alpha: float = typer.Option(
        0.05, "--alpha", min=0.001, max=0.5, help="1 - confidence level of the intervals."
    ),
    seed: int = typer.Option(0, "--seed", help="Bootstrap seed."),
    worst_k: int = typer.Option(
        20,
        "--worst-k",
        min=0,
        help="Lowest-scoring items per system written to failures.jsonl (parse failures are always written).",
    ),
    max_length: int = typer.Option(
        1024, "--max-length", min=9, help="--task preference: tokens of prompt + answer kept."
    ),
    max_prompt_length: int = typer.Option(
        None,
        "--max-prompt-length",
        min=1,
        help="--task preference: prompt tokens kept (its last ones; default max-length // 2).",
    ),
    template: str = typer.Option(
        "default",
        "--template",
        help="Chat template of --model (for --task preference, the one pairs are tokenized with): "
        "default (the one saved with the model), chatml, llama3, alpaca, empty or a Jinja file. "
        "--system takes template= per system.",
    ),
) -> None:
    """Score one or more systems on a task's test split, with bootstrap CIs, latency and failures.

    Systems are a local model (+ adapter), an OpenAI-compatible server, or several of either compared in one table (--system repeated or --systems YAML).

    Writes OUTPUT_DIR/results.json, results.md and failures.jsonl. Generations are cached in OUTPUT_DIR/<system>/generations.jsonl, so re-running resumes.
    """
    from alignforge.config import ConfigError
    from alignforge.evaluate.runner import (
        SystemSpec,
        load_examples,
        load_systems,
        parse_system,
        run_eval,
    )
    from alignforge.evaluate.tasks import get_task

    if endpoint:
        raise ConfigError(
            "--endpoint is now --base-url, as alignforge generate and annotate judge name it"
        )
    specs = [parse_system(s) for s in system or []]
    if systems_file:
        specs += load_systems(systems_file)
    if task == "preference":  # pairs scored by reward models and adapters, --model is the base
        from alignforge.evaluate.preference_run import run_preference_eval

        run_preference_eval(
            data, output_dir, specs, model or "default", max_length, max_prompt_length, limit,
            split, batch_size, n_boot, alpha, seed, template,
        )  # fmt: skip
        typer.echo((Path(output_dir) / "results.md").read_text())
        return
    if model:
        # "runs/sft/final" -> "sft-final"; a server's model -> its served name
        default = (
            model.replace("/", "-") if base_url else "-".join(model.strip("/").split("/")[-2:])
        )
        specs.insert(
            0,
            SystemSpec(
                name=name or default or "model",
                model=model,
                adapter=adapter,
                base_url=base_url,
                api_key_env=api_key_env,
                template=template,
            ),
        )
    elif base_url or adapter:
        raise ConfigError("--base-url and --adapter need --model")
    if not specs:
        raise ConfigError("no system to evaluate: give --model, --system or --systems")
    if any(s.model.endswith(".gguf") and not s.base_url for s in specs):
        from alignforge.export.gguf import ExportError, llama_cpp_version

        try:  # before any system runs, not after the first ones
            llama_cpp_version()
        except ExportError as e:
            raise ConfigError(str(e)) from None
    try:
        t = get_task(task)
        examples = load_examples(t, data, split, limit)
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise ConfigError(str(e).strip("'\"")) from None
    results = run_eval(
        t,
        examples,
        specs,
        output_dir,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        concurrency=concurrency,
        n_boot=n_boot,
        alpha=alpha,
        seed=seed,
        worst_k=worst_k,
        dataset=str(data),
    )
    typer.echo((Path(output_dir) / "results.md").read_text())
    typer.echo(f"wrote {output_dir}/results.json ({len(results['systems'])} systems)")


def report_command(
    run_dir: Path = typer.Argument(
        ...,
        help="Run directory to scan (stage outputs, round_<k>/ dirs, eval results, annotation exports).",
    ),
    output: Path = typer.Option(
        None, "--output", "-o", help="HTML file to write (default: RUN_DIR/report.html)."
    ),
    title: str = typer.Option(
        None,
        "--title",
        help="Report title (default: the run's run_name, else the systems it compares, else the folder's name).",
    ),
) -> None:
    """Build a self-contained HTML report (plots embedded, no external assets) of a run.

    Opens with the systems compared and whether each paired difference excludes zero, then shows training curves, reward distributions and drift per round, off-policy diagnostics, annotator agreement, blind-test win rates and eval metrics per round; each section appears only when its files exist, in a fixed order.
    """
    from alignforge.config import ConfigError
    from alignforge.evaluate.report import build_report

    if not run_dir.is_dir():
        raise ConfigError(f"run directory {run_dir} does not exist")
    path = build_report(run_dir, output, title)
    typer.echo(f"wrote {path}")
