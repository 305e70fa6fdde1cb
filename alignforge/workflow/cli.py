"""``alignforge iterate`` and ``alignforge demo`` (heavy imports happen inside the commands)."""

from __future__ import annotations

import typer


def iterate_command(
    config: str = typer.Argument(
        ..., help="YAML config of the rounds (see examples/iterate.yaml)."
    ),
    overrides: list[str] = typer.Argument(
        None, help="key=value overrides, e.g. rounds=2 judge=metric ppo.max_steps=4."
    ),
) -> None:
    """Iterative RLHF: each round samples from the current policy, judges, trains the RM, runs PPO, evaluates.

    Every step is checkpointed; re-running the same command resumes where it stopped.
    """
    from alignforge.config import load_config
    from alignforge.workflow.config import IterateConfig
    from alignforge.workflow.iterate import run_iterate

    run_iterate(load_config(IterateConfig, config, overrides or []))


def demo_command(
    output_dir: str = typer.Option(
        "runs/demo", "--output-dir", "-o", help="Run directory; re-running resumes."
    ),
    quick: bool = typer.Option(
        False, "--quick", help="A ~3-minute version (what the test suite runs)."
    ),
) -> None:
    """The whole workflow on the embedded model and a real corpus: data, SFT, RLHF rounds, eval, report."""
    from alignforge.workflow.demo import run_demo

    run_demo(output_dir, quick=quick)


def examples_command(
    dest: str = typer.Argument("examples", help="Folder to copy them into (created if missing)."),
) -> None:
    """Copy the example configs and data into DEST (default ./examples); existing files are kept.

    Then `alignforge train examples/sft_default.yaml` and the other documented commands run here.
    """
    from alignforge.workflow.examples import copy_examples

    written, kept = copy_examples(dest)
    typer.echo(f"{len(written)} example files written to {dest}")
    if kept:
        typer.echo(f"{len(kept)} already there and left as they are: {', '.join(map(str, kept))}")
