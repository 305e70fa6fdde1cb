"""``alignforge data ...``: chunk, instructions, diversity, preferences, pairs, check-leaks.

Only typer and the standard library are imported here; each command imports its module.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Chunk documents, generate instructions, sample diverse subsets and preference completions, split and check leaks.")  # fmt: skip

OVERRIDES_HELP = "key=value overrides of the YAML config, e.g. n_pairs=3 temperature=0.5."


def _load_config(cls, config: str | None, overrides: list[str] | None):
    """``cfg.yaml key=value ...`` or ``key=value ...`` alone: the first argument is a YAML file
    unless it is a ``key=value`` setting (and no file of that name exists)."""
    from alignforge.config import load_config

    if config and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *(overrides or [])]
    return load_config(cls, config, overrides or [])


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@app.command()
def chunk(
    input: str = typer.Argument(
        ..., help="Documents: .jsonl (id + text fields), .txt/.md file or a folder of them."
    ),
    output: str = typer.Option(..., "--output", "-o", help="Chunks .jsonl to write."),
    target_size: int = typer.Option(1000, help="Target chunk size."),
    max_size: int = typer.Option(None, help="Hard limit (default 1.5 x target)."),
    unit: str = typer.Option("chars", help="chars or tokens."),
    tokenizer: str = typer.Option(None, help="Tokenizer directory when --unit tokens."),
    text_field: str = typer.Option("text", help="Text field in .jsonl input."),
    id_field: str = typer.Option("id", help="Id field in .jsonl input."),
    strict: bool = typer.Option(
        False, help="Fail on the first unreadable document instead of skipping it."
    ),
) -> None:
    """Cut documents into sentence-aware chunks (no text dropped); unreadable rows are reported."""
    from alignforge.datagen.chunking import (
        DocumentError,
        chunk_documents,
        read_documents,
        write_chunks,
    )

    try:
        docs, skips = read_documents(input, text_field=text_field, id_field=id_field, strict=strict)
    except DocumentError as e:
        _fail(str(e))
    tok = None
    if unit == "tokens":
        from transformers import AutoTokenizer

        tok = (
            AutoTokenizer.from_pretrained(tokenizer)
            if tokenizer
            else _fail("--unit tokens needs --tokenizer")
        )
    chunks = chunk_documents(
        docs, target_size=target_size, max_size=max_size, unit=unit, tokenizer=tok
    )
    n = write_chunks(chunks, output)
    for s in skips:
        typer.echo(f"skipped {s}", err=True)
    typer.echo(f"{len(docs)} documents -> {n} chunks in {output}; {len(skips)} skipped")


@app.command()
def instructions(
    config: str = typer.Argument(
        None, help="YAML config (InstructionsConfig fields); optional: key=value alone works."
    ),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Back-translate chunks into instruction/answer pairs with a teacher (resumable).

    Writes sft.jsonl, rejects.jsonl, cache.jsonl and report.json to output_dir; a re-run skips
    finished chunks.

    Config keys (YAML or key=value): input, output_dir (required); input_is_chunks, text_field,
    id_field, target_size, max_size; teacher: base_url + model [+ api_key_env, max_concurrency,
    timeout, max_retries] or model_path (local model); n_pairs (3), min_pairs, temperature
    (0.7), max_tokens (1024), max_attempts (3), batch_size, use_json_schema (true),
    max_instruction_chars, max_answer_chars, near_dup_threshold, output_format
    (messages|prompt_completion).

    Example: alignforge data instructions cfg.yaml base_url=http://127.0.0.1:8000/v1 n_pairs=3
    """
    from alignforge.datagen.chunking import chunk_documents, read_chunks, read_documents
    from alignforge.datagen.configs import InstructionsConfig
    from alignforge.datagen.instructions import generate_instructions

    cfg = _load_config(InstructionsConfig, config, overrides)
    if cfg.input_is_chunks:
        chunks = read_chunks(cfg.input)
    else:
        docs, skips = read_documents(cfg.input, text_field=cfg.text_field, id_field=cfg.id_field)
        for s in skips:
            typer.echo(f"skipped {s}", err=True)
        chunks = chunk_documents(docs, target_size=cfg.target_size, max_size=cfg.max_size)
    report = generate_instructions(
        chunks, _teacher(cfg), cfg.output_dir, n_pairs=cfg.n_pairs, temperature=cfg.temperature,
        max_tokens=cfg.max_tokens, max_attempts=cfg.max_attempts, batch_size=cfg.batch_size,
        use_json_schema=cfg.use_json_schema, max_instruction_chars=cfg.max_instruction_chars,
        max_answer_chars=cfg.max_answer_chars, min_pairs=cfg.min_pairs,
        near_dup_threshold=cfg.near_dup_threshold, output_format=cfg.output_format,
    )  # fmt: skip
    typer.echo(json.dumps(report._asdict()))


def _teacher(cfg):
    import os

    if cfg.model_path:
        from alignforge.rollout.openai_client import TransformersChatClient
        from alignforge.rollout.server import _load_model

        model, tok = _load_model(cfg.model_path)
        return TransformersChatClient(model, tok, model_name=cfg.model_path)
    from alignforge.rollout.openai_client import OpenAIChatClient

    key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
    return OpenAIChatClient(cfg.base_url, cfg.model, api_key=key, max_concurrency=cfg.max_concurrency,
                            timeout=cfg.timeout, max_retries=cfg.max_retries)  # fmt: skip


@app.command()
def diversity(
    input: str = typer.Argument(
        ..., help=".jsonl rows with a text field (documents, chunks or prompts)."
    ),
    output: str = typer.Option(
        ..., "--output", "-o", help="Folder for selected.jsonl, plots and diagnostics."
    ),
    text_field: str = typer.Option("text", help="Field embedded."),
    k: int = typer.Option(10, help="Neighbours per item in the similarity graph."),
    n_trees: int = typer.Option(16, help="Annoy trees (more: better recall, slower build)."),
    search_k: int = typer.Option(600, help="Annoy nodes inspected per query (-1: n_trees * k)."),
    threshold: float = typer.Option(
        None, help="Fixed similarity cutoff (default: chosen automatically)."
    ),
    giant_fraction: float = typer.Option(
        0.5, help="A component above this fraction of items counts as giant."
    ),
    batch_size: int = typer.Option(64, help="Embedding batch size."),
) -> None:
    """Keep one item per cluster of near-duplicates (kNN graph components; automatic cutoff)."""
    from alignforge.datagen.cache import read_jsonl, write_jsonl_atomic
    from alignforge.datagen.diversity import diversity_sample, embed_texts, write_diagnostics

    rows = read_jsonl(input)
    bad = [i + 1 for i, r in enumerate(rows) if not isinstance(r.get(text_field), str)]
    if bad:
        _fail(f"{input}: rows {bad[:10]} have no string field {text_field!r}")
    texts = [r[text_field] for r in rows]
    emb = embed_texts(texts, batch_size=batch_size)
    result = diversity_sample(emb, k=k, n_trees=n_trees, search_k=search_k, threshold=threshold,
                              giant_fraction=giant_fraction)  # fmt: skip
    write_jsonl_atomic([rows[i] for i in result.selected], Path(output) / "selected.jsonl")
    write_diagnostics(result, texts, output)
    typer.echo(
        f"cutoff {result.threshold:.3f}: {len(rows)} items -> {len(result.selected)} components; see {output}"
    )


@app.command()
def preferences(
    config: str = typer.Argument(
        None, help="YAML config (PreferencesConfig fields); optional: key=value alone works."
    ),
    overrides: list[str] = typer.Argument(None, help=OVERRIDES_HELP),
) -> None:
    """Sample 1 greedy + k-1 tempered completions per prompt with log-probs into samples.jsonl.

    Config keys (YAML or key=value): prompts (JSONL with prompt, optional prompt_id, doc_id,
    split), model (policy checkpoint directory), output_dir (required); prompt_field,
    max_samples (the first N prompts), k (4), temperature (0.9), top_p, max_new_tokens (256),
    seed, batch_size, train_ratio, validation_ratio, test_ratio; rollout_engine (transformers,
    or server: alignforge serve at rollout_base_url loads `model` and samples), rollout_model.
    Completions are shuffled per prompt; splits are assigned per doc_id (else prompt_id) before
    any pairing.

    Example: alignforge data preferences prompts=p.jsonl model=runs/sft-merged output_dir=runs/samples
    """
    from alignforge.datagen.cache import read_jsonl
    from alignforge.datagen.configs import PreferencesConfig
    from alignforge.datagen.preferences import policy_fingerprint, sample_preferences
    from alignforge.models import resolve_model_path
    from alignforge.rollout import checkpoint_engine

    cfg = _load_config(PreferencesConfig, config, overrides)
    rows = read_jsonl(cfg.prompts)[: cfg.max_samples]
    for i, r in enumerate(rows, start=1):
        if cfg.prompt_field not in r:
            _fail(f"{cfg.prompts} row {i}: missing field {cfg.prompt_field!r}")
        r["prompt"] = r.pop(cfg.prompt_field)
    path = resolve_model_path(cfg.model)  # `default`, a hub id or a directory
    fingerprint = policy_fingerprint(path)
    engine, tok = checkpoint_engine(
        path, cfg.rollout_engine, base_urls=cfg.rollout_base_url,
        served_model=cfg.rollout_model, policy_version=fingerprint, batch_size=cfg.batch_size,
    )  # fmt: skip
    ratios = {"train": cfg.train_ratio, "validation": cfg.validation_ratio, "test": cfg.test_ratio}
    out = sample_preferences(rows, engine, tok, cfg.output_dir, k=cfg.k, temperature=cfg.temperature,
                             top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                             policy_model=cfg.model, fingerprint=fingerprint, split_ratios=ratios)  # fmt: skip
    typer.echo(f"{len(out)} prompts x {cfg.k} completions -> {cfg.output_dir}/samples.jsonl")


@app.command()
def pairs(
    samples: str = typer.Argument(..., help="samples.jsonl from `data preferences`."),
    output_dir: str = typer.Option(
        ..., "--output", "-o", help="Folder for <split>.jsonl pair files."
    ),
) -> None:
    """Expand each prompt's k completions into all C(k,2) pairs, one file per split."""
    from alignforge.datagen.cache import read_jsonl, write_jsonl_atomic
    from alignforge.datagen.splits import make_pairs

    by_split: dict[str, list] = {}
    for row in read_jsonl(samples):
        for p in make_pairs(row):
            by_split.setdefault(p["split"], []).append(p)
    for split, rows in sorted(by_split.items()):
        write_jsonl_atomic(rows, Path(output_dir) / f"{split}.jsonl")
        typer.echo(f"{split}: {len(rows)} pairs")


@app.command("check-leaks")
def check_leaks_command(
    files: list[str] = typer.Argument(
        ..., help="Split files (.jsonl); the split is each row's `split` field, else the file name."
    ),
    by: str = typer.Option(
        "prompt,doc_id", help="Comma-separated fields that must not cross splits."
    ),
    near_dup_threshold: float = typer.Option(
        0.95,
        help="Embedding cosine at or above which prompts in different splits leak; 0 disables.",
    ),
) -> None:
    """Exit 1 (with a report naming the rows) when a prompt or document appears in two splits."""
    from alignforge.datagen.splits import check_leaks

    try:
        report = check_leaks(files, by=tuple(f.strip() for f in by.split(",") if f.strip()),
                             near_dup_threshold=near_dup_threshold or None)  # fmt: skip
    except (OSError, ValueError) as e:
        _fail(str(e))
    typer.echo(report.format())
    if report.leaks:
        sys.exit(1)


@app.command("temperature-sweep")
def temperature_sweep_command(
    judgements: str = typer.Argument(
        ..., help=".jsonl rows {temperature, outcome: greedy|sample|tie}."
    ),
) -> None:
    """How often the greedy completion wins at each temperature; recommends the highest T where it wins <= 50%."""
    from alignforge.datagen.cache import read_jsonl
    from alignforge.datagen.preferences import temperature_sweep

    typer.echo(temperature_sweep(read_jsonl(judgements)).format())
