"""``alignforge annotate ...``: set up, run and harvest a preference-annotation project.

    alignforge annotate init ann/ --config aspects.yaml
    alignforge annotate add-user ann/ admin --role admin
    alignforge annotate add-user ann/ alice --role annotator --group team1   # prints the token
    alignforge annotate users ann/ ; alignforge annotate revoke ann/ alice
    alignforge annotate reset-token ann/ alice ; alignforge annotate set-role ann/ bob --role admin
    alignforge annotate import ann/ samples.jsonl
    alignforge annotate release ann/ --batch trial --size 20 --trial
    alignforge annotate release ann/ --batch b1 --size 200 --overlap 0.2
    alignforge annotate serve ann/ --host 0.0.0.0 --port 8000
    alignforge annotate stats ann/
    alignforge annotate export ann/ data/prefs --ties drop --min-agreement 0.6
    alignforge annotate judge ann/ --base-url http://127.0.0.1:8001/v1 --model qwen
    alignforge annotate judge ann/ --reference gold.jsonl          # against gold answers
    alignforge annotate simulate ann/ --reference gold.jsonl --annotators 3 --flip-rate 0.1
    alignforge annotate blind import ann/ ours.jsonl frontier.jsonl --name-a ours --name-b frontier
    alignforge annotate blind report ann/

Only typer and the standard library are imported here; the web stack loads inside commands.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path

import typer

from alignforge.errors import UserError

app = typer.Typer(
    help="Annotation web app, AI judge and blind tests.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
blind_app = typer.Typer(help="Blind A/B tests of two systems.", no_args_is_help=True)
app.add_typer(blind_app, name="blind")

PROJECT = typer.Argument(..., help="Project directory (holds annotate.yaml and annotate.db).")


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _store(project_dir: Path):
    from alignforge.annotate.store import Store

    try:
        return Store(project_dir)
    except FileNotFoundError as e:
        _fail(str(e))


def _cfg(project_dir: Path):
    from alignforge.annotate.config import load_project_config
    from alignforge.config import ConfigError

    try:
        return load_project_config(project_dir)
    except ConfigError as e:
        _fail(str(e))


@app.command()
def init(
    project_dir: Path = PROJECT,
    config: Path = typer.Option(
        None, "--config", "-c", help="YAML with aspects, scale, overlap..."
    ),
    overrides: list[str] = typer.Argument(None, help="key=value overrides, e.g. scale=likert5."),
) -> None:
    """Create a project: annotate.yaml (every setting explicit) and the SQLite database."""
    from alignforge.annotate.config import CONFIG_NAME, AnnotateConfig
    from alignforge.annotate.store import Store
    from alignforge.config import ConfigError, load_config, save_config

    try:
        cfg = load_config(AnnotateConfig, config, overrides or [])
    except ConfigError as e:
        _fail(str(e))
    Store.create(project_dir)
    save_config(cfg, project_dir / CONFIG_NAME)
    typer.echo(f"project ready in {project_dir} ({len(cfg.aspects)} aspects, scale {cfg.scale})")


@app.command("add-user")
def add_user(
    project_dir: Path = PROJECT,
    name: str = typer.Argument(..., help="Login name (letters, digits, _.@-)."),
    role: str = typer.Option("annotator", help="annotator or admin."),
    group: str = typer.Option("default", help="Annotator group; batches can target one group."),
    annotates: bool = typer.Option(
        None, "--annotates/--no-annotates",
        help="Count the user's judgements as an annotator's (default: yes for annotators, no "
        "for admins).",
    ),
) -> None:  # fmt: skip
    """Create a user and print its login token ONCE (only its hash is stored)."""
    from alignforge.annotate.store import StoreError

    try:
        token = _store(project_dir).add_user(name, role=role, group=group, annotates=annotates)
    except StoreError as e:
        _fail(str(e))
    typer.echo(token)
    typer.secho(f"token for {name} ({role}); it is not shown again", err=True)


@app.command()
def users(project_dir: Path = PROJECT) -> None:
    """List the users: role, group, whether they count as annotators, status, judgements."""
    store = _store(project_dir)
    with store.connect() as conn:
        rows = store.user_rows(conn)
    typer.echo(f"{'name':24} {'role':9} {'group':12} {'annotates':9} {'status':8} {'judged':>6}")
    for r in rows:
        typer.echo(f"{r.name:24} {r.role:9} {r.group:12} {'yes' if r.annotates else 'no':9} "
                   f"{'active' if r.active else 'revoked':8} {r.n_judgements:6d}")  # fmt: skip


@app.command()
def revoke(project_dir: Path = PROJECT, name: str = typer.Argument(..., help="User name.")) -> None:
    """Refuse a user's token and end their sessions at once (their judgements are kept)."""
    _user_change(project_dir, "revoke", name)
    typer.echo(f"{name} revoked; `reset-token` gives them a new token")


@app.command("reset-token")
def reset_token(
    project_dir: Path = PROJECT, name: str = typer.Argument(..., help="User name.")
) -> None:
    """Print a new token for a user ONCE; the old one and its sessions stop working."""
    typer.echo(_user_change(project_dir, "reset_token", name))
    typer.secho(f"new token for {name}; it is not shown again", err=True)


@app.command("set-role")
def set_role(
    project_dir: Path = PROJECT,
    name: str = typer.Argument(..., help="User name."),
    role: str = typer.Option(..., help="annotator or admin."),
    annotates: bool = typer.Option(
        None, "--annotates/--no-annotates",
        help="Count their judgements as an annotator's (default: the role's).",
    ),
) -> None:  # fmt: skip
    """Change a user's role and whether their judgements count as an annotator's."""
    _user_change(project_dir, "set_role", name, role, annotates)
    typer.echo(f"{name} is now {role}")


def _user_change(project_dir: Path, method: str, *args):
    from alignforge.annotate.store import StoreError

    try:
        return getattr(_store(project_dir), method)(*args)
    except StoreError as e:
        _fail(str(e))


@app.command("import")
def import_cmd(
    project_dir: Path = PROJECT,
    samples: Path = typer.Argument(..., help="JSONL of sampling rows (completions) or pair rows."),
    skip_bad: bool = typer.Option(False, help="Skip malformed rows (counted) instead of failing."),
) -> None:
    """Import samples: every C(k,2) pair of a prompt's completions, keeping its split."""
    from alignforge.annotate.importer import RowError, read_items

    store, cfg = _store(project_dir), _cfg(project_dir)
    try:
        items, rep = read_items(samples, cfg.max_text_chars, skip_bad=skip_bad)
        _check_db_splits(store, items)
    except (RowError, FileNotFoundError) as e:
        _fail(str(e))
    added, present = store.insert_items(items)
    typer.echo(
        f"{rep.n_rows} rows -> {rep.n_items} pairs: {added} new, {present} already imported, "
        f"{rep.skipped} rows skipped"
        + (f", {rep.identical} pairs of identical answers left out" if rep.identical else "")
    )
    for msg in rep.errors:
        typer.secho(f"  skipped {msg}", err=True)


def _check_db_splits(store, items) -> None:
    from alignforge.annotate.importer import RowError

    with store.connect() as conn:
        known = dict(conn.execute("SELECT prompt_id, split FROM items WHERE split IS NOT NULL"))
    for it in items:
        old = known.get(it.get("prompt_id"))
        if old and it.get("split") and old != it["split"]:
            raise RowError(
                f"field 'split': prompt_id {it['prompt_id']!r} is {it['split']!r} in this file "
                f"but {old!r} in the project; split prompts before pairing"
            )


@app.command()
def release(
    project_dir: Path = PROJECT,
    batch: str = typer.Option(..., help="Name of the new batch."),
    size: int = typer.Option(None, help="Items in the batch (default: every unreleased item)."),
    group: str = typer.Option(None, help="Only this annotator group sees it (default: all)."),
    overlap: float = typer.Option(None, help="Share every member sees (default: from config)."),
    trial: bool = typer.Option(False, help="Trial batch: all shared, served first; the baseline."),
    split: str = typer.Option(None, help="Only items of this split."),
    kind: str = typer.Option(None, help="Only items of this kind (pair or blind)."),
) -> None:
    """Release the next unreleased items to annotators as a batch."""
    from alignforge.annotate.store import StoreError

    store, cfg = _store(project_dir), _cfg(project_dir)
    ov = cfg.overlap if overlap is None else overlap
    try:
        b = store.release(batch, size, group, ov, trial, kind, split, seed=cfg.seed)
    except StoreError as e:
        _fail(str(e))
    typer.echo(f"batch {b.name}: {b.n_items} items, {b.n_shared} shared{' (trial)' * b.trial}")


@app.command()
def serve(
    project_dir: Path = PROJECT,
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, help="TCP port."),
    log_level: str = typer.Option("warning", help="uvicorn log level."),
) -> None:
    """Start the annotation web server (put it behind HTTPS when off localhost)."""
    import uvicorn

    from alignforge.annotate.server import create_app

    _store(project_dir)
    typer.echo(f"serving {project_dir} on http://{host}:{port}/login", err=True)
    # proxy headers are handled by the app, from annotate.yaml's trusted_proxies only
    uvicorn.run(create_app(project_dir, _cfg(project_dir)), host=host, port=port,
                log_level=log_level, proxy_headers=False)  # fmt: skip


@app.command()
def export(
    project_dir: Path = PROJECT,
    out: Path = typer.Argument(..., help="Directory (one file per split) or a .jsonl/.parquet."),
    ties: str = typer.Option("drop", help="drop | margin0 (keep, margin 0) | both (both orders)."),
    low_agreement: str = typer.Option("drop", help="drop (below --min-agreement) | majority."),
    min_agreement: float = typer.Option(0.0, help="Least share of raters on the majority side."),
    annotators: str = typer.Option(
        "humans",
        help="humans (annotators and annotating admins) | admins | judge | simulated | all | NAME.",
    ),
    fmt: str = typer.Option("jsonl", "--format", help="jsonl | parquet | both."),
) -> None:
    """Write the preference dataset (prompt, chosen, rejected, margin, ...) for DPO / RM training."""
    from alignforge.annotate.export import export_dataset

    _store(project_dir)
    try:
        r = export_dataset(project_dir, out, ties, low_agreement, min_agreement, annotators, fmt)
    except (ValueError, RuntimeError) as e:
        _fail(str(e))
    typer.echo(
        f"{r.n_records} records from {r.n_items_judged} judged items "
        f"({r.n_ties_dropped} ties and {r.n_low_agreement_dropped} low-agreement items dropped); "
        f"per split {r.per_split}"
    )
    if r.agreement_ceiling is not None:
        typer.echo(f"agreement ceiling {r.agreement_ceiling:.3f}: a perfect model's expected "
                   "accuracy against these labels (column agreement_ceiling)")  # fmt: skip
    for f in r.files:
        typer.echo(f"  {f}")


@app.command()
def judge(
    project_dir: Path = PROJECT,
    base_url: str = typer.Option(None, help="OpenAI-compatible base URL, e.g. http://host:8000/v1"),
    model: str = typer.Option(None, help="Model name; judgements are stored as judge:<model>."),
    reference: Path = typer.Option(
        None,
        help="JSONL of {prompt_id, reference} gold answers: judge against them instead of "
        "with an LLM (stored as judge:reference).",
    ),
    api_key_env: str = typer.Option("OPENAI_API_KEY", help="Environment variable with the key."),
    kind: str = typer.Option(None, help="Only items of this kind (pair or blind)."),
    released_only: bool = typer.Option(False, help="Only items already released to humans."),
    limit: int = typer.Option(None, help="Judge at most this many items."),
    workers: int = typer.Option(4, help="Parallel requests."),
) -> None:
    """Answer the aspect questions with an LLM judge (position-swapped) or against gold answers
    (--reference), then report the judge's kappa with the humans."""
    from alignforge.annotate.judge import OpenAIChatBackend, judge_human_agreement, run_judge

    store, cfg = _store(project_dir), _cfg(project_dir)
    qs = {a.key: a.question for a in cfg.aspects}
    if (reference is None) == (base_url is None and model is None):
        _fail("give either --reference FILE or --base-url and --model")
    if reference is not None:
        be, model = _reference_judge(reference, cfg, list(qs)), "reference"
    elif base_url is None or model is None:
        _fail(f"--{'model' if model is None else 'base-url'} is missing (an LLM judge needs both)")
    else:
        be = OpenAIChatBackend(base_url, model, api_key=os.environ.get(api_key_env))
        be.check("--base-url")
    r = run_judge(store, be, model, qs, cfg.scale, kind, released_only, limit, workers)
    typer.echo(
        f"judged {r.n_judged}/{r.n_items} items ({r.n_already} done before, {r.n_failed} failed, "
        f"{r.n_inconsistent} aspect answers flipped with the sides -> tie)"
    )
    for e in r.errors[:3]:
        typer.secho(f"  {e}", err=True)
    with store.connect() as conn:
        js = store.judgements(conn)
    for a in judge_human_agreement(js, f"judge:{model}", list(qs)):
        if a.n:
            typer.echo(f"  judge vs humans on {a.aspect}: kappa {_f(a.kappa)} "
                       f"(no ties {_f(a.kappa_no_ties)}), n={a.n}")  # fmt: skip
    if r.n_failed:  # a judge that answered nothing usable must not look like success
        raise UserError(
            f"{r.n_failed} of {r.n_items} items were not judged (first: {r.errors[0][:200]}); "
            "fix the cause and run the same command again: judged items are kept"
        )


def _reference_judge(path: Path, cfg, keys: list[str]):
    from alignforge.annotate.importer import RowError
    from alignforge.annotate.judge import JudgeError
    from alignforge.annotate.reference import ReferenceJudge, aspect_measures, read_references

    try:
        return ReferenceJudge(read_references(path), aspect_measures(keys, cfg.reference_measures))
    except (RowError, FileNotFoundError, JudgeError) as e:
        _fail(str(e))


@app.command()
def simulate(
    project_dir: Path = PROJECT,
    reference: Path = typer.Option(..., help="JSONL of {prompt_id, reference} gold answers."),
    annotators: int = typer.Option(None, help="Simulated annotators sim-1 ... sim-k."),
    flip_rate: float = typer.Option(None, help="Chance of the other side on a decisive aspect."),
    tie_rate: float = typer.Option(None, help="Chance of a tie on a decisive aspect."),
    position_bias: float = typer.Option(None, help="Chance of preferring the side shown first."),
    fatigue: float = typer.Option(None, help="Flip rate added per 100 items of the session."),
    seed: int = typer.Option(None, help="Seed of the annotators' draws."),
    limit: int = typer.Option(None, help="Items each annotator judges at most in this session."),
    group: str = typer.Option("default", help="Annotator group of the simulated users."),
) -> None:
    """Simulated annotators judge the released items through the queue, as people do, from the
    gold answers plus noise (default: annotate.yaml's panel:); marked simulated everywhere."""
    from pydantic import ValidationError

    from alignforge.annotate.config import PanelConfig
    from alignforge.annotate.panel import panel_ceiling, run_panel
    from alignforge.annotate.store import StoreError

    store, cfg = _store(project_dir), _cfg(project_dir)
    given = {"annotators": annotators, "flip_rate": flip_rate, "tie_rate": tie_rate,
             "position_bias": position_bias, "fatigue": fatigue, "seed": seed}  # fmt: skip
    try:
        panel = PanelConfig(**{**cfg.panel.model_dump(), **{k: v for k, v in given.items()
                                                            if v is not None}})  # fmt: skip
    except ValidationError as e:
        err = e.errors()[0]
        _fail(f"--{str(err['loc'][0]).replace('_', '-')}: {err['msg']}")
    qs = {a.key: a.question for a in cfg.aspects}
    judge_ = _reference_judge(reference, cfg, list(qs))
    try:
        r = run_panel(store, judge_, panel, qs, cfg.scale, limit, group)
    except StoreError as e:
        _fail(str(e))
    for name, n in r.judged.items():
        typer.echo(f"{name}: judged {n} items, on the reference's side on "
                   f"{_f(r.accuracy.get(name, math.nan))} of its decisive ones")  # fmt: skip
    if r.skipped:
        typer.secho(f"{r.skipped} items skipped: {r.errors[0]}", err=True)
    c = panel_ceiling(store)
    if not c.n_pairs:
        typer.echo("no item judged by two simulated annotators yet: release batches with "
                   "--overlap above 0 to measure their agreement")  # fmt: skip
        return
    typer.echo(f"panel agreement {c.agreement:.3f} on {c.n_pairs} pairs of decisive judgements: "
               f"each label is on the true side with probability {c.rater_accuracy:.3f}, the "
               "reward model's ceiling on one annotator's labels "
               "(exports: agreement_ceiling)")  # fmt: skip


def _f(x: float) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"


@app.command()
def stats(
    project_dir: Path = PROJECT,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
    annotators: str = typer.Option(
        "humans", help="humans, or simulated: the simulated annotators' figures on their own."
    ),
) -> None:
    """Annotation rates, agreement per window (trial, since, batches, days) and alerts."""
    from alignforge.annotate.dashboard import RATERS, project_stats
    from alignforge.annotate.server import _clean

    if annotators not in RATERS:
        _fail(f"--annotators must be one of {', '.join(RATERS)}, got {annotators!r}")
    store, cfg = _store(project_dir), _cfg(project_dir)
    with store.connect() as conn:
        s = project_stats(store, conn, [a.key for a in cfg.aspects], cfg.level, cfg.alert_rules(),
                          cfg.idle_cap_seconds, cfg.bootstrap_samples, annotators)  # fmt: skip
    if as_json:
        typer.echo(json.dumps(_clean(s._asdict()), indent=2))
        return
    typer.echo(f"{s.n_judgements} judgements, {s.n_released}/{s.n_items} items released")
    if annotators == "simulated":
        typer.secho("SIMULATED annotators: these figures are not people's", fg=typer.colors.YELLOW)
    elif s.n_simulated:
        typer.echo(f"{s.n_simulated} judgements by simulated annotators left out "
                   "(--annotators simulated shows them)")  # fmt: skip
    typer.echo(f"{'annotator':24} {'items':>6} {'items/h':>8} {'s/item':>7} {'active s':>8} "
               f"{'skips':>5} {'majority':>8}")  # fmt: skip
    for r in s.annotators:
        typer.echo(f"{r.user:24} {r.n_items:6d} {_f(r.items_per_hour):>8} "
                   f"{_f(r.median_server_seconds):>7} {_f(r.median_client_seconds):>8} "
                   f"{r.skips:5d} {_f(r.majority_agreement):>8}")  # fmt: skip
    typer.echo(f"{'window':28} {'aspect':16} {'n':>5} {'alpha':>6} {'95% CI':>15} {'fleiss':>6} "
               f"{'kappa':>6} {'no-tie a':>8}")  # fmt: skip
    for w in s.windows:
        for r, nt in zip(w.rows[::2], w.rows[1::2], strict=True):
            ci = f"[{_f(r.alpha_lo)}, {_f(r.alpha_hi)}]"
            typer.echo(f"{w.title[:28]:28} {r.aspect[:16]:16} {r.n_items:5d} {_f(r.alpha):>6} "
                       f"{ci:>15} {_f(r.fleiss):>6} {_f(r.mean_kappa):>6} {_f(nt.alpha):>8}")  # fmt: skip
    for n in s.notes:
        typer.echo(f"note: {n}")
    for a in s.alerts:
        typer.secho(f"ALERT: {a}", fg=typer.colors.RED)


@blind_app.command("import")
def blind_import(
    project_dir: Path = PROJECT,
    system_a: Path = typer.Argument(..., help="JSONL of system A: {id, prompt, output}."),
    system_b: Path = typer.Argument(..., help="JSONL of system B, same ids."),
    name_a: str = typer.Option(..., help="Name of system A (never shown to annotators)."),
    name_b: str = typer.Option(..., help="Name of system B (never shown to annotators)."),
    batch: str = typer.Option(None, help="Release the items at once as this batch."),
    overlap: float = typer.Option(None, help="Share every annotator sees (default: config)."),
) -> None:
    """Import two systems' outputs as side-blind pairs (random sides, names hidden)."""
    from alignforge.annotate.blind import blind_items
    from alignforge.annotate.importer import RowError

    store, cfg = _store(project_dir), _cfg(project_dir)
    try:
        items = blind_items(system_a, system_b, name_a, name_b)
    except (RowError, FileNotFoundError) as e:
        _fail(str(e))
    added, present = store.insert_items(items)
    typer.echo(f"{len(items)} blind pairs: {added} new, {present} already imported")
    if batch:
        ov = cfg.overlap if overlap is None else overlap
        b = store.release(batch, None, None, ov, False, "blind", None, seed=cfg.seed)
        typer.echo(f"batch {b.name}: {b.n_items} items, {b.n_shared} shared")


@blind_app.command("report")
def blind_report_cmd(
    project_dir: Path = PROJECT,
    annotators: str = typer.Option(
        "humans",
        help="humans (annotators and annotating admins) | admins | judge | simulated | all | NAME.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Win / tie / loss of system A against B with 95% bootstrap intervals."""
    from alignforge.annotate.blind import blind_report, format_report

    reps = blind_report(_store(project_dir), annotators)
    if not reps:
        _fail("no judged blind items yet")
    for r in reps:
        if as_json:
            w = r.result
            typer.echo(json.dumps({
                "system_a": r.system_a, "system_b": r.system_b, "n_items": r.n_items,
                **{k: getattr(w, k)._asdict() for k in ("win", "tie", "loss", "win_rate")},
            }))  # fmt: skip
        else:
            typer.echo(format_report(r))


if __name__ == "__main__":  # pragma: no cover
    app(sys.argv[1:])
