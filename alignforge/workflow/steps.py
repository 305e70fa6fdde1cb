"""The steps of a round, each writing into its own directory. ``iterate.py`` strings them together.

sample(policy, rows, out)           -> samples.jsonl (greedy + k-1 samples, split before pairing)
judge(samples, out, ...)            -> prefs/ (prompt/chosen/rejected/margin per split)
check_provenance(samples, policy)   -> refuses preference data from another checkpoint
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from alignforge.config import ConfigError


class ProvenanceError(ConfigError):
    """Preference data was sampled from a different checkpoint than the one being trained."""


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path


def task_prompt_rows(
    task, rows: list[dict], indices: list[int]
) -> tuple[list[dict], dict[str, object]]:
    """Sampling prompts from task rows (chat messages, stable ids) and each prompt's reference."""
    prompts, refs = [], {}
    for i in indices:
        ex = task.example(rows[i], i)
        pid = f"{i}:{ex.id}"
        prompts.append({"prompt": ex.messages, "prompt_id": pid, "doc_id": str(ex.id)})
        refs[pid] = ex.reference
    return prompts, refs


def sample(
    policy: str,
    prompts: list[dict],
    out_dir: Path,
    k: int,
    temperature: float,
    max_new_tokens: int,
    split_ratios: dict[str, float],
    seed: int,
    rollout_engine: str = "transformers",
    rollout_base_url: str | list[str] | None = None,
    rollout_model: str | None = None,
) -> list[dict]:
    """One greedy + ``k-1`` sampled completions per prompt from ``policy``, with log-probs: in
    this process, or on the servers at ``rollout_base_url`` once they have loaded ``policy``."""
    from alignforge.datagen.preferences import sample_preferences
    from alignforge.models import fingerprint, resolve_model_path
    from alignforge.rollout import checkpoint_engine

    path = resolve_model_path(policy)
    fp = fingerprint(path)
    engine, tok = checkpoint_engine(str(path), rollout_engine, base_urls=rollout_base_url,
                                    served_model=rollout_model, policy_version=fp)  # fmt: skip
    return sample_preferences(
        prompts,
        engine,
        tok,
        out_dir,
        k=k,
        temperature=temperature,
        max_new_tokens=max_new_tokens,
        seed=seed,
        policy_model=str(policy),
        fingerprint=fp,
        split_ratios=split_ratios,
    )


def check_provenance(
    samples: list[dict], policy: str, allow_offpolicy: bool, correction: str
) -> None:
    """Lesson 2: preference samples must come from the checkpoint being trained.

    Data from another checkpoint is off-policy. It is refused unless the user allows it *and*
    PPO's importance correction is on.
    """
    from alignforge.models import fingerprint, resolve_model_path

    expected = fingerprint(resolve_model_path(policy))
    found = {r["policy"]["fingerprint"] for r in samples}
    if found == {expected}:
        return
    if allow_offpolicy and correction != "none":
        return
    raise ProvenanceError(
        f"preference samples come from checkpoint(s) {sorted(found)} but the policy being trained is "
        f"{policy} ({expected}); this is off-policy data. Re-sample from the current policy, or set "
        "allow_offpolicy=true with ppo.offpolicy_correction=truncate|mask"
    )


def judge(
    samples_path: Path,
    out_dir: Path,
    mode: str,
    judge_model: str,
    endpoint: str | None,
    task=None,
    references: dict[str, Any] | None = None,
    panel=None,
) -> dict:
    """Judge every pair of every prompt; export a preference dataset per split into ``out_dir/prefs``.

    ``mode`` reference with a ``panel`` (``PanelConfig``): the pairs are released as one batch and
    the simulated annotators judge them through the queue; their labels are exported."""
    from alignforge.annotate.config import load_project_config
    from alignforge.annotate.export import export_dataset
    from alignforge.annotate.importer import read_items
    from alignforge.annotate.store import Store

    project = out_dir / "annotate"
    store = Store(project) if (project / "annotate.db").exists() else Store.create(project)
    items, _ = read_items(samples_path)
    store.insert_items(items)
    project_cfg = load_project_config(project)
    aspects = {a.key: a.question for a in project_cfg.aspects}
    if mode == "human":
        n = _human_judged(store)
        if n < len(items):
            raise ConfigError(
                f"judge=human: {n} of {len(items)} pairs judged. Annotate them with "
                f"`alignforge annotate serve {project}` (add users with `alignforge annotate add-user`), then re-run"
            )
        annotators = "humans"
    elif mode == "metric":
        _judge_with_metric(store, task, references or {}, aspects)
        annotators = "judge"
    elif mode == "reference":
        annotators = _judge_with_reference(store, project_cfg, references or {}, aspects, panel)
    else:
        from alignforge.annotate.judge import run_judge

        run_judge(store, _ai_backend(judge_model, endpoint), judge_model, aspects, workers=1)
        annotators = "judge"
    rep = export_dataset(project, out_dir / "prefs", ties="drop", annotators=annotators)
    return rep._asdict() if hasattr(rep, "_asdict") else dict(rep)


def _human_judged(store) -> int:
    with store.connect() as conn:
        return len(
            {j.item_id for j in store.judgements(conn) if j.role not in ("judge", "simulated")}
        )


def _judge_with_reference(store, project_cfg, references, aspects, panel) -> str:
    """The reference judge's verdicts (``judge:reference``, with the measures behind them), and
    with a panel its simulated annotators' judgements; returns whose judgements to export."""
    from alignforge.annotate.judge import run_judge
    from alignforge.annotate.reference import ReferenceJudge, aspect_measures

    judge = ReferenceJudge(
        references, aspect_measures(list(aspects), project_cfg.reference_measures)
    )
    run_judge(store, judge, "reference", aspects, project_cfg.scale, workers=1, progress=False)
    if panel is None:
        return "judge"
    from alignforge.annotate.panel import run_panel

    with store.connect() as conn:
        unreleased = conn.execute("SELECT COUNT(*) FROM items WHERE batch_id IS NULL").fetchone()[0]
        n_batches = conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0]
    if unreleased:
        store.release(f"round-{n_batches + 1}", None, overlap=project_cfg.overlap, seed=panel.seed)
    run_panel(store, judge, panel, aspects, project_cfg.scale)
    return "simulated"


def _judge_with_metric(store, task, references, aspects) -> None:
    with store.connect() as conn:
        judge_user = store.judge_user(conn, "task-metric")
        ids = [r[0] for r in conn.execute("SELECT id FROM items ORDER BY id")]
        for item_id in ids:
            it = store.item(conn, item_id)
            ref = references.get(it.get("prompt_id"))
            if ref is None:
                continue
            a, b = task.reward(it["a_text"], ref), task.reward(it["b_text"], ref)
            sign = (a > b) - (a < b)
            store.record_judge(
                conn, judge_user, item_id, dict.fromkeys(aspects, sign), {"a": a, "b": b}
            )


def _ai_backend(judge_model: str, endpoint: str | None):
    if endpoint:
        from alignforge.annotate.judge import OpenAIChatBackend

        backend = OpenAIChatBackend(endpoint, model=judge_model)
        backend.check("judge_endpoint")
        return backend
    from alignforge.models import load_model, load_tokenizer
    from alignforge.rollout.openai_client import TransformersChatClient

    client = TransformersChatClient(load_model(judge_model).eval(), load_tokenizer(judge_model))

    def chat(messages, **kw):
        return client.chat(
            messages,
            temperature=0.0,
            max_tokens=kw.get("max_tokens", 96),
            response_format=kw.get("response_format"),
        )[0].text

    return chat


def pref_files(prefs_dir: Path) -> tuple[Path | None, Path | None]:
    """The train and validation preference files of an export, when they hold rows."""

    def nonempty(name):
        p = prefs_dir / f"{name}.jsonl"
        return p if p.exists() and p.stat().st_size > 0 else None

    return nonempty("train"), nonempty("validation")


def count_rows(path: Path | None) -> int:
    return 0 if path is None else sum(1 for line in open(path) if line.strip())
